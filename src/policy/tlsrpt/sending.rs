//! Sending the day's reports to the `rua` addresses: by HTTPS POST, or as a multipart/report
//! message handed to `tls_rpt.mail_relay` (RFC 8460 5.3).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hyper::StatusCode;

use crate::net::connection::ExchangeError;
use crate::net::dialer::Dialer;
use crate::net::https::HttpsError;
use crate::outcome::format_date;
use crate::policy::tlsrpt::day::{DAY_SECONDS, DomainDay, Period, UtcDay};
use crate::policy::tlsrpt::discovery::{Rua, parse_tlsrpt_records};
use crate::policy::tlsrpt::{GZIP_MEDIA_TYPE, TlsReports};
use crate::smtp::Reply;

/// What became of one report for one address.
#[derive(Debug)]
pub struct ReportDelivery {
    pub domain: String,
    pub rua: Rua,
    /// Where the report was written (`tls_rpt.directory`), if anywhere.
    pub file: Option<PathBuf>,
    pub result: Result<(), SendError>,
}

/// Why a report did not reach one address.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Https(#[from] HttpsError),
    #[error("{url}: {status}")]
    Status { url: String, status: StatusCode },
    #[error("tls_rpt.mail_relay is not set: mailto: reports are not sent")]
    NoMailRelay,
    #[error("via {relay}: {problem}")]
    Relay {
        relay: SocketAddr,
        problem: RelayProblem,
    },
}

/// What the mail relay did with a report.
#[derive(Debug, thiserror::Error)]
pub enum RelayProblem {
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    #[error("greeting: {}", .0.one_line())]
    Greeting(Reply),
    #[error("{command}: {}", .reply.one_line())]
    Refused { command: String, reply: Reply },
    #[error("after the message: {}", .0.one_line())]
    Message(Reply),
}

impl TlsReports {
    /// Writes and sends the reports of `day` for every domain that publishes a TLS-RPT
    /// record, then forgets the day's counts. Nothing when `tls_rpt.directory` is unset.
    pub async fn send_reports(&self, day: UtcDay) -> Vec<ReportDelivery> {
        let Some(directory) = self.config.directory.clone() else {
            return Vec::new();
        };
        let domains: Vec<String> = match self.counts.lock() {
            Ok(counts) => counts
                .keys()
                .filter(|(d, _)| *d == day)
                .map(|(_, domain)| domain.clone())
                .collect(),
            Err(_) => return Vec::new(),
        };
        let mut deliveries = Vec::new();
        for domain in domains {
            let period = self.period(day, &domain, day.end());
            let Some(report) = self.report(day, &domain) else {
                continue;
            };
            let sent = self.send_report(period, &domain, &report, Some(&directory));
            deliveries.extend(sent.await);
        }
        if let Ok(mut counts) = self.counts.lock() {
            counts.retain(|(d, _), _| *d > day);
        }
        if let Ok(mut sent_until) = self.sent_until.lock() {
            sent_until.retain(|(d, _), _| *d > day);
        }
        deliveries
    }

