//! Smarthost credentials: read from files or the environment when needed, never logged.

use std::path::Path;

use crate::rules::model::AuthSpec;

/// Reads the username and password an [`AuthSpec`] points to.
pub fn read(auth: &AuthSpec) -> Result<(String, String), String> {
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

fn one(file: Option<&Path>, env: Option<&str>, what: &str) -> Result<String, String> {
    match (file, env) {
        (Some(path), _) => from_file(path),
        (None, Some(name)) => std::env::var(name)
            .map_err(|_| format!("{what}: environment variable {name} is not set")),
        (None, None) => Err(format!("no {what} configured")),
    }
}

fn from_file(path: &Path) -> Result<String, String> {
    warn_if_readable_by_others(path);
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value = text.trim_end_matches(['\r', '\n']).to_string();
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
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
                "credentials file {} is readable by group or others (mode {:o}): chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}
