//! A real Postfix, configured with the snippets in examples/postfix/, relays to tlsrouter as
//! its smart host, exactly as the README tells an admin to set it up. tlsrouter finds the
//! receiving servers through a real DNS server; all of it on loopback. What the admin would
//! look at is what the tests read: Postfix's own queue (`postqueue -j`), the bounce its
//! sender gets, and what the receiving servers were sent.
//!
//! Each test runs its own Postfix instance (`postfix -c DIR`) with its own configuration
//! and queue directories, stopped and removed at the end, and never touches the machine's
//! own Postfix. Postfix must be installed (Debian: the `postfix` package, which `.ci/run`
//! installs) and the tests must run as root, as `postfix start` requires: otherwise they
//! fail and say why.
//!
//! Waiting on Postfix is waiting on its queue: every move of a queue file, every deferral
//! reason written and every line of its log wakes the waiter (inotify), which then reads
//! the queue again; nothing waits on a timer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::dns::{DnsServer, TestZone};
use crate::support::pki::{TestCa, Validity};
use crate::support::proxy::{start_proxy, test_config};
use crate::support::smtp_server::{Action, Received, ServerBehaviour, SmtpServer, Step};
use futures_util::StreamExt;
use serde_json::Value;

/// The snippets an admin copies; the tests use them as they are, with tlsrouter's port.
const MAIN_CF: &str = include_str!("../../examples/postfix/main.cf");
const MASTER_CF: &str = include_str!("../../examples/postfix/master.cf");
const DOCUMENTED_RELAYHOST: &str = "[127.0.0.1]:10025";
/// The documented transport's TLS setting, for a hop in clear.
const PLAIN_HOP: &str = "-o smtp_tls_security_level=none";

/// How long Postfix may take to do what a test waits for; a guard against a hung test.
const WAIT: Duration = Duration::from_secs(60);

const MX1: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const MX2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

const SENDER: &str = "alice@sender.test";

/// The instance's own main.cf lines: its directories, its name, and no way off loopback.
/// The documented snippet follows them unchanged but for the port.
pub(crate) fn instance_main_cf(dir: &Path) -> String {
    format!(
        "{}smtp_dns_support_level = disabled\n",
        instance_directories_cf(dir)
    )
}

/// Its directories and name, listening on loopback only, IPv4: what every instance has.
/// Only `flush` is hashed (Postfix refuses an empty list), so that the queue files lie in
/// the directories a waiting test watches, not in subdirectories made later.
pub(crate) fn instance_directories_cf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "compatibility_level = 3.6\n\
         queue_directory = {d}/spool\n\
         data_directory = {d}/data\n\
         maillog_file = {d}/maillog\n\
         maillog_file_prefixes = {d}\n\
         myhostname = postfix.test\n\
         mydestination =\n\
         alias_maps =\n\
         alias_database =\n\
         inet_interfaces = loopback-only\n\
         inet_protocols = ipv4\n\
         hash_queue_names = flush\n"
    )
}

/// Postfix's own services, none of them listening on the network and none chrooted (the
/// queue is in a temporary directory). The documented transport follows.
pub(crate) const INSTANCE_MASTER_CF: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

/// A Postfix instance of our own. Dropping it stops Postfix and removes its directories,
/// whether the test passed or not.
pub(crate) struct Postfix {
    dir: tempfile::TempDir,
}

/// Postfix's commands live in /usr/sbin on Debian, which is not on every user's PATH.
fn postfix_command(name: &str) -> Command {
    let sbin = Path::new("/usr/sbin").join(name);
    Command::new(if sbin.exists() {
        sbin
    } else {
        PathBuf::from(name)
    })
}

fn output(command: &mut Command, what: &str) -> Output {
    command.output().unwrap_or_else(|e| {
        panic!(
            "{what}: {e}. The Postfix tests need Debian's postfix package \
             (apt-get install postfix; .ci/run installs it)"
        )
    })
}