    /// Sends the reports of today so far now (of `domain`, or of every domain counted),
    /// covering the day from its start, or from the last report sent on demand, to now:
    /// what `ctl tlsrpt send` does, so that an admin sees reporting work before the first
    /// night. The counts sent are forgotten and the night's report starts where this one
    /// ended. Written to `tls_rpt.directory` too when it is set.
    pub async fn send_now(&self, domain: Option<&str>) -> Vec<ReportDelivery> {
        let now = self.clock.now();
        let day = UtcDay::of(now);
        let taken: Vec<(Period, String, DomainDay)> = {
            let (Ok(mut counts), Ok(mut sent_until)) = (self.counts.lock(), self.sent_until.lock())
            else {
                return Vec::new();
            };
            let keys: Vec<(UtcDay, String)> = (counts.keys())
                .filter(|(d, name)| *d == day && domain.is_none_or(|wanted| wanted == name))
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|key| {
                    let policies = counts.remove(&key)?;
                    let start = sent_until.insert(key.clone(), now + 1);
                    let period = Period {
                        day,
                        start: start.unwrap_or(day.start()),
                        end: now,
                    };
                    Some((period, key.1, policies))
                })
                .collect()
        };
        let directory = self.config.directory.clone();
        let mut deliveries = Vec::new();
        for (period, domain, policies) in taken {
            let report = self.report_json(period, &domain, &policies);
            let sent = self.send_report(period, &domain, &report, directory.as_deref());
            deliveries.extend(sent.await);
        }
        deliveries
    }

    /// One domain's report to each of its `rua` addresses (none when it publishes no
    /// TLS-RPT record), written to `directory` first when there is one.
    async fn send_report(
        &self,
        period: Period,
        domain: &str,
        report: &serde_json::Value,
        directory: Option<&std::path::Path>,
    ) -> Vec<ReportDelivery> {
        let records = match (self.resolver)
            .txt_records(&format!("_smtp._tls.{domain}"))
            .await
        {
            Ok(records) => records,
            Err(why) => {
                tracing::debug!(domain, "no TLS-RPT report: {why}");
                return Vec::new();
            }
        };
        let rua = match parse_tlsrpt_records(&records) {
            Ok(rua) => rua,
            Err(why) => {
                tracing::debug!(domain, "no TLS-RPT report: {why}");
                return Vec::new();
            }
        };
        let gzip = match gzip_json(report) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(domain, "TLS-RPT report not compressed: {e}");
                return Vec::new();
            }
        };
        let name = self.file_name(period, domain);
        let file = directory.map(|directory| directory.join(&name));
        if let Some(file) = &file
            && let Err(e) = std::fs::write(file, &gzip)
        {
            tracing::warn!(
                domain,
                "TLS-RPT report not written to {}: {e}",
                file.display()
            );
        }
        let mut deliveries = Vec::new();
        for address in rua {
            let result = match &address {
                Rua::Https(url) => self.post(url, &gzip).await,
                Rua::Mailto(to) => self.mail(period, domain, to, &name, &gzip).await,
            };
            match &result {
                Ok(()) => tracing::info!(domain, rua = %address, "TLS-RPT report sent"),
                Err(e) => {
                    tracing::warn!(domain, rua = %address, "TLS-RPT report not sent: {e}")
                }
            }
            deliveries.push(ReportDelivery {
                domain: domain.to_string(),
                rua: address,
                file: file.clone(),
                result,
            });
        }
        deliveries
    }

    async fn post(&self, url: &str, gzip: &[u8]) -> Result<(), SendError> {
        let response = (self.https.post(url, GZIP_MEDIA_TYPE, gzip.to_vec())).await?;
        match response.status.is_success() {
            true => Ok(()),
            false => Err(SendError::Status {
                url: url.to_string(),
                status: response.status,
            }),
        }
    }

    /// RFC 8460 5.3: a multipart/report message with the gzip report attached, handed to
    /// `tls_rpt.mail_relay`.
    async fn mail(
        &self,
        period: Period,
        domain: &str,
        to: &str,
        file_name: &str,
        gzip: &[u8],
    ) -> Result<(), SendError> {
        let relay = self.config.mail_relay.ok_or(SendError::NoMailRelay)?;
        let message = self.report_message(period, domain, to, file_name, gzip);
        submit(
            &self.dialer,
            relay,
            &self.submitter,
            &self.from,
            to,
            &message,
            &self.timeouts,
        )
        .await
        .map_err(|problem| SendError::Relay { relay, problem })
    }

    fn report_message(
        &self,
        period: Period,
        domain: &str,
        to: &str,
        file_name: &str,
        gzip: &[u8],
    ) -> String {
        let report_id = self.report_id(period, domain);
        let day = period.day;
        let submitter = &self.submitter;
        let boundary = format!("tlsrpt-{}-{}", day.start(), rand::random::<u64>());
        let encoded = base64::engine::general_purpose::STANDARD.encode(gzip);
        let mut attachment = String::with_capacity(encoded.len() + encoded.len() / 76 * 2);
        for line in encoded.as_bytes().chunks(76) {
            attachment.push_str(&String::from_utf8_lossy(line));
            attachment.push_str("\r\n");
        }
        let date = rfc5322_date(self.clock.now());
        let from = &self.from;
        let day_text = day.date();
        format!(
            "From: {from}\r\n\
             To: {to}\r\n\
             Date: {date}\r\n\
             Subject: Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>\r\n\
             Message-ID: <{report_id}>\r\n\
             TLS-Report-Domain: {domain}\r\n\
             TLS-Report-Submitter: {submitter}\r\n\
             TLS-Required: No\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n \
             boundary=\"{boundary}\"\r\n\
             \r\n\
             This is a TLS report (RFC 8460) in MIME format.\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\
             \r\n\
             The SMTP TLS report of {submitter} for {domain} on {day_text} (UTC) is attached.\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Type: {GZIP_MEDIA_TYPE}\r\n\
             Content-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment;\r\n \
             filename=\"{file_name}\"\r\n\
             \r\n\
             {attachment}\
             --{boundary}--\r\n"
        )
    }

    /// Sends yesterday's reports shortly after each UTC midnight, for as long as it runs.
    pub async fn send_daily(self: Arc<Self>) {
        if self.config.directory.is_none() {
            return;
        }
        loop {
            let now = self.clock.now();
            let next_midnight = UtcDay::of(now).start() + DAY_SECONDS;
            // Spread over the first hour, as RFC 8460 5.1 asks, so that relays do not all
            // send at once.
            let spread = rand::random::<u64>() % 3600;
            let wait = next_midnight.saturating_sub(now) + spread;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            let yesterday = UtcDay::of(self.clock.now()).previous();
            self.send_reports(yesterday).await;
        }
    }
}

