//! What an admin meets when first running tlsrouter: the real binary, its messages and
//! exit statuses, `ctl` against a real daemon, and its log on a pipe.

mod support;

use std::process::Command;

/// Settings for a daemon that never needs to reach a remote.
const NO_REMOTES: &str =
    "tls: { system_roots: false }\nresolver: { nameservers: [\"127.0.0.1:9\"] }\n";

/// Runs `tlsrouter ARGS` to its end: exit code, stdout, stderr.
fn tlsrouter(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
        .args(args)
        .output()
        .expect("run tlsrouter");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// --- error messages ----------------------------------------------------------------------

/// How often `needle` occurs in `text`.
fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn a_missing_file_is_reported_once_with_its_cause_once() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("missing.yaml");
    let missing = missing.to_str().expect("path");
    let rules_missing = dir.path().join("with-missing-rules.yaml");
    std::fs::write(
        &rules_missing,
        format!("{NO_REMOTES}rules_file: \"{missing}\"\n"),
    )
    .expect("write");
    let rules_missing = rules_missing.to_str().expect("path");
    for args in [
        vec!["check-config", missing],
        vec!["run", "--config", missing],
        vec!["check", missing],
        vec!["explain", "--rules", missing, "--rcpt", "a@b.test"],
        vec!["probe", "b.test", "--config", missing],
        vec!["check-config", rules_missing],
    ] {
        let (code, _, err) = tlsrouter(&args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert_eq!(count(&err, "missing.yaml"), 1, "{args:?}: {err}");
        assert_eq!(count(&err, "No such file"), 1, "{args:?}: {err}");
    }
}

// --- ctl with a wrong --socket -----------------------------------------------------------

#[cfg(unix)]
#[test]
fn ctl_says_when_its_socket_path_is_not_a_socket() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("admin.sock");
    std::fs::write(&file, "").expect("write");
    for path in [&file, &dir.path().to_path_buf()] {
        let path = path.to_str().expect("path");
        let (code, _, err) = tlsrouter(&["ctl", "--socket", path, "stats"]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(path), "{err}");
        assert!(err.contains("not a socket"), "{err}");
        assert!(!err.contains("not running"), "{err}");
    }
    // A path with nothing there is still "not running".
    let nothing = dir.path().join("nothing.sock");
    let (code, _, err) = tlsrouter(&["ctl", "--socket", nothing.to_str().expect("path"), "stats"]);
    assert_eq!(code, 2);
    assert!(err.contains("not running"), "{err}");
}
