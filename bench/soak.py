"""The soak benchmark (`bench/run soak [MESSAGES] [--minutes M]`): MESSAGES messages (100,000),
one MTA session each, handed to a real Postfix at an even pace over M minutes (30); Postfix
relays them all through tlsrouter (its relayhost) to the remotes of bench/remotes.rs: good,
plain, expired-certificate, aborting and slow servers, and from the end of the warm-up (the
first sixth) on, a hostile domain whose 50 MX hosts are all dead.

Every 10 s it records tlsrouter's resident memory, open descriptors, MTA sessions and idle
pooled connections, Postfix's queue, and the end-to-end latency (Postfix's 250 to the
remote's) of the good domain's messages. After the load it waits for Postfix's retries
(at most 10 minutes), then accounts for every message: taken by its remote, still in
Postfix's queue, or lost. Prints Markdown (the figures each minute, the accounting, the
verdicts) and writes bench/soak/samples.csv and, with python3-matplotlib, bench/soak/soak.png.
Needs root and Debian's postfix."""

import csv
import json
import os
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from parts import (RELEASE, ROOT, PostfixRelay, Tlsrouter, free_port, postfix_available,
                   status_kib)

REMOTES = os.path.join(RELEASE, "examples", "bench-remotes")

# Of every 100 messages, so many to each domain; the hostile domain's share is sent only
# after the warm-up, so that the good domain's latency is seen without it and with it.
MIX = [("good.soak", 45), ("plain.soak", 20), ("expired.soak", 10), ("aborting.soak", 10),
       ("slow.soak", 14), ("hostile.soak", 1)]
SAMPLE_SECONDS = 10
DRAIN_SECONDS = 600
SENDERS = 32
TEXT = "\r\n".join(["Lorem ipsum dolor sit amet, consectetur adipiscing elit."] * 16)

# Postfix's retries soon enough for the drain to see them.
POSTFIX_EXTRA = """smtp_connection_cache_on_demand = no
minimal_backoff_time = 30s
maximal_backoff_time = 120s
queue_run_delay = 30s
"""


def domain_of(n, hostile):
    slot = n % 100
    for domain, share in MIX:
        if slot < share:
            return "good.soak" if domain == "hostile.soak" and not hostile else domain
        slot -= share
    raise AssertionError("MIX adds up to 100")


class Load:
    """Sends message n at start + n / rate, each in its own session; remembers when Postfix
    took it."""

    def __init__(self, port, messages, seconds, warm_up):
        self.port, self.messages, self.rate = port, messages, messages / seconds
        self.warm_up = warm_up
        self.next = 0
        self.lock = threading.Lock()
        self.taken = {}      # id -> (domain, time of Postfix's 250)
        self.refused = {}    # id -> (domain, error)
        self.start = time.time()
        self.threads = [threading.Thread(target=self.sender, daemon=True) for _ in range(SENDERS)]
        for t in self.threads:
            t.start()

    def sender(self):
        while True:
            with self.lock:
                n = self.next
                self.next += 1
            if n >= self.messages:
                return
            due = self.start + n / self.rate
            time.sleep(max(0, due - time.time()))
            domain = domain_of(n, hostile=time.time() - self.start >= self.warm_up)
            message = (f"From: <soak@sender.soak>\r\nTo: <user{n}@{domain}>\r\n"
                       f"Subject: soak {n}\r\nMessage-ID: <{n}@load.soak>\r\nX-Soak-Id: {n}\r\n"
                       f"\r\n{TEXT}\r\n")
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=120) as smtp:
                    smtp.sendmail("soak@sender.soak", [f"user{n}@{domain}"], message)
                with self.lock:
                    self.taken[str(n)] = (domain, time.time())
            except (OSError, smtplib.SMTPException) as e:
                with self.lock:
                    self.refused[str(n)] = (domain, str(e))

    def done(self):
        return not any(t.is_alive() for t in self.threads)