/// Hands one message to an SMTP server: EHLO, MAIL, RCPT, DATA, in plain.
async fn submit(
    dialer: &Dialer,
    relay: SocketAddr,
    hostname: &str,
    from: &str,
    to: &str,
    message: &str,
    timeouts: &crate::settings::Timeouts,
) -> Result<(), RelayProblem> {
    // Dialled as mail is: from the source address, with the socket mark.
    let mut conn = dialer.connect(&relay.to_string(), relay).await?;
    let result = async {
        let greeting = conn.read_reply(timeouts.greeting, "the greeting").await?;
        if greeting.code != 220 {
            return Err(RelayProblem::Greeting(greeting));
        }
        let steps: [(String, &[u16], &'static str); 4] = [
            (format!("EHLO {hostname}"), &[250], "the reply to EHLO"),
            (format!("MAIL FROM:<{from}>"), &[250], "the reply to MAIL"),
            (format!("RCPT TO:<{to}>"), &[250, 251], "the reply to RCPT"),
            ("DATA".into(), &[354], "the reply to DATA"),
        ];
        for (command, due, what) in steps {
            let reply = conn.exchange(&command, due, timeouts.command, what).await?;
            if !due.contains(&reply.code) {
                return Err(RelayProblem::Refused { command, reply });
            }
        }
        let mut body = Vec::with_capacity(message.len() + 16);
        for line in message.split_inclusive("\r\n") {
            if line.starts_with('.') {
                body.push(b'.');
            }
            body.extend_from_slice(line.as_bytes());
        }
        body.extend_from_slice(b".\r\n");
        conn.write(&body, timeouts.data_block, "the message")
            .await?;
        let reply = (conn.read_reply(timeouts.data_end, "the reply to the final dot")).await?;
        if reply.code != 250 {
            return Err(RelayProblem::Message(reply));
        }
        Ok(())
    }
    .await;
    conn.quit().await;
    result
}

fn gzip_json(report: &serde_json::Value) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    serde_json::to_writer(&mut encoder, report)?;
    encoder.flush()?;
    encoder.finish()
}

/// `Mon, 30 Nov 2026 00:05:00 +0000`.
fn rfc5322_date(unix_seconds: u64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let date = format_date(unix_seconds);
    let mut parts = date.split('-');
    let year = parts.next().unwrap_or("1970");
    let month: usize = parts.next().and_then(|m| m.parse().ok()).unwrap_or(1);
    let day = parts.next().unwrap_or("01");
    let weekday = WEEKDAYS[(unix_seconds / DAY_SECONDS % 7) as usize];
    let seconds = unix_seconds % DAY_SECONDS;
    format!(
        "{weekday}, {day} {} {year} {:02}:{:02}:{:02} +0000",
        MONTHS[month.clamp(1, 12) - 1],
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tlsrpt::counting::rfc3339;

    #[test]
    fn dates_are_written_as_the_rfcs_want() {
        // 2026-12-01 is a Tuesday.
        let t = 1_796_083_200 + 11 * 3600 + 21 * 60 + 2;
        assert_eq!(rfc3339(t), "2026-12-01T11:21:02Z");
        assert_eq!(rfc5322_date(t), "Tue, 01 Dec 2026 11:21:02 +0000");
        assert_eq!(UtcDay::of(t).date(), "2026-12-01");
        assert_eq!(rfc3339(UtcDay::of(t).end()), "2026-12-01T23:59:59Z");
    }
}
