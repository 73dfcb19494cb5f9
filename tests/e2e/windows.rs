//! The Windows build, run under Wine: `tlsrouter.exe` relays cut-through to a STARTTLS
//! server and to a TLS 1.0-only one (through the legacy stack, its OpenSSL built in),
//! answers `ctl` over its named pipe, takes a rules edit without a restart, drains on
//! Ctrl-C; and as the Windows service it is installed, started, asked, stopped and removed.
//!
//! Not checked under Wine, which does not do either: that the pipe's access control list
//! turns away a user who is neither an administrator nor the service's account, and that
//! errors reach the Windows Event Log.
//!
//! Ignored by a plain `cargo test` (they need the Windows build and Wine); `.ci/windows`
//! builds `tlsrouter.exe`, prepares a Wine prefix and runs them.

use std::net::Ipv4Addr;

use crate::support::dns::TestZone;
use crate::support::lab::Lab;
use crate::support::mta::{assert_delivered, send};
use crate::support::mx::{loopback, server, starttls, tls10_only};
use crate::support::pki::{TestCa, Validity};
use crate::support::wine::Wine;

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The shipped default rules: opportunistic TLS, the legacy stack for TLS 1.0 servers.
const DEFAULT_RULES: &str = include_str!("../../rules/default.yaml");

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the Windows build and Wine: .ci/windows runs it"]
async fn the_windows_build_relays_answers_ctl_takes_a_rules_edit_and_drains() {
    let wine = Wine::from_env();
    let ca = TestCa::new();
    let modern = server(
        LOCALHOST,
        0,
        starttls(ca.leaf(&["mx.modern.test"], Validity::Current)),
    )
    .await;
    let port = modern.addr().port();
    let old = server(
        loopback(2),
        port,
        tls10_only(ca.leaf(&["mx.old.test"], Validity::Current)),
    )
    .await;
    let zone = TestZone::new()
        .mx("modern.test", 10, "mx.modern.test")
        .a("mx.modern.test", LOCALHOST)
        .mx("old.test", 10, "mx.old.test")
        .a("mx.old.test", loopback(2));
    let mut lab = Lab::new()
        .ca(&ca)
        .zone(zone)
        .mx_port(port)
        .rules(DEFAULT_RULES)
        .start_daemon_under_wine(&wine)
        .await;
    let pipe = lab.daemon.admin_socket.display().to_string();

    assert_delivered(&send(lab.smtp(), &["a@modern.test"]).await);
    let line = lab.daemon.wait_for_transaction().await;
    assert_eq!(
        (&line["route"], &line["class"]),
        (&"tls".into(), &"tls-verified".into()),
        "{line}"
    );
    let got = modern.messages();
    assert_eq!(
        got[0].tls.as_ref().map(|t| t.version.as_str()),
        Some("TLSv1.3")
    );

    assert_delivered(&send(lab.smtp(), &["b@old.test"]).await);
    let line = lab.daemon.wait_for_transaction().await;
    assert_eq!(
        line["tls_version"], "TLSv1.0",
        "encrypted by the legacy stack: {line}"
    );
    assert!(old.messages()[0].tls.is_some(), "TLS 1.0 on the wire");

    let stats = wine
        .ctl(&pipe, &["stats"])
        .await
        .expect("ctl stats over the pipe");
    assert_eq!(stats["result"]["delivered_tls_verified"], 1, "{stats}");
    assert_eq!(stats["result"]["delivered_tls_legacy"], 1, "{stats}");
    let listed = wine
        .ctl(&pipe, &["cache", "list"])
        .await
        .expect("ctl cache list");
    let classes: Vec<(&str, &str)> = (listed["result"]["entries"].as_array())
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["host"].as_str().unwrap_or(""),
                e["class"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(
        classes.contains(&("mx.modern.test", "tls-verified")),
        "{classes:?}"
    );
    assert!(
        classes.contains(&("mx.old.test", "tls-legacy")),
        "{classes:?}"
    );

    // An edit of the rule file is taken while it runs; no signal on Windows.
    let edited = DEFAULT_RULES.replace("name: default", "name: edited-default");
    crate::support::daemon::replace_file(lab.rules_file(), &edited);
    lab.daemon
        .wait_for_event(&[("event", "rules.reloaded"), ("why", "file changed")])
        .await;
    let rules = wine
        .ctl(&pipe, &["rules", "show"])
        .await
        .expect("ctl rules show");
    assert_eq!(
        rules["result"]["rules"][0]["name"], "edited-default",
        "{rules}"
    );

    // Ctrl-C (Wine turns SIGINT into it): the sessions drain, the daemon stops cleanly.
    lab.daemon.signal("INT");
    lab.daemon.wait_for_event(&[("event", "stopped")]).await;
    assert!(lab.daemon.exit_status().success());
}

#[tokio::test]
#[ignore = "needs the Windows build and Wine: .ci/windows runs it"]
async fn the_windows_service_is_installed_started_asked_stopped_and_removed() {
    let wine = Wine::from_env();
    let dir = tempfile::tempdir().expect("a folder");
    let pipe = wine.pipe();
    let port = crate::support::metrics::free_port();
    let config = dir.path().join("tlsrouter.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nhostname: relay.test\ntls: {{ system_roots: false }}\nresolver: {{ nameservers: [\"127.0.0.1:9\"], dane: off }}\nadmin: {{ socket: '{pipe}' }}\n"
        ),
    )
    .expect("the configuration");
    // The service starts in C:\windows\system32: its path names the drive (Wine's Z: is /).
    let config = format!(r"Z:{}", config.display()).replace('/', r"\");

    // Removed at the end, also when the test fails half-way; one a failed run left in the
    // prefix is removed first.
    let _turn = wine.service_turn().await;
    let _ = wine.run(&["service", "uninstall"]).await;
    let _installed = Installed(&wine);
    let (code, out, err) = wine.run(&["service", "install", "--config", &config]).await;
    assert_eq!(code, 0, "service install: {out}{err}");
    let (code, out, err) = wine.run(&["service", "start"]).await;
    assert_eq!(code, 0, "service start: {out}{err}");

    // The service takes a moment to start: ctl says "not running" until its pipe is there.
    let mut stats = Err(String::new());
    for _ in 0..60 {
        stats = wine.ctl(&pipe, &["stats"]).await;
        if stats.is_ok() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let stats = stats.expect("the service answers ctl over its pipe");
    assert_eq!(stats["result"]["transactions"], 0, "{stats}");

    let (code, out, err) = wine.run(&["service", "stop"]).await;
    assert_eq!(code, 0, "service stop: {out}{err}");
    let (code, out, err) = wine.run(&["service", "uninstall"]).await;
    assert_eq!(code, 0, "service uninstall: {out}{err}");
    let (code, _, err) = wine.run(&["service", "start"]).await;
    assert!(
        code != 0 && err.contains("service tlsrouter"),
        "removed: {err}"
    );

    let log = std::fs::read_dir(dir.path().join("log"))
        .expect("the service's log folder beside its configuration")
        .filter_map(Result::ok)
        .map(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default())
        .collect::<String>();
    assert!(log.contains("tlsrouter listening"), "{log}");
}

/// Removes the service when dropped (it may be gone already).
struct Installed<'a>(&'a Wine);

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        let _ = self.0.tlsrouter().args(["service", "uninstall"]).output();
    }
}

