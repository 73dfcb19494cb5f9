//! The commands the documents show are run against a lab daemon, as an admin would type
//! them on the packaged host. The lab is the documents' world: `partner.example` has one
//! MX, `mx1.partner.example` (127.0.0.1), with a certificate the relay trusts; the
//! packaged paths (`/etc/tlsrouter/tlsrouter.yaml`, its `rules.yaml`, the admin socket)
//! stand for the lab's files.
//!
//! - A `console` block is a session: `$ command` lines, each followed by the output it
//!   shows. The command must succeed and print those lines (stdout, then stderr), spaces
//!   between words as they fall; `…` stands for any text within a line (a time, a port).
//! - In an `sh` block, every line that starts with `tlsrouter` is run and must succeed
//!   (`probe` may also exit 69, "nothing could be probed", as the README says).
//!
//! Before each block the cache is flushed and one message delivered to
//! `b@partner.example` (on a new connection: the lab keeps none open), so every block
//! starts from the same state.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::support::dns::TestZone;
use crate::support::documents::{documents, fenced_blocks, shown};
use crate::support::lab::{DaemonLab, Lab};
use crate::support::mta::{assert_delivered, send_from};
use crate::support::mx::{server, starttls};
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_server::SmtpServer;

/// What stands for any text in a console block's output.
const ANY: char = '…';

struct DocLab {
    lab: DaemonLab,
    /// Receives the documents' mail; kept for the lab's life.
    _mx: SmtpServer,
    /// The folder whose `tlsrouter` is the binary under test.
    bin: PathBuf,
}

async fn doc_lab() -> DocLab {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx1.partner.example"], Validity::Current);
    let mx = server(Ipv4Addr::LOCALHOST, 0, starttls(cert)).await;
    let zone = TestZone::new()
        .mx("partner.example", 10, "mx1.partner.example")
        .a("mx1.partner.example", Ipv4Addr::LOCALHOST);
    let rules =
        std::fs::read_to_string(crate::support::documents::root().join("rules/default.yaml"))
            .expect("the shipped default rules");
    let lab = Lab::new()
        .ca(&ca)
        .zone(zone)
        .mx_port(mx.addr().port())
        .rules(&rules)
        // Each block's message meets the MX anew, so that the cache learns it again.
        .set("delivery.pool.enabled", false)
        .start_daemon()
        .await;
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_tlsrouter"));
    let bin = binary.parent().expect("the binary's folder").to_path_buf();
    DocLab { lab, _mx: mx, bin }
}

impl DocLab {
    /// A command as the documents write it, made to run in the lab: the packaged paths
    /// are the lab's, `ctl` talks to the lab's socket, `probe` and `explain` read the
    /// lab's configuration.
    fn in_lab(&self, command: &str) -> String {
        let config = self.lab.config_file().display().to_string();
        let socket = self.lab.daemon.admin_socket.display().to_string();
        let rules = self.lab.rules_file().display().to_string();
        command
            .replace("/etc/tlsrouter/tlsrouter.yaml", &config)
            .replace("/etc/tlsrouter/rules.yaml", &rules)
            .replace("/run/tlsrouter/admin.sock", &socket)
            .replace(
                "tlsrouter ctl ",
                &format!("tlsrouter ctl --socket {socket} "),
            )
            .replace(
                "tlsrouter probe ",
                &format!("tlsrouter probe --config {config} "),
            )
            .replace(
                "tlsrouter explain ",
                &format!("tlsrouter explain --config {config} "),
            )
    }

    /// What a command printed, with the lab's files named as on the packaged host.
    fn as_packaged(&self, printed: &str) -> String {
        printed
            .replace(
                &self.lab.config_file().display().to_string(),
                "/etc/tlsrouter/tlsrouter.yaml",
            )
            .replace(
                &self.lab.rules_file().display().to_string(),
                "/etc/tlsrouter/rules.yaml",
            )
            .replace(
                &self.lab.daemon.admin_socket.display().to_string(),
                "/run/tlsrouter/admin.sock",
            )
    }

    /// Runs `command` in a shell whose `tlsrouter` is the binary under test: exit code and
    /// what it printed, stdout then stderr.
    async fn run(&self, command: &str) -> (i32, String) {
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let command = self.in_lab(command);
        let dir = self.lab.dir().to_path_buf();
        // On a blocking thread: the daemon's own is another process, but a command may
        // take a while.
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .env("PATH", path)
                .current_dir(dir)
                .output()
        })
        .await
        .expect("join")
        .expect("sh runs");
        let printed = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), self.as_packaged(&printed))
    }

    /// The state every block starts from: an empty cache, then one message delivered.
    async fn reset(&self) {
        let (code, printed) = self.run("tlsrouter ctl cache flush --all").await;
        assert_eq!(code, 0, "flush: {printed}");
        let sent = send_from(self.lab.smtp(), "a@sender.example", &["b@partner.example"]).await;
        assert_delivered(&sent);
    }
}

