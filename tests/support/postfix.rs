//! A real Postfix instance of a test's own (`postfix -c DIR`): its configuration and queue
//! in a temporary directory, stopped and removed at the end, never the machine's own
//! Postfix. Postfix must be installed (Debian: the `postfix` package, which `.ci/run`
//! installs) and the tests must run as root, as `postfix start` requires: otherwise they
//! fail and say why.
//!
//! Waiting on Postfix is waiting on its queue: every move of a queue file, every deferral
//! reason written and every line of its log wakes the waiter (inotify), which then reads
//! the queue again; nothing waits on a timer.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use super::smtp_server::{Received, SmtpServer};

/// How long Postfix may take to do what a test waits for; a guard against a hung test.
const WAIT: Duration = Duration::from_secs(60);

/// The instance's own main.cf lines: its directories, its name, and no way off loopback.
/// The documented snippet follows them unchanged but for the port.
pub fn instance_main_cf(dir: &Path) -> String {
    format!(
        "{}smtp_dns_support_level = disabled\n",
        instance_directories_cf(dir)
    )
}

/// Its directories and name, listening on loopback only, IPv4: what every instance has.
/// Only `flush` is hashed (Postfix refuses an empty list), so that the queue files lie in
/// the directories a waiting test watches, not in subdirectories made later.
pub fn instance_directories_cf(dir: &Path) -> String {
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
pub const INSTANCE_MASTER_CF: &str = "\
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
pub struct Postfix {
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

/// A deferred message as `postqueue -j` shows it, and why its first recipient waits.
pub struct Deferral {
    pub message: Value,
    pub reason: String,
}

impl Postfix {
    /// Configures and starts an instance with the main.cf `main_cf` writes for the
    /// instance's directory, and `master_cf`; inside the network namespace `netns` if given.
    pub fn start_with(
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
    pub fn maillog(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default();
        format!("--- Postfix's maillog ---\n{log}")
    }

    /// Injects a message with Postfix's `sendmail`, as an application on the host would.
    pub async fn sendmail(&self, from: &str, to: &[&str], message: &str) {
        self.sendmail_with(&[], from, to, message).await;
    }

    /// As [`Postfix::sendmail`], with more of sendmail's options (`-N`, `-R`, `-V` for DSN).
    pub async fn sendmail_with(&self, options: &[&str], from: &str, to: &[&str], message: &str) {
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
    pub async fn queue(&self) -> Vec<Value> {
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
    pub async fn deferral_of(&self, recipient: &str, says: &str) -> Deferral {
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
    pub async fn retried_alone(&self, recipient: &str, says: &str) -> String {
        let Deferral { message, .. } = self.deferral_of(recipient, "4.5.3").await;
        let queue_id = message["queue_id"].as_str().expect("a queue id");
        self.retry_now(queue_id).await;
        self.deferral_of(recipient, says).await.reason
    }

    /// Waits until the queue holds a deferred message, and returns it with the reason
    /// Postfix gives for its first recipient.
    pub async fn deferral(&self) -> Deferral {
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
    pub async fn wait_for_messages(
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
    pub async fn wait_for_empty_queue(&self) {
        (self.wait_for_queue("an empty queue", |queue| queue.is_empty().then_some(()))).await;
    }

    /// Asks Postfix to try a deferred message again now (`postqueue -i ID`).
    pub async fn retry_now(&self, queue_id: &str) {
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
