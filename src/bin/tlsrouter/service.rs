//! The Windows service: `tlsrouter service install|uninstall|start|stop`, and `service run`,
//! what the Service Control Manager starts. The service runs the daemon exactly as `run`
//! does, under the virtual account `NT SERVICE\tlsrouter`, logging to a file a day in `log\`
//! beside its configuration (`%ProgramData%\tlsrouter\log`); a stop request drains the
//! sessions as Ctrl-C does.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use windows_service::service::{
    ServiceAccess, ServiceControl, ServiceControlAccept, ServiceErrorControl, ServiceExitCode,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

use crate::cli::{EXIT_CONFIG, ServiceAction};
use crate::serve::{LogTo, init_logging, load_config, run_logged};

const NAME: &str = "tlsrouter";
const ERROR_SERVICE_ALREADY_RUNNING: u32 = 1056;
const ERROR_SERVICE_NOT_ACTIVE: u32 = 1062;
const DISPLAY_NAME: &str = "tlsrouter SMTP TLS proxy";
const DESCRIPTION: &str = "Delivers the mail of the local SMTP server (IIS SMTP) over TLS where \
    the receiving server offers it, as its rules and the receiving domains ask.";
/// The account the service runs as: its own virtual account, no password to keep.
const ACCOUNT: &str = r"NT SERVICE\tlsrouter";

/// The configuration `service run` was given, for the service's main function, which the
/// Service Control Manager calls on a thread of its own.
static CONFIG: OnceLock<PathBuf> = OnceLock::new();

define_windows_service!(ffi_service_main, service_main);

