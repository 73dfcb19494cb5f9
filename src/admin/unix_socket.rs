//! The admin endpoint on Unix: a socket file whose mode and group say who may ask.

use std::path::Path;

use crate::admin::client::CtlError;

pub type Stream = tokio::net::UnixStream;

pub struct Listener(tokio::net::UnixListener);

/// Connects `ctl` to the socket at `path`, telling apart why it cannot.
pub async fn connect(path: &Path) -> Result<Stream, CtlError> {
    let shown = path.display().to_string();
    Stream::connect(path).await.map_err(|e| match e.kind() {
        // Connecting to a file or a directory is refused as if nobody listened.
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            if is_other_than_a_socket(path) =>
        {
            CtlError::NotASocket(shown)
        }
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            CtlError::NotRunning(shown)
        }
        std::io::ErrorKind::PermissionDenied => CtlError::Permission(shown),
        _ => CtlError::Io {
            path: shown,
            error: e,
        },
    })
}

/// Whether something that is not a socket is at `path` (followed, as connect follows it).
fn is_other_than_a_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|meta| !meta.file_type().is_socket())
}

impl Listener {
    pub async fn accept(&mut self) -> std::io::Result<Stream> {
        self.0.accept().await.map(|(stream, _)| stream)
    }
}

/// Creates the socket: a stale socket from a crashed run is replaced, a socket a running
/// daemon answers on and any other file at the path are refused; the mode is set (0660 by
/// default) and the group, if one is configured.
pub fn bind(path: &Path, mode: u32, group: Option<u32>) -> std::io::Result<Listener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let in_the_way = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} {why}; not replacing it", path.display()),
        )
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Only a socket nobody listens on is stale; anything else (a live daemon, a
            // socket we may not even connect to) is left to whoever owns it.
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(in_the_way("is answered by another running tlsrouter"));
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                }
                Err(e) => {
                    return Err(in_the_way(&format!(
                        "is a socket that cannot be checked ({e})"
                    )));
                }
            }
        }
        Ok(_) => return Err(in_the_way("exists and is not a socket")),
        Err(_) => {}
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    Ok(Listener(listener))
}
