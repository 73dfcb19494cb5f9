//! The policy file beside the cache file: the policies in force, kept across restarts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::{fs, io};

use serde::{Deserialize, Serialize};

use crate::policy::mta_sts::policy::StsPolicy;
use crate::policy::mta_sts::store::PolicyStore;

/// The persistence format's version, written into every file.
const FILE_VERSION: u32 = 1;

#[derive(Serialize)]
struct SavedRef<'a> {
    version: u32,
    policies: Vec<&'a StsPolicy>,
}

#[derive(Deserialize)]
struct Saved {
    version: u32,
    policies: Vec<StsPolicy>,
}

/// The file the policies are saved in: beside the outcome cache file, `cache.json` giving
/// `cache.mta-sts.json`.
pub fn policy_file(cache_file: &Path) -> PathBuf {
    crate::settings::file_beside(cache_file, "mta-sts")
}

impl PolicyStore {
    /// Writes every valid policy to `path`, atomically, readable by the owner only.
    pub fn save(&self, path: &Path) -> io::Result<usize> {
        let now = self.clock.now();
        let policies: Vec<Arc<StsPolicy>> = {
            let domains = self
                .domains
                .lock()
                .map_err(|_| io::Error::other("policy store lock poisoned"))?;
            domains
                .values()
                .filter_map(|s| s.policy.clone())
                .filter(|p| !p.is_expired(now))
                .collect()
        };
        let saved = SavedRef {
            version: FILE_VERSION,
            policies: policies.iter().map(|p| p.as_ref()).collect(),
        };
        crate::cache::persistence::write_atomically(path, |w| {
            serde_json::to_writer(w, &saved).map_err(io::Error::from)
        })?;
        Ok(policies.len())
    }

    /// Reads a file written by [`save`](Self::save), keeping the policies that are still
    /// valid. A policy already held wins when it was fetched later. A missing file is none.
    pub fn load(&self, path: &Path) -> io::Result<usize> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let saved: Saved = serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if saved.version != FILE_VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("version {} is not supported", saved.version),
            ));
        }
        let now = self.clock.now();
        let mut domains = self
            .domains
            .lock()
            .map_err(|_| io::Error::other("policy store lock poisoned"))?;
        let mut loaded = 0;
        for policy in saved.policies {
            if policy.is_expired(now) || domains.len() >= self.config.max_policies {
                continue;
            }
            let state = domains.entry(policy.domain.clone()).or_default();
            let newer = state
                .policy
                .as_ref()
                .is_none_or(|held| held.fetched_at < policy.fetched_at);
            if newer {
                state.policy = Some(Arc::new(policy));
                loaded += 1;
            }
        }
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_policy_file_sits_beside_the_cache_file() {
        assert_eq!(
            policy_file(Path::new("/var/lib/tlsrouter/cache.json")),
            Path::new("/var/lib/tlsrouter/cache.mta-sts.json")
        );
    }
}