class Deliveries:
    """bench-remotes' log, read as it grows: id -> [(domain, time, tls)]."""

    def __init__(self, path):
        self.path, self.offset, self.seen = path, 0, {}

    def read_new(self):
        new = []
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind("\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            id_, domain, at, tls = line.split()
            self.seen.setdefault(id_, []).append((domain, float(at), tls))
            new.append((id_, domain, float(at)))
        return new


def metrics(port):
    values = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    values[name] = float(value)
    except OSError:
        pass
    return values


def queued_by_domain(postfix):
    """Postfix's queue: recipients per domain, and one reason given per domain."""
    counts, reasons = {}, {}
    for message in postfix.queue():
        for r in message.get("recipients", []):
            domain = r["address"].rsplit("@", 1)[-1]
            counts[domain] = counts.get(domain, 0) + 1
            if r.get("delay_reason"):
                reasons.setdefault(domain, r["delay_reason"])
    return counts, reasons


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(int(len(values) * q), len(values) - 1)]


def run(messages, minutes, machine):
    if not postfix_available():
        sys.exit("bench/run soak needs root and Debian's postfix package")
    seconds = minutes * 60
    warm_up = seconds / 6
    out_dir = os.path.join(ROOT, "bench", "soak")
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="tlsrouter-soak-")
    mx_port = free_port()
    remotes = subprocess.Popen([REMOTES, work, str(mx_port)], stdout=subprocess.PIPE,
                               text=True)
    dns = remotes.stdout.readline().split()[1]
    metrics_port = free_port()
    relay = Tlsrouter(f"""hostname: relay.soak
allow_clients: [127.0.0.0/8]
resolver: {{ nameservers: ["{dns}"], dane: off }}
tls: {{ system_roots: false, ca_file: {work}/ca.pem }}
delivery: {{ port: {mx_port} }}
admin: {{ socket: null }}
metrics: {{ listen: "127.0.0.1:{metrics_port}" }}
log: {{ format: json }}
""", log=os.path.join(work, "tlsrouter.log"))
    postfix = PostfixRelay(relay.port, starttls=False, concurrency=100, extra=POSTFIX_EXTRA)
    deliveries = Deliveries(os.path.join(work, "delivered.log"))
    samples = []
    try:
        load = Load(postfix.port, messages, seconds, warm_up)
        began = load.start
        drain_until = None
        while True:
            time.sleep(SAMPLE_SECONDS - (time.time() - began) % SAMPLE_SECONDS)
            latencies = []
            for id_, domain, at in deliveries.read_new():
                if domain == "good.soak" and id_ in load.taken:
                    latencies.append(at - load.taken[id_][1])
            m = metrics(metrics_port)
            counts, _ = queued_by_domain(postfix)
            pid = relay.proc.pid
            samples.append({
                "t": round(time.time() - began),
                "rss_mib": status_kib(pid, "VmRSS") / 1024,
                "fds": len(os.listdir(f"/proc/{pid}/fd")),
                "sessions": m.get("tlsrouter_active_sessions", float("nan")),
                "pool_idle": m.get("tlsrouter_pool_idle", float("nan")),
                "queued": sum(counts.values()),
                "sent": len(load.taken),
                "delivered": len(deliveries.seen),
                "good_p50_s": percentile(latencies, 0.5),
                "good_p99_s": percentile(latencies, 0.99),
                "hostile": time.time() - began >= warm_up,
            })
            print(json.dumps(samples[-1]), file=sys.stderr)
            if load.done():
                drain_until = drain_until or time.time() + DRAIN_SECONDS
                pending = sum(n for d, n in counts.items() if d != "hostile.soak")
                if pending == 0 or time.time() > drain_until:
                    break
        deliveries.read_new()
        counts, reasons = queued_by_domain(postfix)
        report = accounting(load, deliveries, counts, reasons)
        report += "\n\n" + verdicts(samples, warm_up)
    finally:
        postfix.stop()
        relay.stop()
        remotes.terminate()
        outcomes = log_outcomes(os.path.join(work, "tlsrouter.log"))
        shutil.rmtree(work, ignore_errors=True)
    write_csv(samples, os.path.join(out_dir, "samples.csv"))
    plotted = plot(samples, warm_up, os.path.join(out_dir, "soak.png"))
    print(f"Machine: {machine}\n\n{messages:,} messages in {minutes} minutes; "
          f"the hostile domain from minute {warm_up / 60:.0f} on.\n")
    print(minute_table(samples))
    print("\n" + report + "\n\n" + outcomes)
    if not plotted:
        print("\n(no plot: python3-matplotlib is not installed)", file=sys.stderr)


