//! A probe's report in words, one step a line, for an admin at a terminal.

use std::fmt::Write;

use crate::probe::report::{PolicyReport, ProbeReport, ServerReport};

/// The report for people.
pub fn render(report: &ProbeReport) -> String {
    let mut out = String::new();
    if let Some(domain) = &report.domain {
        let _ = writeln!(out, "domain {domain}");
    }
    if let Some(error) = &report.dns_error {
        let _ = writeln!(out, "  DNS: {error}");
    }
    if let Some(policy) = &report.mta_sts {
        render_policy(&mut out, policy);
    }
    if let Some(dane) = &report.dane {
        let mx = report
            .mx_dnssec
            .as_deref()
            .map_or(String::new(), |d| format!("; MX answer {d}"));
        let _ = writeln!(out, "  DANE: {dane}{mx}");
    }
    for mx in &report.mx {
        let addrs: Vec<String> = mx.addresses.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "MX {} (preference {}): {}",
            mx.host,
            mx.preference,
            addrs.join(", ")
        );
        if let Some(error) = &mx.error {
            let _ = writeln!(out, "  address lookup: {error}");
        }
        match mx.in_policy {
            Some(true) => {
                let _ = writeln!(out, "  MTA-STS:  named by the policy");
            }
            Some(false) => {
                let _ = writeln!(out, "  MTA-STS:  NOT named by the policy");
            }
            None => {}
        }
        if let Some(dnssec) = &mx.dnssec {
            let _ = writeln!(out, "  DNSSEC:   address answer {dnssec}");
        }
        if let Some(tlsa) = &mx.tlsa {
            let _ = writeln!(out, "  TLSA:     {}", tlsa.state);
            for record in &tlsa.records {
                let _ = writeln!(out, "            {record}");
            }
        }
        for server in &mx.servers {
            render_server(&mut out, server);
        }
    }
    if let (Some(rule), Some(plan)) = (&report.rule, &report.plan) {
        let _ = writeln!(out, "rules: a message to this domain gets rule {rule:?}");
        for line in plan.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

fn render_policy(out: &mut String, policy: &PolicyReport) {
    let _ = writeln!(out, "  MTA-STS: {}", policy.state);
    if let (Some(id), Some(mode)) = (&policy.id, &policy.mode) {
        let max_age = policy.max_age.unwrap_or_default();
        let fetched = policy.fetched.as_deref().unwrap_or("?");
        let _ = writeln!(
            out,
            "    policy id {id}, mode {mode}, mx {}, max_age {max_age}s, fetched {fetched}",
            policy.mx.join(" ")
        );
    }
    if let Some(error) = &policy.error {
        let _ = writeln!(out, "    error: {error}");
    }
}

fn render_server(out: &mut String, s: &ServerReport) {
    let addr = s.addr.map(|a| a.to_string()).unwrap_or_default();
    let _ = writeln!(out, "  server {addr}");
    let timings: Vec<String> = s
        .timings_ms
        .iter()
        .map(|(step, ms)| format!("{step} {ms}ms"))
        .collect();
    if !timings.is_empty() {
        let _ = writeln!(out, "    timings:  {}", timings.join(", "));
    }
    if let Some(banner) = &s.banner {
        let _ = writeln!(out, "    banner:   {banner}");
    }
    if !s.ehlo.is_empty() {
        let starttls = if s.starttls_offered {
            "STARTTLS offered"
        } else {
            "no STARTTLS"
        };
        let _ = writeln!(out, "    ehlo:     {} ({starttls})", s.ehlo.join(" "));
    }
    if let Some(tls) = &s.tls {
        let _ = writeln!(out, "    tls:      {} {}", tls.version, tls.cipher);
        let verdict = tls
            .problem
            .as_deref()
            .unwrap_or("certificate verified for the MX name");
        let _ = writeln!(out, "    verify:   {verdict}");
        let requiretls = match tls.ehlo_after_tls.iter().any(|k| k == "REQUIRETLS") {
            true => "REQUIRETLS offered after STARTTLS",
            false => "no REQUIRETLS: a message whose sender asks it cannot go to this server",
        };
        let _ = writeln!(out, "    sender:   {requiretls}");
        for (i, cert) in tls.certificates.iter().enumerate() {
            let _ = writeln!(out, "    cert {i}:   subject {}", cert.subject);
            let _ = writeln!(out, "              SANs {}", cert.sans.join(", "));
            let _ = writeln!(out, "              issuer {}", cert.issuer);
            let _ = writeln!(
                out,
                "              valid {} to {} ({} days left)",
                cert.not_before, cert.not_after, cert.days_left
            );
        }
    }
    if let Some(legacy) = &s.legacy {
        let _ = writeln!(out, "    rustls:   {}", legacy.rustls);
        match (&legacy.version, &legacy.cipher, &legacy.error) {
            (Some(version), Some(cipher), _) => {
                let _ = writeln!(
                    out,
                    "    legacy:   {version} {cipher} (the legacy stack, OpenSSL: encrypted, never authenticated)"
                );
            }
            (_, _, error) => {
                let _ = writeln!(
                    out,
                    "    legacy:   failed: {}",
                    error.as_deref().unwrap_or("?")
                );
            }
        }
    }
    if let Some(class) = s.class {
        let detail = s.detail.as_deref().unwrap_or("");
        let _ = writeln!(out, "    outcome:  {class} ({detail})");
    }
    if let Some(dane) = &s.dane {
        let _ = writeln!(out, "    dane:     {dane}");
    }
    if let Some(error) = &s.error {
        let _ = writeln!(out, "    error:    {error}");
    }
    if let Some(rule) = &s.rule {
        let _ = writeln!(
            out,
            "    rule:     {rule:?} for a message through this server"
        );
    }
    if let Some(decision) = &s.decision {
        let _ = writeln!(out, "    delivery: {decision}");
    }
    if let Some(fleet) = &s.fleet {
        let _ = writeln!(out, "    fleet:    {fleet}");
    }
}
