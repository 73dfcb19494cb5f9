//! Smarthost credentials: read from files or the environment when needed, never logged.

use std::path::Path;

use crate::rules::model::AuthSpec;

/// Why a username or password could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{what}: environment variable {name} is not set")]
    EnvUnset { what: &'static str, name: String },
    #[error("no {0} configured")]
    NotConfigured(&'static str),
    #[error("{}: {error}", path.display())]
    Unreadable {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("{} is empty", .0.display())]
    Empty(std::path::PathBuf),
}

/// Reads the username and password an [`AuthSpec`] points to.
pub fn read(auth: &AuthSpec) -> Result<(String, String), CredentialsError> {
    let user = one(
        auth.username_file.as_deref(),
        auth.username_env.as_deref(),
        "username",
    )?;
    let password = one(
        auth.password_file.as_deref(),
        auth.password_env.as_deref(),
        "password",
    )?;
    Ok((user, password))
}

fn one(
    file: Option<&Path>,
    env: Option<&str>,
    what: &'static str,
) -> Result<String, CredentialsError> {
    match (file, env) {
        (Some(path), _) => from_file(path),
        (None, Some(name)) => std::env::var(name).map_err(|_| CredentialsError::EnvUnset {
            what,
            name: name.to_string(),
        }),
        (None, None) => Err(CredentialsError::NotConfigured(what)),
    }
}

pub fn from_file(path: &Path) -> Result<String, CredentialsError> {
    warn_if_readable_by_others(path);
    let text = std::fs::read_to_string(path).map_err(|error| CredentialsError::Unreadable {
        path: path.to_path_buf(),
        error,
    })?;
    let value = text.trim_end_matches(['\r', '\n']).to_string();
    if value.is_empty() {
        return Err(CredentialsError::Empty(path.to_path_buf()));
    }
    Ok(value)
}

/// A credentials file others can read is a leak waiting to happen: say so every time.
pub fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                event = "credentials.readable",
                file = %path.display(),
                mode = %format!("{:o}", meta.permissions().mode() & 0o777),
                "credentials file {} is readable by group or others (mode {:o}): chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}