/// How Postfix hands mail to tlsrouter.
#[derive(Clone, Copy, Default)]
struct Hop {
    /// tlsrouter offers STARTTLS (`inbound.tls`) and Postfix requires it.
    encrypt: bool,
    /// Without the snippet's recipient limit: all of a message's recipients in one
    /// transaction, as Postfix does by default.
    batch: bool,
}

/// The snippet's line that sends each recipient in a transaction of its own.
const RECIPIENT_LIMIT: &str = "tlsrouter_destination_recipient_limit = 1\n";

/// A deferred message as `postqueue -j` shows it, and why its first recipient waits.
pub(crate) struct Deferral {
    pub(crate) message: Value,
    pub(crate) reason: String,
}

impl Postfix {
    /// Configures and starts an instance relaying to tlsrouter at `relay`. With `encrypt`,
    /// the hop to tlsrouter must be TLS, as the snippet says to set when tlsrouter has
    /// `inbound.tls`.
    fn start_relaying(relay: SocketAddr, hop: Hop) -> Postfix {
        let documented = format!("[127.0.0.1]:{}", relay.port());
        assert_eq!(
            MAIN_CF.matches(DOCUMENTED_RELAYHOST).count(),
            1,
            "examples/postfix/main.cf should name {DOCUMENTED_RELAYHOST} once"
        );
        let main_cf = |root: &Path| {
            let snippet = MAIN_CF.replace(DOCUMENTED_RELAYHOST, &documented);
            // As the snippet allows: one transaction for all of a message's recipients.
            let snippet = match hop.batch {
                false => snippet,
                true => {
                    assert_eq!(
                        snippet.matches(RECIPIENT_LIMIT).count(),
                        1,
                        "{RECIPIENT_LIMIT:?} once"
                    );
                    snippet.replace(RECIPIENT_LIMIT, "")
                }
            };
            format!("{}{snippet}", instance_main_cf(root))
        };
        let master_cf = match hop.encrypt {
            false => MASTER_CF.to_string(),
            true => {
                assert_eq!(
                    MASTER_CF.matches(PLAIN_HOP).count(),
                    1,
                    "{PLAIN_HOP:?} once"
                );
                let tlsmgr = "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n";
                let encrypted = "-o smtp_tls_security_level=encrypt\n  -o smtp_tls_loglevel=1";
                format!("{tlsmgr}{}", MASTER_CF.replace(PLAIN_HOP, encrypted))
            }
        };
        Postfix::start_with(&main_cf, &format!("{INSTANCE_MASTER_CF}{master_cf}"), None)
    }

