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
        ServiceAction::Install { config: given } => install(&config(given)),
        ServiceAction::Uninstall => uninstall(),
        ServiceAction::Start => start(&config(None)),
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

/// Registers the service: started at boot, as `NT SERVICE\tlsrouter`, with `config`.
fn install(config: &std::path::Path) -> Result<String, String> {
    load_config(Some(config)).map_err(|_| {
        format!(
            "{} is not a configuration it can run with; fix it, then install again",
            config.display()
        )
    })?;
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
    Ok(format!(
        "service {NAME} registered, started at boot as {ACCOUNT} with {}; start it now with: tlsrouter service start",
        config.display()
    ))
}

fn uninstall() -> Result<String, String> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let access = ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE;
    let service = manager
        .open_service(NAME, access)
        .map_err(|e| format!("service {NAME}: {}", words(&e)))?;
    let running = service.query_status();
    if running.is_ok_and(|status| status.current_state != ServiceState::Stopped) {
        let _ = service.stop();
    }
    service
        .delete()
        .map_err(|e| format!("not removed: {}", words(&e)))?;
    Ok(format!(
        "service {NAME} removed (it is gone once it has stopped)"
    ))
}

fn start(config: &Path) -> Result<String, String> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let service = manager
        .open_service(NAME, ServiceAccess::START)
        .map_err(|e| format!("service {NAME}: {}", words(&e)))?;
    service
        .start::<OsString>(&[])
        .map_err(|e| format!("not started: {}", words(&e)))?;
    Ok(format!(
        "service {NAME} starting; its log is in {} (for the installed configuration)",
        log_folder(config).display()
    ))
}

fn stop() -> Result<String, String> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let service = manager
        .open_service(NAME, ServiceAccess::STOP)
        .map_err(|e| format!("service {NAME}: {}", words(&e)))?;
    service
        .stop()
        .map_err(|e| format!("not stopped: {}", words(&e)))?;
    Ok(format!(
        "service {NAME} stopping: the sessions drain first (timeouts.shutdown_drain)"
    ))
}

fn manager(access: ServiceManagerAccess) -> Result<ServiceManager, String> {
    ServiceManager::local_computer(None::<&str>, access).map_err(|e| {
        format!(
            "the Service Control Manager: {} (run it as an administrator)",
            words(&e)
        )
    })
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