def accounting(load, deliveries, counts, reasons):
    lines = ["| domain | sent | taken by its remote | duplicates | in Postfix's queue "
             "| lost | refused by Postfix |", "|---|---|---|---|---|---|---|"]
    for domain, _ in MIX:
        sent = {i for i, (d, _) in load.taken.items() if d == domain}
        taken = {i for i in sent if i in deliveries.seen}
        dups = sum(len(deliveries.seen[i]) - 1 for i in taken)
        queued = counts.get(domain, 0)
        lost = len(sent) - len(taken) - queued
        refused = sum(1 for d, _ in load.refused.values() if d == domain)
        lines.append(f"| {domain} | {len(sent):,} | {len(taken):,} | {dups} | {queued:,} "
                     f"| {lost} | {refused} |")
    for domain, reason in sorted(reasons.items()):
        lines.append(f"\nWhy {domain} waits in Postfix's queue (one of them): {reason}")
    return "\n".join(lines)


def verdicts(samples, warm_up):
    after = [s for s in samples if s["hostile"]]
    settled = [s for s in samples if s["t"] >= warm_up]
    lines = []
    if settled:
        for key, unit in (("rss_mib", "MiB"), ("fds", "descriptors")):
            first, last = settled[0][key], settled[-1][key]
            peak = max(s[key] for s in settled)
            lines.append(f"- {key}: {first:.0f} {unit} at the end of the warm-up, {last:.0f} at "
                         f"the end, {peak:.0f} at most after the warm-up")
    before = [s for s in samples if not s["hostile"] and s["t"] > 60]
    for name, part in (("without the hostile domain", before),
                       ("with the hostile domain", after)):
        p50 = [s["good_p50_s"] for s in part if s["good_p50_s"] == s["good_p50_s"]]
        p99 = [s["good_p99_s"] for s in part if s["good_p99_s"] == s["good_p99_s"]]
        if p50:
            lines.append(f"- good.soak end to end {name}: median of the 10 s medians "
                         f"{statistics.median(p50):.2f} s, worst 10 s p99 {max(p99):.2f} s")
    return "\n".join(lines)


def log_outcomes(path):
    """What tlsrouter's one line per transaction said, counted by outcome and domain."""
    counts = {}
    try:
        with open(path) as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                fields = event.get("fields", event)
                key = fields.get("event") or fields.get("message")
                if key:
                    counts[key] = counts.get(key, 0) + 1
    except OSError as e:
        return f"(no tlsrouter log: {e})"
    rows = sorted(counts.items(), key=lambda kv: -kv[1])[:15]
    return "tlsrouter's log lines, by event:\n\n" + "\n".join(
        f"- {key}: {n:,}" for key, n in rows)


def minute_table(samples):
    lines = ["| minute | RSS MiB | open fds | MTA sessions | idle pooled | Postfix queue "
             "| sent | delivered | good.soak p50 s | good.soak p99 s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in samples:
        if s["t"] % 60 >= SAMPLE_SECONDS and s is not samples[-1]:
            continue
        lines.append(f"| {s['t'] / 60:.0f} | {s['rss_mib']:.1f} | {s['fds']} "
                     f"| {s['sessions']:.0f} | {s['pool_idle']:.0f} | {s['queued']:,} "
                     f"| {s['sent']:,} | {s['delivered']:,} | {s['good_p50_s']:.2f} "
                     f"| {s['good_p99_s']:.2f} |")
    return "\n".join(lines)


def write_csv(samples, path):
    if not samples:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(samples[0]))
        w.writeheader()
        w.writerows(samples)


def plot(samples, warm_up, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [s["t"] / 60 for s in samples]
    panels = [("tlsrouter RSS (MiB)", ["rss_mib"]), ("open descriptors", ["fds"]),
              ("MTA sessions, idle pooled", ["sessions", "pool_idle"]),
              ("good.soak end to end (s)", ["good_p50_s", "good_p99_s"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 10), sharex=True)
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            ax.plot(t, [s[key] for s in samples], label=key)
        ax.axvline(warm_up / 60, color="grey", linestyle=":")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("minutes (dotted: the hostile domain starts)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return True