    /// Configures and starts an instance with the main.cf `main_cf` writes for the
    /// instance's directory, and `master_cf`; inside the network namespace `netns` if given.
    pub(crate) fn start_with(
        main_cf: &dyn Fn(&Path) -> String,
        master_cf: &str,
        netns: Option<&str>,
    ) -> Postfix {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path();
        // Postfix's unprivileged daemons must reach their files below it.
        set_mode(root, 0o755);
        for sub in ["etc", "spool", "data"] {
            std::fs::create_dir(root.join(sub)).expect("create Postfix directory");
        }
        let mut chown = Command::new("chown");
        chown.arg("postfix").arg(root.join("data"));
        let chowned = output(&mut chown, "chown postfix");
        assert!(
            chowned.status.success(),
            "cannot give the data directory to the postfix user (is postfix installed, and \
             are the tests run as root?): {}",
            String::from_utf8_lossy(&chowned.stderr)
        );
        std::fs::write(root.join("etc/main.cf"), main_cf(root)).expect("write main.cf");
        std::fs::write(root.join("etc/master.cf"), master_cf).expect("write master.cf");
        let postfix = Postfix { dir };
        let mut start = match netns {
            // The master and every daemon it starts run inside.
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]);
                command.arg(postfix_command("postfix").get_program());
                command.arg("-c").arg(postfix.config_dir());
                command
            }
            None => postfix.command("postfix"),
        };
        let started = output(start.arg("start"), "postfix start");
        assert!(
            started.status.success(),
            "Postfix did not start (the tests must run as root): {}{}\n{}",
            String::from_utf8_lossy(&started.stdout),
            String::from_utf8_lossy(&started.stderr),
            postfix.maillog()
        );
        postfix
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// `name` pointed at this instance's configuration (`-c DIR`, or `-C DIR` for sendmail).
    fn command(&self, name: &str) -> Command {
        let mut command = postfix_command(name);
        let flag = if name == "sendmail" { "-C" } else { "-c" };
        command.arg(flag).arg(self.config_dir());
        command
    }

    /// What the instance logged so far (its own maillog file).
    pub(crate) fn maillog(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default();
        format!("--- Postfix's maillog ---\n{log}")
    }

    /// Injects a message with Postfix's `sendmail`, as an application on the host would.
    pub(crate) async fn sendmail(&self, from: &str, to: &[&str], message: &str) {
        self.sendmail_with(&[], from, to, message).await;
    }

    /// As [`Postfix::sendmail`], with more of sendmail's options (`-N`, `-R`, `-V` for DSN).
    pub(crate) async fn sendmail_with(
        &self,
        options: &[&str],
        from: &str,
        to: &[&str],
        message: &str,
    ) {
        let mut command = self.command("sendmail");
        command.args(options);
        command.arg("-f").arg(from).arg("--").args(to);
        let message = message.to_string();
        let out = tokio::task::spawn_blocking(move || -> std::io::Result<Output> {
            use std::io::Write;
            let mut child = command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .ok_or_else(|| std::io::Error::other("no stdin"))?
                .write_all(message.as_bytes())?;
            child.wait_with_output()
        })
        .await
        .expect("sendmail task")
        .expect("run sendmail");
        assert!(
            out.status.success(),
            "sendmail: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.maillog()
        );
    }

    /// The queue as `postqueue -j` shows it: one JSON object per message.
    pub(crate) async fn queue(&self) -> Vec<Value> {
        let mut command = self.command("postqueue");
        command.arg("-j");
        let out = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("postqueue task")
            .expect("run postqueue -j");
        assert!(
            out.status.success(),
            "postqueue -j: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).expect("postqueue -j prints JSON lines"))
            .collect()
    }

    /// Waits until `found` finds what it looks for in the queue; the queue is read again
    /// whenever Postfix changes it. `what` names it for the failure message.
    async fn wait_for_queue<T>(&self, what: &str, found: impl Fn(&[Value]) -> Option<T>) -> T {
        // Watching starts before the first look, so that no change falls in between.
        let mut changes = self.spool_changes();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let queue = self.queue().await;
            if let Some(value) = found(&queue) {
                return value;
            }
            let changed = tokio::time::timeout_at(deadline, changes.next()).await;
            assert!(
                matches!(changed, Ok(Some(Ok(_)))),
                "{what}: not within {WAIT:?} ({changed:?}); queue: {queue:?}\n{}",
                self.maillog()
            );
        }
    }

    /// Every change Postfix makes to its queue: a file arriving in, moving between or
    /// leaving maildrop, incoming, active and deferred; a deferral reason written; a line
    /// logged.
    fn spool_changes(&self) -> inotify::EventStream<[u8; 4096]> {
        use inotify::{Inotify, WatchMask};
        let inotify = Inotify::init().expect("inotify");
        let spool = self.dir.path().join("spool");
        let moves = WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::CLOSE_WRITE;
        for queue in [
            "maildrop", "incoming", "active", "deferred", "defer", "bounce",
        ] {
            (inotify.watches())
                .add(spool.join(queue), moves)
                .unwrap_or_else(|e| panic!("watching {queue}: {e}"));
        }
        (inotify.watches())
            .add(self.dir.path(), WatchMask::MODIFY | WatchMask::CREATE)
            .expect("watching the maillog");
        inotify
            .into_event_stream([0; 4096])
            .expect("an inotify event stream")
    }

    /// Waits until the queue holds a deferred message for `recipient` whose reason says
    /// `says`, and returns it with that reason.
    pub(crate) async fn deferral_of(&self, recipient: &str, says: &str) -> Deferral {
        let what = format!("a deferral of {recipient} saying {says:?}");
        self.wait_for_queue(&what, |queue| {
            let waiting = queue.iter().filter(|m| m["queue_name"] == "deferred");
            let mut found = waiting.flat_map(|m| {
                let recipients = m["recipients"].as_array().cloned().unwrap_or_default();
                recipients.into_iter().map(move |r| (m.clone(), r))
            });
            found.find_map(|(message, r)| {
                let reason = r["delay_reason"].as_str().unwrap_or_default();
                (r["address"] == recipient && reason.contains(says)).then(|| Deferral {
                    reason: reason.to_string(),
                    message,
                })
            })
        })
        .await
    }

    /// A recipient tlsrouter sent to a transaction of its own (`452 4.5.3`), tried again
    /// at once as the next queue run would; the reason Postfix then keeps it for, which
    /// must say `says`.
    pub(crate) async fn retried_alone(&self, recipient: &str, says: &str) -> String {
        let Deferral { message, .. } = self.deferral_of(recipient, "4.5.3").await;
        let queue_id = message["queue_id"].as_str().expect("a queue id");
        self.retry_now(queue_id).await;
        self.deferral_of(recipient, says).await.reason
    }

    /// Waits until the queue holds a deferred message, and returns it with the reason
    /// Postfix gives for its first recipient.
    pub(crate) async fn deferral(&self) -> Deferral {
        self.wait_for_queue("a deferred message", |queue| {
            let message = queue.iter().find(|m| m["queue_name"] == "deferred")?;
            let reason = message["recipients"][0]["delay_reason"].as_str();
            Some(Deferral {
                reason: reason.unwrap_or_default().to_string(),
                message: message.clone(),
            })
        })
        .await
    }

    /// Waits until `server` has `n` completed messages; on failure, says what Postfix
    /// holds and logged, and `context` (another log, say).
    pub(crate) async fn wait_for_messages(
        &self,
        server: &SmtpServer,
        n: usize,
        context: impl Fn() -> String,
    ) -> Vec<Received> {
        match tokio::time::timeout(WAIT, server.messages_reaching(n)).await {
            Ok(messages) => messages,
            Err(_) => panic!(
                "{} message(s) arrived within {WAIT:?}, expected {n}; queue: {:?}\n{}\n{}",
                server.messages().len(),
                self.queue().await,
                self.maillog(),
                context()
            ),
        }
    }

    /// Waits until the queue is empty: every message delivered or bounced.
    pub(crate) async fn wait_for_empty_queue(&self) {
        (self.wait_for_queue("an empty queue", |queue| queue.is_empty().then_some(()))).await;
    }

    /// Asks Postfix to try a deferred message again now (`postqueue -i ID`).
    pub(crate) async fn retry_now(&self, queue_id: &str) {
        let mut command = self.command("postqueue");
        command.arg("-i").arg(queue_id);
        let out = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("postqueue task")
            .expect("run postqueue -i");
        assert!(
            out.status.success(),
            "postqueue -i: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The master process's id, from its pid file.
    fn master_pid(&self) -> Option<String> {
        let file = self.dir.path().join("spool/pid/master.pid");
        let text = std::fs::read_to_string(file).ok()?;
        Some(text.trim().to_string()).filter(|pid| !pid.is_empty())
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let pid = self.master_pid();
        let _ = self.command("postfix").arg("stop").output();
        // The directories go only once the daemons are gone, so none writes into a removed
        // queue. Bounded: a test must end even if Postfix does not.
        if let Some(pid) = pid.and_then(|pid| pid.parse().ok()) {
            wait_for_exit(pid, Duration::from_secs(20));
        }
    }
}

/// Waits until process `pid` (not our child) has exited, or `limit` has passed: its pidfd
/// becomes readable when it exits.
fn wait_for_exit(pid: libc::pid_t, limit: Duration) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = libc::c_int::try_from(fd) else {
        return;
    };
    if fd < 0 {
        return; // gone already
    }
    let mut exited = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(limit.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, and the descriptor is ours to close.
    unsafe {
        libc::poll(&mut exited, 1, millis);
        libc::close(fd);
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Everything one test needs: the DNS server, the CA file, tlsrouter, and Postfix relaying
/// to it. Postfix is dropped first, so it stops while tlsrouter still answers.
struct Lab {
    postfix: Postfix,
    _dns: DnsServer,
    _dir: tempfile::TempDir,
}

impl Lab {
    /// tlsrouter delivers to remote port `mx_port`, the port of the test's servers.
    async fn start(zone: TestZone, ca: &TestCa, mx_port: u16) -> Lab {
        Lab::start_relaying(zone, ca, mx_port, Hop::default(), |_| {}).await
    }

    /// Postfix relays to tlsrouter over `hop`; `adjust` changes tlsrouter's configuration.
    async fn start_relaying(
        zone: TestZone,
        ca: &TestCa,
        mx_port: u16,
        hop: Hop,
        adjust: impl FnOnce(&mut tlsrouter::config::Config),
    ) -> Lab {
        crate::support::init_tracing();
        let dns = DnsServer::start(zone).await;
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca_file = ca.write_ca_file(dir.path());
        let mut config = test_config(dns.addr, &ca_file, mx_port);
        adjust(&mut config);
        if hop.encrypt {
            let cert = ca.leaf(&["relay.test"], Validity::Current);
            let files = tlsrouter::server_tls::InboundTlsConfig {
                certificate: dir.path().join("relay.crt"),
                key: dir.path().join("relay.key"),
            };
            std::fs::write(&files.certificate, &cert.cert_pem).expect("write certificate");
            std::fs::write(&files.key, &cert.key_pem).expect("write key");
            config.inbound.tls = Some(files);
        }
        let relay = start_proxy(config).await;
        let postfix = tokio::task::spawn_blocking(move || Postfix::start_relaying(relay, hop))
            .await
            .expect("start Postfix");
        Lab {
            postfix,
            _dns: dns,
            _dir: dir,
        }
    }
}

/// example.test's MX is on 127.0.0.1; sender.test's (where bounces go) on 127.0.0.2.
fn zone() -> TestZone {
    TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", MX1)
        .mx("sender.test", 10, "mx.sender.test")
        .a("mx.sender.test", MX2)
}

fn message(to: &str, subject: &str) -> String {
    format!(
        "From: {SENDER}\nTo: {to}\nSubject: {subject}\n\n\
         Hello from Postfix through tlsrouter.\n.a line that starts with a dot\n"
    )
}

/// Two servers on one port (tlsrouter has one remote port), at 127.0.0.1 and 127.0.0.2.
async fn two_servers(
    first: impl Fn() -> ServerBehaviour,
    second: impl Fn() -> ServerBehaviour,
) -> (SmtpServer, SmtpServer) {
    for _ in 0..20 {
        let one = SmtpServer::start(IpAddr::V4(MX1), 0, first())
            .await
            .expect("SMTP server on 127.0.0.1");
        let port = one.addr().port();
        if let Ok(two) = SmtpServer::start(IpAddr::V4(MX2), port, second()).await {
            return (one, two);
        }
    }
    panic!("no port was free on both 127.0.0.1 and 127.0.0.2 after 20 tries");
}

fn text(received: &Received) -> String {
    String::from_utf8_lossy(&received.data).into_owned()
}

/// A message Postfix delivered arrived whole: headers Postfix added, and the body with its
/// leading dot stuffed as on the wire.
fn assert_whole(received: &Received, subject: &str) {
    let text = text(received);
    assert_eq!(received.mail_from, SENDER);
    assert!(text.contains(&format!("Subject: {subject}\r\n")), "{text}");
    assert!(text.contains("Received: by postfix.test"), "{text}");
    assert!(
        text.contains("\r\n..a line that starts with a dot\r\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_postfix_to_a_server_with_a_valid_certificate_arrives_over_tls() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, ServerBehaviour::tls(cert))
        .await
        .expect("SMTP server");
    let lab = Lab::start(zone(), &ca, server.addr().port()).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "over TLS"))
        .await;

    let got = lab.postfix.wait_for_messages(&server, 1, String::new).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_whole(&got[0], "over TLS");
    assert_eq!(got[0].rcpt_to, vec![to]);
    let tls = got[0].tls.as_ref().expect("delivered over TLS");
    assert_eq!(tls.version, "TLSv1.3");
    let log = lab.postfix.maillog();
    assert!(log.contains("status=sent"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_postfix_to_a_server_without_starttls_arrives_in_plain() {
    let ca = TestCa::new();
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, ServerBehaviour::plain())
        .await
        .expect("SMTP server");
    let lab = Lab::start(zone(), &ca, server.addr().port()).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "in plain"))
        .await;

    let got = lab.postfix.wait_for_messages(&server, 1, String::new).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_whole(&got[0], "in plain");
    assert_eq!(got[0].tls, None, "no STARTTLS offered: plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_postfix_to_a_server_with_an_expired_certificate_arrives_encrypted() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Expired);
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, ServerBehaviour::tls(cert))
        .await
        .expect("SMTP server");
    let lab = Lab::start(zone(), &ca, server.addr().port()).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "expired"))
        .await;

    let got = lab.postfix.wait_for_messages(&server, 1, String::new).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_whole(&got[0], "expired");
    assert!(
        got[0].tls.is_some(),
        "the default rules encrypt even with an expired certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_at_rcpt_keeps_the_message_deferred_in_postfix_with_the_reason() {
    let ca = TestCa::new();
    let busy = ServerBehaviour::plain().rcpt_reply("450 4.2.1 mailbox busy, try later");
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, busy)
        .await
        .expect("SMTP server");
    let lab = Lab::start(zone(), &ca, server.addr().port()).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "later"))
        .await;

    let Deferral {
        message: deferred,
        reason,
    } = lab.postfix.deferral().await;
    assert_eq!(deferred["recipients"][0]["address"], to, "{deferred}");
    assert!(
        reason.contains("450 4.2.1 mailbox busy, try later"),
        "the remote's own reply, passed on by tlsrouter: {deferred}"
    );
    assert!(server.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_at_rcpt_bounces_the_message_to_its_sender_with_the_remote_reply() {
    let ca = TestCa::new();
    let (rejecting, senders_mx) = two_servers(
        || ServerBehaviour::plain().rcpt_reply("550 5.1.1 no such user here"),
        ServerBehaviour::plain,
    )
    .await;
    let lab = Lab::start(zone(), &ca, rejecting.addr().port()).await;

    let to = "nobody@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "bounce me"))
        .await;

    // The bounce goes back through tlsrouter to the sender's domain.
    let bounces = lab
        .postfix
        .wait_for_messages(&senders_mx, 1, String::new)
        .await;
    lab.postfix.wait_for_empty_queue().await;
    let bounce = &bounces[0];
    assert_eq!(bounce.mail_from, "", "a bounce has the null sender");
    assert_eq!(bounce.rcpt_to, vec![SENDER]);
    let report = text(bounce);
    assert!(
        report.contains("Undelivered Mail Returned to Sender"),
        "{report}"
    );
    assert!(report.contains("550 5.1.1 no such user here"), "{report}");
    assert!(rejecting.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_data_is_retried_by_postfix_and_delivered_exactly_once() {
    let ca = TestCa::new();
    // The first connection breaks off in the body; later ones behave.
    let script = ServerBehaviour::plain()
        .on(Step::Body, Action::Drop)
        .on_connections_from(1, Step::Body, Action::Normal);
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, script)
        .await
        .expect("smtp server");
    let lab = Lab::start(zone(), &ca, server.addr().port()).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "again"))
        .await;

    let Deferral {
        message: deferred,
        reason,
    } = lab.postfix.deferral().await;
    assert!(
        reason.contains("451 4.4.2"),
        "tlsrouter's answer for a remote lost mid-transaction: {deferred}"
    );
    assert!(server.messages().is_empty(), "nothing was accepted yet");

    let queue_id = deferred["queue_id"].as_str().expect("queue_id");
    lab.postfix.retry_now(queue_id).await;
    lab.postfix.wait_for_empty_queue().await;

    // Out of Postfix's queue, so no further attempt can come.
    let accepted = server.messages();
    assert_eq!(accepted.len(), 1, "delivered exactly once: {accepted:?}");
    let connections = server.connection_logs();
    assert!(!connections[0].final_dot, "the first attempt was cut off");
    assert!(
        String::from_utf8_lossy(&accepted[0].data).contains("Subject: again"),
        "{accepted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_two_domains_on_different_mx_hosts_reaches_both_without_waiting() {
    let ca = TestCa::new();
    let (first, second) = two_servers(ServerBehaviour::plain, ServerBehaviour::plain).await;
    // example.test on 127.0.0.1, other.test on 127.0.0.2: two next hops.
    let zone = zone()
        .mx("other.test", 10, "mx.other.test")
        .a("mx.other.test", MX2);
    let lab = Lab::start(zone, &ca, first.addr().port()).await;

    let (a, b) = ("bob@example.test", "carol@other.test");
    lab.postfix
        .sendmail(SENDER, &[a, b], &message(a, "to two"))
        .await;

    // With the documented recipient limit of 1, neither recipient waits for a queue run
    // after tlsrouter's 452 4.5.3.
    let at_first = lab.postfix.wait_for_messages(&first, 1, String::new).await;
    let at_second = lab.postfix.wait_for_messages(&second, 1, String::new).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_eq!(at_first[0].rcpt_to, vec![a]);
    assert_eq!(at_second[0].rcpt_to, vec![b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postfix_that_requires_tls_on_its_hop_to_tlsrouter_relays_encrypted() {
    let ca = TestCa::new();
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, ServerBehaviour::plain())
        .await
        .expect("SMTP server");
    let hop = Hop {
        encrypt: true,
        ..Hop::default()
    };
    let lab = Lab::start_relaying(zone(), &ca, server.addr().port(), hop, |_| {}).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "encrypted hop"))
        .await;

    let got = lab.postfix.wait_for_messages(&server, 1, String::new).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_whole(&got[0], "encrypted hop");
    let log = lab.postfix.maillog();
    assert!(
        log.contains("TLS connection established to 127.0.0.1"),
        "Postfix encrypted its hop to tlsrouter: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_an_open_and_an_enforcing_domain_on_one_mx_goes_in_plain_to_the_open_one_only()
{
    let ca = TestCa::new();
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, ServerBehaviour::plain())
        .await
        .expect("SMTP server");
    let policy_host = "mta-sts.strict.test";
    let policy = crate::support::https::HttpsServer::start(
        ca.leaf(&[policy_host], Validity::Current),
        crate::support::https::Answer::policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mx.shared.test\r\nmax_age: 86400\r\n",
        ),
    )
    .await;
    // Both domains on one MX host, which offers no STARTTLS; only strict.test publishes.
    let zone = zone()
        .mx("open-shared.test", 10, "mx.shared.test")
        .mx("strict.test", 10, "mx.shared.test")
        .a("mx.shared.test", MX1)
        .record(
            "_mta-sts.strict.test",
            crate::support::https::txt("v=STSv1; id=20261207a;"),
        );
    // Postfix as it is by default: both recipients in one transaction.
    let hop = Hop {
        batch: true,
        ..Hop::default()
    };
    let policy_addr = policy.addr;
    let lab = Lab::start_relaying(zone, &ca, server.addr().port(), hop, |config| {
        config
            .mta_sts
            .connect_to
            .insert(policy_host.to_string(), policy_addr);
    })
    .await;

    let (open, strict) = ("u@open-shared.test", "v@strict.test");
    lab.postfix
        .sendmail(SENDER, &[open, strict], &message(open, "two domains"))
        .await;

    let got = lab.postfix.wait_for_messages(&server, 1, String::new).await;
    assert_eq!(
        got[0].rcpt_to,
        vec![open],
        "only the open domain's recipient"
    );
    assert_eq!(got[0].tls, None);
    // tlsrouter sent the other to a transaction of its own; there its domain decides.
    let reason = lab.postfix.retried_alone(strict, "4.7.5").await;
    assert!(reason.contains("MTA-STS enforce"), "{reason}");
    assert!(
        !server.heard_of(strict),
        "the remote never heard of {strict}"
    );
    assert_eq!(server.messages().len(), 1);
}
