//! The Windows build under Wine: the `tlsrouter.exe` that `.ci/windows` builds
//! (`TLSROUTER_WINDOWS_EXE`), run in the Wine prefix it prepared (`WINEPREFIX`, with the
//! stand-in for the `bcryptprimitives.dll` that Wine 8 lacks, tests/wine/). The tests that
//! use it are ignored by a plain `cargo test`; `.ci/windows` runs them.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

pub struct Wine {
    wine: PathBuf,
    pub exe: PathBuf,
    prefix: PathBuf,
}

impl Wine {
    /// From the environment `.ci/windows` sets; a test without it fails and says so.
    pub fn from_env() -> Wine {
        let var = |name: &str| {
            std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| {
                panic!("{name} is not set: run the Windows tests through .ci/windows, which builds tlsrouter.exe and prepares a Wine prefix")
            })
        };
        let wine =
            std::env::var_os("WINE").map_or_else(|| "/usr/lib/wine/wine64".into(), PathBuf::from);
        let wine_runs = Command::new(&wine).arg("--version").output();
        assert!(
            wine_runs.is_ok_and(|out| out.status.success()),
            "{} does not run: install wine64 (Debian) or set WINE",
            wine.display()
        );
        Wine {
            wine,
            exe: var("TLSROUTER_WINDOWS_EXE"),
            prefix: var("WINEPREFIX"),
        }
    }

    /// `tlsrouter.exe` under Wine, to be given its arguments.
    pub fn tlsrouter(&self) -> Command {
        let mut command = Command::new(&self.wine);
        command
            .arg(&self.exe)
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all");
        command
    }

    /// Wine's `C:` drive.
    pub fn drive_c(&self) -> PathBuf {
        self.prefix.join("drive_c")
    }

    /// `msiexec ARGS` under Wine to its end: exit code and what it printed.
    pub async fn msiexec(&self, args: &[&str]) -> (i32, String) {
        let mut command = Command::new(&self.wine);
        command
            .arg("msiexec")
            .args(args)
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all");
        let out = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("wine runs");
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), said)
    }

    /// Held by a test while it installs the service: there is one service `tlsrouter` per
    /// Wine prefix, so those tests take turns.
    pub async fn service_turn(&self) -> tokio::sync::MutexGuard<'static, ()> {
        static SERVICE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        SERVICE.lock().await
    }

    /// A pipe name of this test's own, for `admin.socket`.
    pub fn pipe(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!(r"\\.\pipe\tlsrouter-test-{}-{n}", std::process::id())
    }

    /// `tlsrouter.exe ctl --json --socket PIPE ARGS`: the answer, or what it said.
    pub async fn ctl(&self, pipe: &str, args: &[&str]) -> Result<Value, String> {
        let mut command = self.tlsrouter();
        command.args(["ctl", "--json", "--socket", pipe]).args(args);
        let out = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("wine runs");
        match out.status.success() {
            true => serde_json::from_slice(&out.stdout).map_err(|e| e.to_string()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }

    /// `tlsrouter.exe ARGS` to its end: exit code, stdout, stderr.
    pub async fn run(&self, args: &[&str]) -> (i32, String, String) {
        let mut command = self.tlsrouter();
        command.args(args);
        let out = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("wine runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}
