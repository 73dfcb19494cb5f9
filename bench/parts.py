"""What the benchmarks share: building, ports, /proc figures, and the relays under test
(tlsrouter and a private Postfix instance)."""

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
TLSROUTER = os.path.join(RELEASE, "tlsrouter")
SINK = os.path.join(RELEASE, "examples", "bench-sink")
LOAD = os.path.join(RELEASE, "examples", "bench-load")
TICK = os.sysconf("SC_CLK_TCK")


def build(debug_info=False, examples=("bench-sink", "bench-load")):
    env = dict(os.environ)
    if debug_info:
        # Symbols and line tables for the profiler; the code is the same release code.
        env["CARGO_PROFILE_RELEASE_DEBUG"] = "true"
    subprocess.run(
        ["cargo", "build", "--release", "--locked", "--bin", "tlsrouter"]
        + [arg for name in examples for arg in ("--example", name)],
        cwd=ROOT, check=True, env=env)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def raise_fd_limit(n=65536):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(n, soft), hard) if hard != resource.RLIM_INFINITY else n
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def cpu_seconds(pids):
    """User and system CPU seconds of `pids` and their reaped children."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # utime, stime, cutime, cstime (fields 14-17): children count once reaped.
            user += int(fields[11]) + int(fields[13])
            system += int(fields[12]) + int(fields[14])
        except OSError:
            pass
    return user / TICK, system / TICK


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def bench_config(sink_port, extra=""):
    """The grid's relay: every message to the sink, no limit in the way."""
    return f"""hostname: relay.bench.test
allow_clients: [127.0.0.0/8]
tls: {{ system_roots: false }}
delivery: {{ port: {sink_port} }}
mta_sts: {{ enabled: false }}
limits: {{ max_sessions: 20000, max_sessions_per_client: 20000 }}
admin: {{ socket: null }}
{extra}"""


class Tlsrouter:
    """tlsrouter with `config` (YAML without `listen`), its output to `log` if given."""

    def __init__(self, config, wrapper=(), start_timeout=30, log=None):
        self.dir = tempfile.mkdtemp(prefix="tlsrouter-bench-")
        self.port = free_port()
        path = os.path.join(self.dir, "tlsrouter.yaml")
        with open(path, "w") as f:
            f.write(f"listen: 127.0.0.1:{self.port}\n{config}")
        out = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            list(wrapper) + [TLSROUTER, "run", "--config", path],
            stdout=out, stderr=out, preexec_fn=raise_fd_limit)
        wait_listening(self.port, "tlsrouter", start_timeout)

    def pids(self):
        return [self.proc.pid]

    def peak_kib(self):
        return status_kib(self.proc.pid, "VmHWM")

    def stop(self, timeout=10):
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostfixRelay:
    """A private Postfix instance relaying everything to the sink (relayhost)."""

    def __init__(self, sink_port, starttls, concurrency=200, extra=""):
        self.dir = tempfile.mkdtemp(prefix="postfix-bench-")
        self.port = free_port()
        d = self.dir
        for sub in ("spool", "data"):
            os.makedirs(os.path.join(d, sub))
        tls = ("smtp_tls_security_level = encrypt\nsmtp_tls_loglevel = 0\n"
               if starttls else "smtp_tls_security_level = none\n")
        with open(os.path.join(d, "main.cf"), "w") as f:
            f.write(f"""compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
myhostname = postfix.bench.test
mydestination =
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtp_dns_support_level = disabled
relayhost = [127.0.0.1]:{sink_port}
default_destination_concurrency_limit = {concurrency}
default_process_limit = {2 * concurrency}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
# The default limit (10,240,000 bytes) refuses the 10 MB cells; the mailbox limits may not
# be below it.
message_size_limit = 104857600
mailbox_size_limit = 0
virtual_mailbox_limit = 0
{tls}{extra}""")
        # Postfix's own services, none chrooted (the queue is in a temporary directory).
        services = [
            "pickup unix n - n 60 1 pickup", "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr", "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce", "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce", "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush", "proxymap unix - - n - - proxymap",
            "smtp unix - - n - - smtp", "showq unix n - n - - showq",
            "error unix - - n - - error", "retry unix - - n - - error",
            "discard unix - - n - - discard", "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache", "postlog unix-dgram n - n - 1 postlogd",
            # Without tlsmgr the smtp client has no entropy for TLS and turns TLS off, so
            # under "encrypt" every message is deferred.
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
        ]
        with open(os.path.join(d, "master.cf"), "w") as f:
            f.write("\n".join(services) + "\n")
        # Its unprivileged daemons must reach their files below it.
        os.chmod(d, 0o755)
        shutil.chown(os.path.join(d, "data"), "postfix")
        started = subprocess.run(["postfix", "-c", d, "start"], capture_output=True, text=True)
        if started.returncode != 0:
            sys.exit(f"postfix did not start: {started.stdout}{started.stderr}")
        wait_listening(self.port, "postfix")

    def pids(self):
        """The instance's processes: the master and its children (they run with its
        configuration directory in MAIL_CONFIG)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"MAIL_CONFIG={self.dir}".encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
        return pids

    def queue(self):
        """The messages in the queue, as `postqueue -j` describes each."""
        out = subprocess.run(["postqueue", "-c", self.dir, "-j"], capture_output=True,
                             text=True).stdout
        return [json.loads(line) for line in out.splitlines()]

    def queued(self):
        return len(self.queue())

    def maillog_tail(self, lines=20):
        try:
            with open(os.path.join(self.dir, "maillog")) as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no maillog: {e})"

    def queue_empty(self):
        return not self.queue()

    def peak_kib(self):
        # Proportional set size of every Postfix process of the instance, now.
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total

    def stop(self):
        subprocess.run(["postfix", "-c", self.dir, "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


def postfix_available():
    return shutil.which("postfix") is not None and os.geteuid() == 0


def haproxy_available():
    return shutil.which("haproxy") is not None


class Haproxy:
    """HAProxy in `mode tcp`: the blind TCP proxy that could stand where tlsrouter stands,
    one upstream connection per downstream one, a thread per core."""

    def __init__(self, sink_port):
        self.dir = tempfile.mkdtemp(prefix="haproxy-bench-")
        self.port = free_port()
        config = os.path.join(self.dir, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(f"""global
  nbthread {os.cpu_count()}
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend smtp
  bind 127.0.0.1:{self.port}
  default_backend sink
backend sink
  server sink 127.0.0.1:{sink_port}
""")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", config],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=raise_fd_limit)
        wait_listening(self.port, "haproxy")

    def pids(self):
        return [self.proc.pid]

    def peak_kib(self):
        return status_kib(self.proc.pid, "VmHWM")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
