//! A network namespace of its own for a test, joined to this one by a veth pair:
//! `10.231.N.100` inside, `10.231.N.1` and more addresses of `10.231.N.0/24` on this side
//! (and the same in IPv6: `fd31:0:0:N::100` inside, `fd31:0:0:N::1`... here),
//! where in-process servers (DNS, SMTP) can listen on any port, 25 and 53 included. N is
//! unique per namespace, so tests run side by side. Processes run inside with
//! `ip netns exec` (see [`NetNs::command`]); `/etc/netns/NAME/resolv.conf` is the
//! resolver they see. Dropping it removes the namespace, the pair and that file.
//! Needs root and `ip` (iproute2); without them the test fails and says so.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct NetNs {
    pub name: String,
    /// The third octet of its subnet.
    subnet: u8,
    outside_link: String,
    etc: PathBuf,
}

impl NetNs {
    /// A namespace with loopback up, `10.231.N.100/24` on its end of the pair, a default
    /// route through this side, and `hosts` addresses here: [`NetNs::host`] 1 to `hosts`.
    pub fn create(hosts: u8) -> NetNs {
        let (name, subnet) = free_name_and_subnet();
        let outside_link = format!("trv{}o", &name[3..]);
        let inside_link = format!("trv{}i", &name[3..]);
        run(
            Command::new("ip").args(["netns", "add", &name]),
            "create a network namespace (the transparent-mode tests need root and iproute2)",
        );
        let netns = NetNs {
            etc: PathBuf::from("/etc/netns").join(&name),
            name,
            subnet,
            outside_link,
        };
        let inside = format!("{}/24", netns.inside());
        let gateway = netns.host(1).to_string();
        run(
            Command::new("ip").args([
                "link",
                "add",
                &netns.outside_link,
                "type",
                "veth",
                "peer",
                "name",
                &inside_link,
                "netns",
                &netns.name,
            ]),
            "create a veth pair",
        );
        for i in 1..=hosts.max(1) {
            let addr = format!("{}/24", netns.host(i));
            run(
                Command::new("ip").args(["addr", "add", &addr, "dev", &netns.outside_link]),
                "add an address outside",
            );
            // nodad: usable at once, not after duplicate address detection.
            let addr6 = format!("{}/64", netns.host6(i));
            run(
                Command::new("ip").args([
                    "-6",
                    "addr",
                    "add",
                    &addr6,
                    "dev",
                    &netns.outside_link,
                    "nodad",
                ]),
                "add an IPv6 address outside",
            );
        }
        run(
            Command::new("ip").args(["link", "set", &netns.outside_link, "up"]),
            "bring the outside link up",
        );
        let inside6 = format!("{}/64", netns.inside6());
        let gateway6 = netns.host6(1).to_string();
        let inside_commands: [&[&str]; 6] = [
            &["ip", "link", "set", "lo", "up"],
            &["ip", "addr", "add", &inside, "dev", &inside_link],
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &inside6,
                "dev",
                &inside_link,
                "nodad",
            ],
            &["ip", "link", "set", &inside_link, "up"],
            &["ip", "route", "add", "default", "via", &gateway],
            &["ip", "-6", "route", "add", "default", "via", &gateway6],
        ];
        for args in inside_commands {
            run(
                netns.command(args[0]).args(&args[1..]),
                "set up the namespace",
            );
        }
        netns
    }

    /// The namespace's own address.
    pub fn inside(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.subnet, 100)
    }

    /// Address `i` on this side of the pair.
    pub fn host(&self, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.subnet, i)
    }

    /// The namespace's own IPv6 address.
    pub fn inside6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd31, 0, 0, self.subnet.into(), 0, 0, 0, 0x100)
    }

    /// IPv6 address `i` on this side of the pair.
    pub fn host6(&self, i: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd31, 0, 0, self.subnet.into(), 0, 0, 0, i.into())
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `program args` inside and panics with its output if it fails.
    pub fn run(&self, program: &str, args: &[&str], what: &str) {
        run(self.command(program).args(args), what);
    }

    /// Processes started inside from now on resolve names through `nameserver` (port 53).
    pub fn use_nameserver(&self, nameserver: Ipv4Addr) {
        std::fs::create_dir_all(&self.etc).expect("create /etc/netns/NAME");
        std::fs::write(
            self.etc.join("resolv.conf"),
            format!("nameserver {nameserver}\n"),
        )
        .expect("write the namespace's resolv.conf");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // The inside end goes with the namespace, and the pair with it; the outside end is
        // removed too in case a process inside still holds the namespace.
        let _ = Command::new("ip")
            .args(["link", "del", &self.outside_link])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

/// A name and subnet no namespace or address of this machine uses yet.
fn free_name_and_subnet() -> (String, u8) {
    let existing = Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let pid = std::process::id();
    for _ in 0..250 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let subnet = ((pid + n) % 250 + 1) as u8;
        let name = format!("trv{:05}", (pid % 1000) * 100 + n % 100);
        let taken = existing.contains(&format!("10.231.{subnet}."))
            || existing.contains(&format!("fd31:0:0:{subnet:x}::"))
            || PathBuf::from("/run/netns").join(&name).exists();
        if !taken {
            return (name, subnet);
        }
    }
    panic!("no free 10.231.N.0/24 subnet for a test namespace");
}

fn run(command: &mut Command, what: &str) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
