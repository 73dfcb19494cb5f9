//! The daemon under systemd's `Type=notify`: it says READY=1 on `NOTIFY_SOCKET` once it
//! accepts connections, so systemd starts the MTA after it and not before. The test plays
//! systemd's part with a Unix datagram socket of its own.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long the daemon may take to start; a guard against a hung test, not a sleep.
const START_WAIT: Duration = Duration::from_secs(60);

/// Kills the daemon when the test ends, passed or not.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_daemon_tells_systemd_it_is_ready_once_it_accepts_connections() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let notify_path = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    systemd
        .set_read_timeout(Some(START_WAIT))
        .expect("socket timeout");
    let config = dir.path().join("tlsrouter.yaml");
    std::fs::write(
        &config,
        "listen: 127.0.0.1:0\nadmin: { socket: null }\ntls: { system_roots: false }\n\
         resolver: { nameservers: [\"127.0.0.1:9\"] }\n",
    )
    .expect("write config");

    let daemon = Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tlsrouter");
    let mut daemon = Running(daemon);
    let stderr = daemon.0.stderr.take().expect("stderr");
    // Kept for the failure message; read aside so the daemon never blocks on a full pipe.
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });

    let mut datagram = [0u8; 4096];
    // A signal to this process (another test's child ending) interrupts a receive with a
    // timeout; that is no answer from the daemon, so it is asked again.
    let received = loop {
        match systemd.recv(&mut datagram) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    let Ok(len) = received else {
        let _ = daemon.0.kill();
        let log = log.join().unwrap_or_default().join("\n");
        panic!("no notification within {START_WAIT:?} ({received:?}); the daemon said:\n{log}");
    };
    let message = String::from_utf8_lossy(&datagram[..len]).into_owned();
    let fields: Vec<&str> = message.lines().collect();
    assert!(fields.contains(&"READY=1"), "{message:?}");

    // What it tells systemd (and "systemctl status" shows) is where it listens, and it
    // does listen there already.
    let status = fields
        .iter()
        .find_map(|f| f.strip_prefix("STATUS=listening on "))
        .unwrap_or_else(|| panic!("no listening address in {message:?}"));
    let address: SocketAddr = status.parse().expect("an address");
    let stream = TcpStream::connect(address).expect("it accepts connections once ready");
    stream
        .set_read_timeout(Some(START_WAIT))
        .expect("socket timeout");
    let mut greeting = String::new();
    BufReader::new(stream)
        .read_line(&mut greeting)
        .expect("read the greeting");
    assert!(greeting.starts_with("220 "), "{greeting:?}");
}