pub(crate) fn service(action: ServiceAction) -> ExitCode {
    let config = |given: Option<PathBuf>| given.unwrap_or_else(tlsrouter::config::packaged_config);
    let done = match action {
        ServiceAction::Run { config: given } => return dispatch(config(given)),
        ServiceAction::Install {
            config: given,
            start: false,
        } => install(&config(given)),
        ServiceAction::Install {
            config: given,
            start: true,
        } => {
            let config = config(given);
            install(&config).and_then(|said| Ok(format!("{said}\n{}", start(Some(&config))?)))
        }
        ServiceAction::Uninstall => uninstall(),
        ServiceAction::Start => start(None),
        ServiceAction::Stop => stop(),
    };
    match done {
        Ok(said) => {
            println!("{said}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tlsrouter service: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Registers the service: started at boot, as `NT SERVICE\tlsrouter`, with `config`. Its
/// folder is made first: the configuration and rules shipped beside this program are
/// copied there where none are yet (an admin's own are never replaced, so they outlive
/// upgrades), and the service's account may write there (its log and cache).
fn install(config: &Path) -> Result<String, String> {
    let folder = config.parent().unwrap_or(Path::new("."));
    let mut said = prepare_folder(folder, config)?;
    let loaded = load_config(Some(config)).map_err(|_| {
        format!(
            "{} is not a configuration it can run with; fix it, then install again",
            config.display()
        )
    })?;
    if let Some(rules) = &loaded.rules_file {
        said.extend(copy_if_absent(&shipped("rules/default.yaml"), rules)?);
    }
    let manager = manager(ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE)?;
    let executable = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let info = ServiceInfo {
        name: NAME.into(),
        display_name: DISPLAY_NAME.into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: executable,
        launch_arguments: vec![
            "service".into(),
            "run".into(),
            "--config".into(),
            config.as_os_str().to_owned(),
        ],
        dependencies: vec![],
        account_name: Some(ACCOUNT.into()),
        account_password: None,
    };
    let service = manager
        .create_service(&info, ServiceAccess::CHANGE_CONFIG)
        .map_err(|e| format!("not registered: {}", words(&e)))?;
    service
        .set_description(DESCRIPTION)
        .map_err(|e| format!("registered, without its description: {}", words(&e)))?;
    // The account exists once the service does.
    said.push(grant_folder(folder));
    said.push(format!(
        "service {NAME} registered, started at boot as {ACCOUNT} with {}; start it now with: tlsrouter service start",
        config.display()
    ));
    Ok(said.join("\n"))
}

/// Makes the service's folder and its log folder, and copies the configuration shipped
/// beside this program (`tlsrouter.example.yaml`) to `config` when there is none.
fn prepare_folder(folder: &Path, config: &Path) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(log_folder(config))
        .map_err(|e| format!("{}: {e}", log_folder(config).display()))?;
    copy_if_absent(&shipped("tlsrouter.example.yaml"), config)
        .map(|copied| copied.into_iter().collect())
        .map_err(|e| format!("{e} (in {})", folder.display()))
}

/// A file installed beside this program.
fn shipped(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().unwrap_or(Path::new(".")).join(name)
}

/// Copies `from` to `to` when `to` does not exist and `from` does; says so.
fn copy_if_absent(from: &Path, to: &Path) -> Result<Option<String>, String> {
    if to.exists() || !from.exists() {
        return Ok(None);
    }
    std::fs::copy(from, to)
        .map_err(|e| format!("{} not copied to {}: {e}", from.display(), to.display()))?;
    Ok(Some(format!(
        "{} written from {}",
        to.display(),
        from.display()
    )))
}

/// Lets the service's account change what is in `folder` (icacls, which every Windows
/// has); a failure is said, not fatal: the folder may allow it already.
fn grant_folder(folder: &Path) -> String {
    let grant = format!("{ACCOUNT}:(OI)(CI)M");
    let done = std::process::Command::new("icacls")
        .arg(folder)
        .args(["/grant", &grant])
        .output();
    match done {
        Ok(out) if out.status.success() => {
            format!("{ACCOUNT} may write in {}", folder.display())
        }
        Ok(out) => format!(
            "warning: icacls did not give {ACCOUNT} write access to {}: {}",
            folder.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!(
            "warning: icacls not run ({e}): give {ACCOUNT} write access to {} by hand",
            folder.display()
        ),
    }
}

fn uninstall() -> Result<String, String> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let access = ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE;
    let service = manager
        .open_service(NAME, access)
        .map_err(|e| format!("service {NAME}: {}", words(&e)))?;
    // Stopped first, and waited for: the installer removes the program right after.
    let running = service.query_status();
    if running.is_ok_and(|status| status.current_state != ServiceState::Stopped) {
        let _ = service.stop();
        wait_until_stopped(&service);
    }
    service
        .delete()
        .map_err(|e| format!("not removed: {}", words(&e)))?;
    Ok(format!("service {NAME} removed"))
}

/// How long a stop may take: the sessions' drain (`timeouts.shutdown_drain`, 30 s by
/// default) and the cache written after it.
const STOP_WAIT: Duration = Duration::from_secs(90);

/// Waits until the service says it has stopped, or [`STOP_WAIT`] has passed; whether it did.
/// The Service Control Manager has no call that waits: it is asked again and again.
fn wait_until_stopped(service: &windows_service::service::Service) -> bool {
    let deadline = std::time::Instant::now() + STOP_WAIT;
    while std::time::Instant::now() < deadline {
        match service.query_status() {
            Ok(status) if status.current_state != ServiceState::Stopped => {
                std::thread::sleep(Duration::from_millis(200));
            }
            _ => return true,
        }
    }
    false
}

/// Starts the service; `config`, when the caller knows it, names where its log is.
fn start(config: Option<&Path>) -> Result<String, String> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let service = manager
        .open_service(NAME, ServiceAccess::START)
        .map_err(|e| format!("service {NAME}: {}", words(&e)))?;
    match service.start::<OsString>(&[]) {
        Err(e) if win32_error(&e) == Some(ERROR_SERVICE_ALREADY_RUNNING) => {
            return Ok(format!("service {NAME} is already running"));
        }
        Err(e) => return Err(format!("not started: {}", words(&e))),
        Ok(()) => {}
    }
    let log = match config {
        Some(config) => log_folder(config).display().to_string(),
        None => "log\\ beside its configuration".to_string(),
    };
    Ok(format!("service {NAME} starting; its log is in {log}"))
}

fn stop() -> Result<String, String> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let access = ServiceAccess::STOP | ServiceAccess::QUERY_STATUS;
    let service = manager
        .open_service(NAME, access)
        .map_err(|e| format!("service {NAME}: {}", words(&e)))?;
    match service.stop() {
        Err(e) if win32_error(&e) == Some(ERROR_SERVICE_NOT_ACTIVE) => {
            return Ok(format!("service {NAME} is not running"));
        }
        Err(e) => return Err(format!("not stopped: {}", words(&e))),
        Ok(_) => {}
    }
    match wait_until_stopped(&service) {
        true => Ok(format!("service {NAME} stopped")),
        false => Err(format!(
            "asked to stop, and still draining after {}s (timeouts.shutdown_drain)",
            STOP_WAIT.as_secs()
        )),
    }
}

fn manager(access: ServiceManagerAccess) -> Result<ServiceManager, String> {
    ServiceManager::local_computer(None::<&str>, access).map_err(|e| {
        format!(
            "the Service Control Manager: {} (run it as an administrator)",
            words(&e)
        )
    })
}

/// The Win32 error code of a failed call, if it is one.
fn win32_error(error: &windows_service::Error) -> Option<u32> {
    match error {
        windows_service::Error::Winapi(io) => io.raw_os_error().map(|code| code as u32),
        _ => None,
    }
}

/// A windows-service error in words: the system's message for a Win32 error.
fn words(error: &windows_service::Error) -> String {
    match error {
        windows_service::Error::Winapi(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// The service's log folder: `log\` beside its configuration, so that the service and the
/// admin who installed it find the same one whatever each one's environment says.
fn log_folder(config: &Path) -> PathBuf {
    config.parent().unwrap_or(Path::new(".")).join("log")
}

/// `service run`: hands the process to the Service Control Manager, which calls
/// [`service_main`]; run from a console it fails at once and says so.
fn dispatch(config: PathBuf) -> ExitCode {
    let _ = CONFIG.set(config);
    match service_dispatcher::start(NAME, ffi_service_main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "tlsrouter service run: not started by the Service Control Manager ({}); in a console use: tlsrouter run --config FILE",
                words(&e)
            );
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn service_main(_arguments: Vec<OsString>) {
    let (requests, stop) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
            let _ = requests.send(());
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let Ok(status) = service_control_handler::register(NAME, handler) else {
        return;
    };
    let report = |state, accepted, exit| {
        let _ = status.set_service_status(ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: accepted,
            exit_code: ServiceExitCode::Win32(exit),
            checkpoint: 0,
            wait_hint: Duration::from_secs(60),
            process_id: None,
        });
    };
    report(
        ServiceState::Running,
        ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
        0,
    );
    let path = CONFIG
        .get()
        .cloned()
        .unwrap_or_else(tlsrouter::config::packaged_config);
    let code = match load_config(Some(&path)) {
        Ok(config) => {
            let logging = init_logging(
                config.log.format,
                &config.log.level,
                LogTo::Files(log_folder(&path)),
            );
            match logging {
                Ok(()) => run_logged(config, Some(path), Some(stop)),
                Err(_) => ExitCode::from(EXIT_CONFIG),
            }
        }
        Err(code) => code,
    };
    let exit = if code == ExitCode::SUCCESS { 0 } else { 1 };
    report(ServiceState::Stopped, ServiceControlAccept::empty(), exit);
}