/// The installer built by packaging/windows/build-msi (wixl), as `version`.
fn installer(wine: &Wine, dir: &std::path::Path, version: &str) -> String {
    let msi = dir.join(format!("tlsrouter-{version}.msi"));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = std::process::Command::new(root.join("packaging/windows/build-msi"))
        .arg(&wine.exe)
        .arg(&msi)
        .arg(version)
        .output()
        .expect("packaging/windows/build-msi runs (it needs wixl, from msitools)");
    assert!(
        built.status.success(),
        "build-msi: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    format!(r"Z:{}", msi.display()).replace('/', r"\")
}

/// `ctl stats` over `pipe` once the service has started (it answers "not running" until
/// its pipe is there; each try is a process of its own under Wine, no sleep).
async fn stats_once_started(wine: &Wine, pipe: &str) -> serde_json::Value {
    let mut stats = Err(String::new());
    for _ in 0..60 {
        stats = wine.ctl(pipe, &["stats"]).await;
        if stats.is_ok() {
            break;
        }
        tokio::task::yield_now().await;
    }
    stats.expect("the service answers ctl over its pipe")
}

/// The MSI installs the program, the rule lists and the example configuration, makes the
/// service's folder (the shipped rules copied where the configuration names a file not
/// there yet, an admin's own configuration kept), starts the service; an upgrade keeps
/// the configuration; removal takes the program and the service away and leaves the
/// admin's configuration.
#[tokio::test]
#[ignore = "needs the Windows build, Wine and wixl: .ci/windows runs it"]
async fn the_installer_sets_up_the_service_keeps_the_configuration_and_removes_itself() {
    let wine = Wine::from_env();
    let dir = tempfile::tempdir().expect("a folder");
    let first = installer(&wine, dir.path(), "1.0.0");
    let second = installer(&wine, dir.path(), "1.0.1");
    let _turn = wine.service_turn().await;
    // What a failed run may have left in the prefix.
    for msi in [&second, &first] {
        let _ = wine.msiexec(&["/x", msi, "/qn"]).await;
    }
    let _ = wine.run(&["service", "uninstall"]).await;
    let _installed = Installed(&wine);

    // The admin's configuration, there before the installer (a test's own port and pipe).
    let data = wine.drive_c().join("ProgramData/tlsrouter");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).expect("the service's folder");
    let pipe = wine.pipe();
    let port = crate::support::metrics::free_port();
    let config = format!(
        "listen: 127.0.0.1:{port}\nhostname: relay.test\ntls: {{ system_roots: false }}\nresolver: {{ nameservers: [\"127.0.0.1:9\"], dane: off }}\nadmin: {{ socket: '{pipe}' }}\nrules_file: 'C:\\ProgramData\\tlsrouter\\rules.yaml'\ncache: {{ file: 'C:\\ProgramData\\tlsrouter\\cache.json' }}\n"
    );
    std::fs::write(data.join("tlsrouter.yaml"), &config).expect("the configuration");

    let (code, said) = wine.msiexec(&["/i", &first, "/qn"]).await;
    assert_eq!(code, 0, "msiexec /i: {said}");
    let program = wine.drive_c().join("Program Files/tlsrouter");
    for file in [
        "tlsrouter.exe",
        "tlsrouter.example.yaml",
        "rules/default.yaml",
        "rules/strict.yaml",
    ] {
        assert!(program.join(file).is_file(), "{file} installed");
    }
    let rules = std::fs::read_to_string(data.join("rules.yaml")).expect("rules.yaml copied");
    assert_eq!(rules, DEFAULT_RULES);
    let kept = std::fs::read_to_string(data.join("tlsrouter.yaml")).expect("the configuration");
    assert_eq!(kept, config, "the admin's configuration is never replaced");
    assert_eq!(
        stats_once_started(&wine, &pipe).await["result"]["transactions"],
        0
    );
    // The example configuration is one the service can run with, here.
    let example = r"C:\Program Files\tlsrouter\tlsrouter.example.yaml";
    let (code, out, err) = wine.run(&["check-config", example]).await;
    assert_eq!(code, 0, "{out}{err}");

    let (code, said) = wine.msiexec(&["/i", &second, "/qn"]).await;
    assert_eq!(code, 0, "upgrade: {said}");
    let kept = std::fs::read_to_string(data.join("tlsrouter.yaml")).expect("the configuration");
    assert_eq!(kept, config, "kept on upgrade");
    stats_once_started(&wine, &pipe).await;

    let (code, said) = wine.msiexec(&["/x", &second, "/qn"]).await;
    assert_eq!(code, 0, "msiexec /x: {said}");
    assert!(
        !program.join("tlsrouter.exe").exists(),
        "the program is removed"
    );
    let (code, _, err) = wine.run(&["service", "start"]).await;
    assert!(
        code != 0 && err.contains("service tlsrouter"),
        "the service is removed: {err}"
    );
    assert!(
        data.join("tlsrouter.yaml").is_file(),
        "the admin's configuration stays"
    );
}
