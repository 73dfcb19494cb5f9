//! The Redis client: its URL, credentials and TLS roots checked at start, and the errors
//! that stop a start or only say Redis is away.

use std::fmt::Write as _;

use base64::Engine;
use redis::{Client, ConnectionAddr, IntoConnectionInfo};

use crate::cache::config::RedisConfig;

#[derive(Debug, thiserror::Error)]
pub enum SharedCacheError {
    #[error("cache.redis.url: {0}")]
    Url(String),
    #[error("cache.redis: {0}")]
    Credentials(String),
    #[error("cache.redis: Redis at {target} refused the credentials: {detail}")]
    Refused { target: String, detail: String },
    #[error("cache.redis: Redis at {target} cannot be reached: {detail}")]
    Unreachable { target: String, detail: String },
}

impl SharedCacheError {
    /// A configuration that can never work, as opposed to a Redis that is away for now.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, SharedCacheError::Unreachable { .. })
    }
}

/// What `rediss://` trusts: delivery's roots (`tls.system_roots`, `tls.ca_file`), given
/// as they are so that this module needs nothing of `outbound`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Roots<'a> {
    pub system: bool,
    pub ca_file: Option<&'a std::path::Path>,
}

/// A wrong password or user, as Redis says it (and not a network failure).
pub(super) fn is_refusal(error: &redis::RedisError) -> bool {
    if error.kind() == redis::ErrorKind::AuthenticationFailed {
        return true;
    }
    let text = error.to_string();
    [
        "WRONGPASS",
        "NOAUTH",
        "NOPERM",
        "invalid password",
        "invalid username",
    ]
    .iter()
    .any(|word| text.contains(word))
}

pub(super) fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The Redis client for the configuration, and where it goes (without credentials).
pub(super) fn client(
    config: &RedisConfig,
    roots: Roots<'_>,
) -> Result<(Client, String), SharedCacheError> {
    let url = config.url.as_deref().ok_or_else(|| {
        SharedCacheError::Url("missing: cache.backend redis needs a URL".to_string())
    })?;
    // Refused before parsing, so that no error message repeats a password.
    if url.contains('@') {
        return Err(SharedCacheError::Url(
            "credentials do not belong in the URL: use cache.redis.password_file or \
             password_env (and username)"
                .to_string(),
        ));
    }
    let mut info = url
        .into_connection_info()
        .map_err(|e| SharedCacheError::Url(format!("{url:?} is not a Redis URL: {e}")))?;
    let target = match info.addr() {
        ConnectionAddr::Unix(path) => format!("unix://{}", path.display()),
        ConnectionAddr::TcpTls { .. } => format!("rediss://{}", info.addr()),
        other => format!("redis://{other}"),
    };
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = password(config)? {
        settings = settings.set_password(password);
    }
    info = info.set_redis_settings(settings);
    let client = if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(roots_pem(roots)?),
        };
        Client::build_with_tls(info, certificates)
    } else {
        Client::open(info)
    }
    .map_err(|e| SharedCacheError::Url(e.to_string()))?;
    Ok((client, target))
}

pub(super) fn password(config: &RedisConfig) -> Result<Option<String>, SharedCacheError> {
    match (&config.password_file, &config.password_env) {
        (Some(_), Some(_)) => Err(SharedCacheError::Credentials(
            "give password_file or password_env, not both".to_string(),
        )),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                SharedCacheError::Credentials(format!("password_file {}: {e}", path.display()))
            })?;
            Ok(Some(text.lines().next().unwrap_or("").to_string()))
        }
        (None, Some(name)) => std::env::var(name).map(Some).map_err(|_| {
            SharedCacheError::Credentials(format!("password_env: ${name} is not set"))
        }),
        (None, None) => Ok(None),
    }
}

/// The roots `rediss://` trusts: delivery's (system roots and `tls.ca_file`), as PEM.
pub(super) fn roots_pem(roots: Roots<'_>) -> Result<Vec<u8>, SharedCacheError> {
    let mut ders = Vec::new();
    if roots.system {
        ders.extend(rustls_native_certs::load_native_certs().certs);
    }
    if let Some(path) = roots.ca_file {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| SharedCacheError::Url(format!("tls.ca_file {}: {e}", path.display())))?;
        ders.extend(certs);
    }
    if ders.is_empty() {
        return Err(SharedCacheError::Url(
            "rediss:// needs root certificates: tls.system_roots or tls.ca_file".to_string(),
        ));
    }
    let mut pem = String::new();
    for der in ders {
        let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in body.as_bytes().chunks(64) {
            let _ = writeln!(pem, "{}", String::from_utf8_lossy(chunk));
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    Ok(pem.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_credentials_or_nonsense_are_refused_without_repeating_a_password() {
        let tls = Roots::default();
        let with = |url: &str| RedisConfig {
            url: Some(url.to_string()),
            ..RedisConfig::default()
        };
        let err = client(&with("redis://user:s3cret@127.0.0.1:6379"), tls).expect_err("inline");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(err.to_string().contains("password_file"), "{err}");
        let err = client(&with("http://127.0.0.1:6379"), tls).expect_err("scheme");
        assert!(err.to_string().contains("not a Redis URL"), "{err}");
        let err = client(&RedisConfig::default(), tls).expect_err("no url");
        assert!(err.to_string().contains("cache.redis.url"), "{err}");
        let (_, target) = client(&with("redis://127.0.0.1:6390/2"), tls).expect("valid");
        assert_eq!(target, "redis://127.0.0.1:6390");
        let unix = client(&with("unix:///run/redis/redis.sock"), tls);
        #[cfg(unix)]
        assert_eq!(unix.expect("valid").1, "unix:///run/redis/redis.sock");
        // No Unix sockets on Windows: said when the configuration is checked.
        #[cfg(not(unix))]
        assert!(
            unix.expect_err("no Unix sockets")
                .to_string()
                .contains("Unix sockets")
        );
    }
}