/// A console block's commands, each with the output it shows.
fn sessions(block: &str) -> Vec<(String, Vec<String>)> {
    let mut sessions: Vec<(String, Vec<String>)> = Vec::new();
    for line in block.lines() {
        match (line.strip_prefix("$ "), sessions.last_mut()) {
            (Some(command), _) => sessions.push((command.to_string(), Vec::new())),
            (None, Some((_, output))) => output.push(line.to_string()),
            (None, None) => panic!("a console block starts with `$ command`: {line}"),
        }
    }
    sessions
}

/// The `tlsrouter` commands of an `sh` block, without their comments.
fn commands(block: &str) -> Vec<String> {
    block
        .lines()
        .filter(|line| line.starts_with("tlsrouter "))
        .map(|line| match line.find(" #") {
            Some(at) => line[..at].trim_end().to_string(),
            None => line.trim_end().to_string(),
        })
        .collect()
}

/// Whether `shown` (with [`ANY`] for any text) is `printed`, spaces between words as they
/// fall.
fn same_line(shown: &str, printed: &str) -> bool {
    let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let (shown, printed) = (words(shown), words(printed));
    let pieces: Vec<&str> = shown.split(ANY).collect();
    let [first, middle @ .., last] = pieces.as_slice() else {
        return shown == printed;
    };
    if printed.len() < first.len() + last.len()
        || !printed.starts_with(first)
        || !printed.ends_with(last)
    {
        return false;
    }
    let mut between = &printed[first.len()..printed.len() - last.len()];
    for piece in middle {
        match between.find(piece) {
            Some(at) => between = &between[at + piece.len()..],
            None => return false,
        }
    }
    true
}

fn same_output(shown: &[String], printed: &str) -> bool {
    let shown: Vec<&str> = shown.iter().map(String::as_str).collect();
    let printed: Vec<&str> = printed.trim_end().lines().collect();
    let shown = trim_trailing_empty(&shown);
    shown.len() == printed.len() && shown.iter().zip(&printed).all(|(s, p)| same_line(s, p))
}

fn trim_trailing_empty<'a>(lines: &'a [&'a str]) -> &'a [&'a str] {
    let end = lines
        .iter()
        .rposition(|l| !l.trim().is_empty())
        .map_or(0, |i| i + 1);
    &lines[..end]
}

#[tokio::test]
async fn every_command_the_documents_show_runs_and_prints_what_they_say() {
    let lab = doc_lab().await;
    let mut ran = 0;
    let mut wrong = Vec::new();
    for document in documents() {
        let text = std::fs::read_to_string(&document).expect("a document");
        for block in fenced_blocks(&text) {
            let place = |at: usize| format!("{}:{}", shown(&document), block.line + at);
            match block.language.as_str() {
                "console" => {
                    lab.reset().await;
                    let mut at = 0;
                    for (command, output) in sessions(&block.text) {
                        let (code, printed) = lab.run(&command).await;
                        if code != 0 || !same_output(&output, &printed) {
                            wrong.push(format!(
                                "{}: `{command}` exited {code} and printed\n{printed}\nwhere the document shows\n{}",
                                place(at),
                                output.join("\n")
                            ));
                        }
                        at += output.len() + 1;
                        ran += 1;
                    }
                }
                "sh" => {
                    let commands = commands(&block.text);
                    if commands.is_empty() {
                        continue;
                    }
                    lab.reset().await;
                    for command in commands {
                        let (code, printed) = lab.run(&command).await;
                        let probe = command.starts_with("tlsrouter probe");
                        if code != 0 && !(probe && code == 69) {
                            wrong.push(format!(
                                "{}: `{command}` exited {code}: {printed}",
                                place(0)
                            ));
                        }
                        ran += 1;
                    }
                }
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    assert!(ran >= 20, "only {ran} commands found in the documents");
}

#[test]
fn a_shown_line_matches_what_was_printed_with_any_text_for_the_ellipsis() {
    assert!(same_line("a  b … d", "a b c c d"));
    assert!(same_line("CLASS …", "CLASS tls-verified"));
    assert!(same_line("… ago", "3s ago"));
    assert!(!same_line("a b … d", "a b c"));
    assert!(!same_line("a b", "a b c"));
    assert!(!same_line("a … c", "b x c"));
    assert!(same_output(
        &["x".into(), "y …".into(), "".into()],
        "x\ny z\n"
    ));
    assert!(!same_output(&["x".into()], "x\ny\n"));
}
