//! The admin endpoint on Windows: a named pipe (`\\.\pipe\tlsrouter-admin` by default)
//! whose access control list admits SYSTEM, the Administrators and the account the daemon
//! runs as (the pipe's owner), and no client from another machine.

use std::ffi::c_void;
use std::path::Path;
use std::time::Duration;

use tokio::net::windows::named_pipe::{ClientOptions, NamedPipeServer, ServerOptions};
use windows_sys::Win32::Foundation::{ERROR_PIPE_BUSY, LocalFree};
use windows_sys::Win32::Security::Authorization::{
    ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
};
use windows_sys::Win32::Security::SECURITY_ATTRIBUTES;

use crate::admin::client::CtlError;

/// Protected DACL: full access for SYSTEM, the Administrators and the owner (the daemon's
/// own account, the service's virtual account when it runs as the service).
const ACL: &str = "D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;OW)";

pub type Stream = tokio::net::windows::named_pipe::NamedPipeClient;

pub struct Listener {
    name: String,
    acl: Acl,
    /// The instance the next client connects to.
    next: NamedPipeServer,
}

/// A security descriptor made from [`ACL`], freed when dropped.
struct Acl(*mut c_void);

// The descriptor is only read by CreateNamedPipe, from whichever thread holds the listener.
unsafe impl Send for Acl {}

impl Acl {
    fn new() -> std::io::Result<Acl> {
        let text: Vec<u16> = ACL.encode_utf16().chain(Some(0)).collect();
        let mut descriptor = std::ptr::null_mut();
        // SAFETY: `text` is NUL-terminated; the descriptor is written to `descriptor`.
        let made = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                text.as_ptr(),
                SDDL_REVISION_1,
                &mut descriptor,
                std::ptr::null_mut(),
            )
        };
        if made == 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Acl(descriptor))
    }

    /// A pipe instance under this descriptor.
    fn create(&self, name: &str, first: bool) -> std::io::Result<NamedPipeServer> {
        let mut attributes = SECURITY_ATTRIBUTES {
            nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
            lpSecurityDescriptor: self.0,
            bInheritHandle: 0,
        };
        let mut options = ServerOptions::new();
        options
            .first_pipe_instance(first)
            .reject_remote_clients(true);
        // SAFETY: `attributes` is a valid SECURITY_ATTRIBUTES for the call's duration.
        unsafe {
            options.create_with_security_attributes_raw(
                name,
                (&mut attributes as *mut SECURITY_ATTRIBUTES).cast(),
            )
        }
    }
}

impl Drop for Acl {
    fn drop(&mut self) {
        // SAFETY: allocated by ConvertStringSecurityDescriptorToSecurityDescriptorW.
        unsafe { LocalFree(self.0) };
    }
}

/// Creates the pipe; a pipe of that name that exists already (another running tlsrouter)
/// is refused.
pub fn bind(path: &Path) -> std::io::Result<Listener> {
    let name = path.display().to_string();
    let acl = Acl::new()?;
    let next = acl.create(&name, true).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{name} is served by another running tlsrouter; not replacing it"),
        ),
        _ => e,
    })?;
    Ok(Listener { name, acl, next })
}

impl Listener {
    pub async fn accept(&mut self) -> std::io::Result<NamedPipeServer> {
        self.next.connect().await?;
        let fresh = self.acl.create(&self.name, false)?;
        Ok(std::mem::replace(&mut self.next, fresh))
    }
}

/// Connects `ctl` to the pipe `path`, telling apart why it cannot; while every instance
/// is busy with another client, tries again for up to a few seconds.
pub async fn connect(path: &Path) -> Result<Stream, CtlError> {
    let shown = path.display().to_string();
    for _ in 0..100 {
        match ClientOptions::new().open(path.as_os_str()) {
            Ok(stream) => return Ok(stream),
            Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(match e.kind() {
                    std::io::ErrorKind::NotFound => CtlError::NotRunning(shown),
                    std::io::ErrorKind::PermissionDenied => CtlError::Permission(shown),
                    _ => CtlError::Io {
                        path: shown,
                        error: e,
                    },
                });
            }
        }
    }
    Err(CtlError::Io {
        path: shown,
        error: std::io::Error::other("every instance of the pipe stayed busy"),
    })
}
