//! SMTP commands as the MTA sends them to us (RFC 5321 section 4.1).

use std::fmt;

/// A mailbox `local@domain`, kept as sent (the local part is the remote's business).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    pub local: String,
    pub domain: String,
    /// The domain as rules, MTA-STS, DANE, the cache and DNS know it: A-labels, lower case.
    routing: String,
}

impl Mailbox {
    /// The domain in its A-label form (punycode), lower case: what routing uses.
    pub fn routing_domain(&self) -> &str {
        &self.routing
    }
}

/// A domain as DNS knows it: an internationalised name turned into A-labels (IDNA, with
/// the host name rules), everything in lower case; `None` when it is no valid IDNA name.
/// An address literal stays as it is.
pub fn a_label(domain: &str) -> Option<String> {
    if domain.is_ascii() {
        return Some(domain.to_ascii_lowercase());
    }
    idna::domain_to_ascii_strict(domain).ok()
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The BODY= parameter of MAIL FROM (RFC 6152).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// The RET= parameter of MAIL FROM (RFC 3461 4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

/// The MAIL FROM parameters we understand and pass on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
    /// DSN (RFC 3461): what a bounce should return, and the envelope id, as xtext as sent.
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    /// REQUIRETLS (RFC 8689): the message travels only over verified TLS, every hop.
    pub requiretls: bool,
}

/// The RCPT TO parameters of DSN (RFC 3461 4.1, 4.2), as sent once checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RcptParams {
    /// `NEVER`, or a comma-separated list of SUCCESS, FAILURE and DELAY, upper case.
    pub notify: Option<String>,
    /// `addr-type;xtext`, as sent.
    pub orcpt: Option<String>,
}

impl RcptParams {
    /// The parameters as they go to the remote: only to one that offers DSN.
    pub fn to_wire(&self, remote: &crate::smtp::ehlo::Capabilities) -> String {
        let mut out = String::new();
        if !remote.dsn {
            return out;
        }
        if let Some(notify) = &self.notify {
            out.push_str(&format!(" NOTIFY={notify}"));
        }
        if let Some(orcpt) = &self.orcpt {
            out.push_str(&format!(" ORCPT={orcpt}"));
        }
        out
    }

    /// The first DSN parameter, as a session that did not offer DSN names it in its 555.
    pub fn first_dsn_parameter(&self) -> Option<String> {
        (self.notify.as_ref().map(|n| format!("NOTIFY={n}")))
            .or_else(|| self.orcpt.as_ref().map(|o| format!("ORCPT={o}")))
    }
}

/// The remote lacks an extension without which the message cannot be passed on.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("does not support {0}, which this message needs")]
pub struct MissingExtension(pub &'static str);

impl MailParams {
    /// The parameters as they go to the remote. SIZE and BODY go only where the remote
    /// knows them; 8-bit text still goes as it is, since a cut-through relay cannot convert
    /// it (as most MTAs do). SMTPUTF8 addresses and headers cannot go to a remote without
    /// SMTPUTF8 at all (RFC 6531 3.2).
    pub fn to_wire(
        &self,
        remote: &crate::smtp::ehlo::Capabilities,
    ) -> Result<String, MissingExtension> {
        if self.smtputf8 && !remote.smtputf8 {
            return Err(MissingExtension("SMTPUTF8"));
        }
        if self.requiretls && !remote.requiretls {
            return Err(MissingExtension("REQUIRETLS"));
        }
        let mut out = String::new();
        if let Some(size) = self.size.filter(|_| remote.size.is_some()) {
            out.push_str(&format!(" SIZE={size}"));
        }
        if remote.eight_bit_mime {
            match self.body {
                Some(Body::EightBitMime) => out.push_str(" BODY=8BITMIME"),
                Some(Body::SevenBit) => out.push_str(" BODY=7BIT"),
                None => {}
            }
        }
        if self.smtputf8 {
            out.push_str(" SMTPUTF8");
        }
        if self.requiretls {
            out.push_str(" REQUIRETLS");
        }
        if remote.dsn {
            match self.ret {
                Some(Ret::Full) => out.push_str(" RET=FULL"),
                Some(Ret::Hdrs) => out.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &self.envid {
                out.push_str(&format!(" ENVID={envid}"));
            }
        }
        Ok(out)
    }

    /// The first DSN parameter, as a session that did not offer DSN names it in its 555.
    pub fn first_dsn_parameter(&self) -> Option<String> {
        let ret = self.ret.map(|ret| match ret {
            Ret::Full => "RET=FULL".to_string(),
            Ret::Hdrs => "RET=HDRS".to_string(),
        });
        ret.or_else(|| self.envid.as_ref().map(|e| format!("ENVID={e}")))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// `None` is the null reverse path `<>` of bounces.
    Mail(Option<Mailbox>, MailParams),
    Rcpt(Mailbox, RcptParams),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
}

/// Why a command line was not accepted; each maps to one reply.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command not recognized")]
    Unknown,
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    #[error("parameter not recognized: {0}")]
    UnknownParameter(String),
    /// A DSN parameter whose value is malformed; a session that did not offer DSN answers
    /// it as an unknown parameter.
    #[error("bad {param}: {why}")]
    BadDsnParameter { param: String, why: &'static str },
    /// A domain in Unicode that is no valid internationalised domain name (IDNA).
    #[error("{domain} is not a valid internationalised domain name")]
    BadIdna { domain: String, sender: bool },
}

impl CommandError {
    /// The reply this error gets (RFC 5321 4.2.3, RFC 3463).
    pub fn reply(&self) -> crate::smtp::reply::Reply {
        use crate::smtp::reply::Reply;
        match self {
            CommandError::Unknown => Reply::new(500, "5.5.1", "command not recognized"),
            CommandError::Syntax(why) => Reply::new(501, "5.5.4", format!("syntax error: {why}")),
            CommandError::UnknownParameter(p) => {
                Reply::new(555, "5.5.4", format!("parameter not recognized: {p}"))
            }
            CommandError::BadDsnParameter { param, why } => {
                Reply::new(501, "5.5.4", format!("syntax error: {param}: {why}"))
            }
            // RFC 3463: bad destination (5.1.3) or sender (5.1.7) mailbox address syntax.
            CommandError::BadIdna { sender, .. } => {
                let code = if *sender { "5.1.7" } else { "5.1.3" };
                Reply::new(501, code, self)
            }
        }
    }
}

/// Parses one command line (without CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    let line = std::str::from_utf8(line).map_err(|_| CommandError::Syntax("not UTF-8"))?;
    // A CR or NUL inside a command could become a second command at a lenient remote, and
    // so could NEL or a Unicode line separator at one that splits lines on them.
    if line
        .chars()
        .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
    {
        return Err(CommandError::Syntax("control characters are not allowed"));
    }
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let no_args = |cmd: Command| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(CommandError::Syntax("this command takes no arguments"))
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" => Ok(Command::Ehlo(parse_domain_arg(rest)?)),
        "HELO" => Ok(Command::Helo(parse_domain_arg(rest)?)),
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest),
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        "QUIT" => no_args(Command::Quit),
        "STARTTLS" => no_args(Command::StartTls),
        // NOOP and HELP may carry a string that is ignored; VRFY's argument is not checked.
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "VRFY" => Ok(Command::Vrfy),
        _ => Err(CommandError::Unknown),
    }
}

fn parse_domain_arg(rest: &str) -> Result<String, CommandError> {
    let name = rest.trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(CommandError::Syntax(
            "expected one domain or address literal",
        ));
    }
    Ok(name.to_string())
}

/// Splits `PREFIX:<path> params` into the path and the parameters.
fn split_path<'a>(rest: &'a str, prefix: &str) -> Result<(&'a str, &'a str), CommandError> {
    let head = rest
        .get(..prefix.len())
        .filter(|h| h.eq_ignore_ascii_case(prefix))
        .ok_or(CommandError::Syntax(
            "expected FROM:<address> or TO:<address>",
        ))?;
    let after = rest[head.len()..].trim_start();
    let after = after
        .strip_prefix('<')
        .ok_or(CommandError::Syntax("address must be in angle brackets"))?;
    let end = after
        .find('>')
        .ok_or(CommandError::Syntax("missing closing angle bracket"))?;
    let params = &after[end + 1..];
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(CommandError::Syntax("text after the address"));
    }
    Ok((&after[..end], params.trim()))
}

fn parse_mail(rest: &str) -> Result<Command, CommandError> {
    let (path, params) = split_path(rest, "FROM:")?;
    let sender = if path.is_empty() {
        None
    } else {
        Some(parse_mailbox(path, true)?)
    };
    let mut parsed = MailParams::default();
    for param in params.split_ascii_whitespace() {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v)) => {
                parsed.size = Some(v.parse().map_err(|_| CommandError::Syntax("bad SIZE"))?)
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {
                parsed.body = Some(Body::EightBitMime)
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => {
                parsed.body = Some(Body::SevenBit)
            }
            ("SMTPUTF8", None) => parsed.smtputf8 = true,
            ("REQUIRETLS", None) => parsed.requiretls = true,
            ("RET", value) => {
                let ret = match value.map(str::to_ascii_uppercase).as_deref() {
                    Some("FULL") => Ret::Full,
                    Some("HDRS") => Ret::Hdrs,
                    _ => return Err(bad_dsn(param, "expected RET=FULL or RET=HDRS")),
                };
                if parsed.ret.replace(ret).is_some() {
                    return Err(bad_dsn(param, "given twice"));
                }
            }
            ("ENVID", value) => {
                // RFC 3461 4.4: at most 100 characters of xtext.
                let envid = value
                    .filter(|v| !v.is_empty() && v.len() <= 100 && is_xtext(v))
                    .ok_or_else(|| bad_dsn(param, "expected at most 100 characters of xtext"))?;
                if parsed.envid.replace(envid.to_string()).is_some() {
                    return Err(bad_dsn(param, "given twice"));
                }
            }
            _ => return Err(CommandError::UnknownParameter(param.to_string())),
        }
    }
    Ok(Command::Mail(sender, parsed))
}

fn bad_dsn(param: &str, why: &'static str) -> CommandError {
    CommandError::BadDsnParameter {
        param: param.to_string(),
        why,
    }
}

/// xtext (RFC 3461 4): printable ASCII but `+` and `=`, and `+` followed by two upper-case
/// hex digits.
fn is_xtext(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                let hex = |b: u8| b.is_ascii_digit() || (b'A'..=b'F').contains(&b);
                if !bytes
                    .get(i + 1..i + 3)
                    .is_some_and(|h| h.iter().all(|&b| hex(b)))
                {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if bytes[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

/// `NOTIFY=NEVER` or a list of SUCCESS, FAILURE, DELAY, each at most once (RFC 3461 4.1).
fn parse_notify(value: &str) -> Option<String> {
    let value = value.to_ascii_uppercase();
    if value == "NEVER" {
        return Some(value);
    }
    let mut seen = Vec::new();
    for item in value.split(',') {
        if !matches!(item, "SUCCESS" | "FAILURE" | "DELAY") || seen.contains(&item) {
            return None;
        }
        seen.push(item);
    }
    Some(value)
}

/// `ORCPT=addr-type;xtext` (RFC 3461 4.2): the type an atom, the whole at most 500 characters.
fn is_orcpt(value: &str) -> bool {
    let Some((addr_type, address)) = value.split_once(';') else {
        return false;
    };
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    // RFC 6533: a `utf-8` address may hold non-ASCII characters (as in an SMTPUTF8
    // session), never `+` or `=`.
    let utf8_text = |a: &str| {
        a.chars()
            .all(|c| !c.is_ascii() || (c.is_ascii_graphic() && c != '+' && c != '='))
    };
    let address_ok = match addr_type.eq_ignore_ascii_case("utf-8") {
        true => utf8_text(address),
        false => is_xtext(address),
    };
    value.len() <= 500
        && !addr_type.is_empty()
        && addr_type.chars().all(atext)
        && !address.is_empty()
        && address_ok
}

fn parse_rcpt(rest: &str) -> Result<Command, CommandError> {
    let (path, params) = split_path(rest, "TO:")?;
    let mut parsed = RcptParams::default();
    for param in params.split_ascii_whitespace() {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        match key.to_ascii_uppercase().as_str() {
            "NOTIFY" => {
                let notify = value.and_then(parse_notify).ok_or_else(|| {
                    bad_dsn(param, "expected NEVER or a list of SUCCESS, FAILURE, DELAY")
                })?;
                if parsed.notify.replace(notify).is_some() {
                    return Err(bad_dsn(param, "given twice"));
                }
            }
            "ORCPT" => {
                let orcpt = value
                    .filter(|v| is_orcpt(v))
                    .ok_or_else(|| bad_dsn(param, "expected addr-type;xtext"))?;
                if parsed.orcpt.replace(orcpt.to_string()).is_some() {
                    return Err(bad_dsn(param, "given twice"));
                }
            }
            _ => return Err(CommandError::UnknownParameter(param.to_string())),
        }
    }
    // A source route (`@a,@b:user@c`) is obsolete; RFC 5321 says to ignore it.
    let path = match path.rfind(':') {
        Some(i) if path.starts_with('@') => &path[i + 1..],
        _ => path,
    };
    Ok(Command::Rcpt(parse_mailbox(path, false)?, parsed))
}

fn parse_mailbox(path: &str, sender: bool) -> Result<Mailbox, CommandError> {
    let at = path
        .rfind('@')
        .ok_or(CommandError::Syntax("address has no domain"))?;
    let (local, domain) = (&path[..at], &path[at + 1..]);
    if local.is_empty() {
        return Err(CommandError::Syntax("address has an empty local part"));
    }
    if !is_domain_or_literal(domain) {
        return Err(CommandError::Syntax("address has an invalid domain"));
    }
    let routing = a_label(domain).ok_or_else(|| CommandError::BadIdna {
        domain: domain.to_string(),
        sender,
    })?;
    Ok(Mailbox {
        local: local.to_string(),
        domain: domain.to_string(),
        routing,
    })
}

fn is_domain_or_literal(domain: &str) -> bool {
    if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        let ip = literal.strip_prefix("IPv6:").unwrap_or(literal);
        return ip.parse::<std::net::IpAddr>().is_ok();
    }
    !domain.is_empty()
        && domain.len() <= 255
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || !c.is_ascii())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internationalised_domain_is_routed_by_its_a_labels_and_sent_as_written() {
        let Ok(Command::Rcpt(rcpt, _)) =
            parse_command("RCPT TO:<j\u{fc}rgen@B\u{fc}cher.example>".as_bytes())
        else {
            panic!("parsed");
        };
        assert_eq!(rcpt.routing_domain(), "xn--bcher-kva.example");
        assert_eq!(rcpt.to_string(), "j\u{fc}rgen@B\u{fc}cher.example");
        let Ok(Command::Rcpt(ascii, _)) = parse_command(b"RCPT TO:<a@Example.COM>") else {
            panic!("parsed");
        };
        assert_eq!(ascii.routing_domain(), "example.com");
        // No valid IDNA name: the recipient's 5.1.3, the sender's 5.1.7.
        let bad = parse_command("RCPT TO:<a@\u{300}b.example>".as_bytes()).expect_err("refused");
        assert_eq!(
            (bad.reply().code, bad.reply().enhanced()),
            (501, Some("5.1.3"))
        );
        let bad = parse_command("MAIL FROM:<a@\u{300}b.example>".as_bytes()).expect_err("refused");
        assert_eq!(
            (bad.reply().code, bad.reply().enhanced()),
            (501, Some("5.1.7"))
        );
    }

    fn mailbox(s: &str) -> Mailbox {
        parse_mailbox(s, false).unwrap()
    }

    #[test]
    fn mail_from_with_parameters_is_parsed() {
        let cmd = parse_command(b"MAIL FROM:<a@b.example> SIZE=1234 BODY=8BITMIME SMTPUTF8");
        let params = MailParams {
            size: Some(1234),
            body: Some(Body::EightBitMime),
            smtputf8: true,
            ..MailParams::default()
        };
        assert_eq!(cmd, Ok(Command::Mail(Some(mailbox("a@b.example")), params)));
        assert_eq!(
            parse_command(b"mail from:<>"),
            Ok(Command::Mail(None, MailParams::default()))
        );
    }

    #[test]
    fn requiretls_is_parsed_and_goes_only_to_a_remote_that_offers_it() {
        let Ok(Command::Mail(_, params)) = parse_command(b"MAIL FROM:<a@b.example> requiretls")
        else {
            panic!("MAIL FROM with REQUIRETLS refused");
        };
        assert!(params.requiretls);
        assert_eq!(
            parse_command(b"MAIL FROM:<a@b.example> REQUIRETLS=YES"),
            Err(CommandError::UnknownParameter("REQUIRETLS=YES".into()))
        );
        let offers = |keyword: &str| {
            let ehlo =
                crate::smtp::Reply::multiline(250, vec!["mx.example".into(), keyword.into()]);
            crate::smtp::Capabilities::from_ehlo(&ehlo)
        };
        assert_eq!(
            params.to_wire(&offers("SIZE")),
            Err(MissingExtension("REQUIRETLS"))
        );
        assert_eq!(
            params.to_wire(&offers("REQUIRETLS")).as_deref(),
            Ok(" REQUIRETLS")
        );
    }

    #[test]
    fn dsn_parameters_are_parsed_and_kept_as_sent() {
        let cmd = parse_command(b"MAIL FROM:<a@b.example> ret=hdrs ENVID=QQ+2B314159");
        let params = MailParams {
            ret: Some(Ret::Hdrs),
            envid: Some("QQ+2B314159".into()),
            ..MailParams::default()
        };
        assert_eq!(cmd, Ok(Command::Mail(Some(mailbox("a@b.example")), params)));
        let cmd =
            parse_command(b"RCPT TO:<u@d.example> notify=success,delay ORCPT=rfc822;u+40d.example");
        let params = RcptParams {
            notify: Some("SUCCESS,DELAY".into()),
            orcpt: Some("rfc822;u+40d.example".into()),
        };
        assert_eq!(cmd, Ok(Command::Rcpt(mailbox("u@d.example"), params)));
        let utf8 = "RCPT TO:<jürgen@bücher.example> ORCPT=utf-8;jürgen@bücher.example";
        assert!(matches!(
            parse_command(utf8.as_bytes()),
            Ok(Command::Rcpt(_, RcptParams { orcpt: Some(o), .. })) if o == "utf-8;jürgen@bücher.example"
        ));
        assert!(matches!(
            parse_command("RCPT TO:<u@d.example> ORCPT=rfc822;jürgen@d.example".as_bytes()),
            Err(CommandError::BadDsnParameter { .. })
        ));
        assert!(matches!(
            parse_command(b"RCPT TO:<u@d.example> NOTIFY=NEVER"),
            Ok(Command::Rcpt(_, RcptParams { notify: Some(n), orcpt: None })) if n == "NEVER"
        ));
    }

    #[test]
    fn a_malformed_dsn_value_is_a_syntax_error_and_an_unknown_parameter_stays_unknown() {
        for bad in [
            "MAIL FROM:<a@b.example> RET=ALL",
            "MAIL FROM:<a@b.example> RET",
            "MAIL FROM:<a@b.example> RET=FULL RET=HDRS",
            "MAIL FROM:<a@b.example> ENVID=",
            "MAIL FROM:<a@b.example> ENVID=a=b",
            "MAIL FROM:<a@b.example> ENVID=a+2b",
            "MAIL FROM:<a@b.example> ENVID=a+4",
            &format!("MAIL FROM:<a@b.example> ENVID={}", "x".repeat(101)),
            "RCPT TO:<u@d.example> NOTIFY=",
            "RCPT TO:<u@d.example> NOTIFY=NEVER,SUCCESS",
            "RCPT TO:<u@d.example> NOTIFY=SUCCESS,SUCCESS",
            "RCPT TO:<u@d.example> NOTIFY=SOMETIMES",
            "RCPT TO:<u@d.example> ORCPT=u@d.example",
            "RCPT TO:<u@d.example> ORCPT=;u@d.example",
            "RCPT TO:<u@d.example> ORCPT=rfc822;",
            "RCPT TO:<u@d.example> ORCPT=rfc822;a=b",
            "RCPT TO:<u@d.example> ORCPT=rfc822;a ORCPT=rfc822;b",
        ] {
            let error = parse_command(bad.as_bytes()).unwrap_err();
            assert!(
                matches!(error, CommandError::BadDsnParameter { .. }),
                "{bad}: {error:?}"
            );
            assert_eq!(
                (error.reply().code, error.reply().enhanced()),
                (501, Some("5.5.4")),
                "{bad}"
            );
        }
        let error = parse_command(b"RCPT TO:<u@d.example> FOO=1").unwrap_err();
        assert_eq!(error, CommandError::UnknownParameter("FOO=1".into()));
        assert_eq!(error.reply().code, 555);
    }

    #[test]
    fn dsn_parameters_go_only_to_a_remote_that_offers_dsn() {
        let Ok(Command::Mail(_, mail)) =
            parse_command(b"MAIL FROM:<a@b.example> RET=FULL ENVID=x1")
        else {
            panic!("MAIL FROM should parse");
        };
        let Ok(Command::Rcpt(_, rcpt)) =
            parse_command(b"RCPT TO:<u@d.example> NOTIFY=FAILURE ORCPT=rfc822;u@d.example")
        else {
            panic!("RCPT TO should parse");
        };
        let mut remote = crate::smtp::ehlo::Capabilities::default();
        assert_eq!(mail.to_wire(&remote), Ok(String::new()));
        assert_eq!(rcpt.to_wire(&remote), "");
        remote.dsn = true;
        assert_eq!(mail.to_wire(&remote), Ok(" RET=FULL ENVID=x1".into()));
        assert_eq!(
            rcpt.to_wire(&remote),
            " NOTIFY=FAILURE ORCPT=rfc822;u@d.example"
        );
        assert_eq!(mail.first_dsn_parameter().as_deref(), Some("RET=FULL"));
        assert_eq!(
            rcpt.first_dsn_parameter().as_deref(),
            Some("NOTIFY=FAILURE")
        );
    }

    #[test]
    fn rcpt_accepts_address_literals_and_drops_source_routes() {
        assert_eq!(
            parse_command(b"RCPT TO:<@relay.example:u@d.example>"),
            Ok(Command::Rcpt(mailbox("u@d.example"), RcptParams::default()))
        );
        assert!(parse_command(b"RCPT TO:<u@[127.0.0.1]>").is_ok());
        assert!(parse_command(b"RCPT TO:<u@[IPv6:::1]>").is_ok());
    }

    #[test]
    fn bad_syntax_gets_the_right_error() {
        assert_eq!(parse_command(b"FOO"), Err(CommandError::Unknown));
        assert!(matches!(
            parse_command(b"MAIL FROM:a@b"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            parse_command(b"RCPT TO:<nodomain>"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            parse_command(b"RCPT TO:<u@bad..domain>"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            parse_command(b"MAIL FROM:<a@b.example> FOO=1"),
            Err(CommandError::UnknownParameter(_))
        ));
        assert!(matches!(
            parse_command(b"DATA now"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            parse_command(b"EHLO"),
            Err(CommandError::Syntax(_))
        ));
        assert_eq!(CommandError::Unknown.reply().code, 500);
    }

    #[test]
    fn control_characters_and_line_separators_are_refused_anywhere_in_a_command() {
        for bad in [
            "\r", "\n", "\0", "\t", "\x7f", "\u{85}", "\u{2028}", "\u{2029}",
        ] {
            for line in [
                format!("MAIL FROM:<a{bad}b@c.example>"),
                format!("RCPT TO:<u@d.example{bad}>"),
                format!("EHLO x{bad}y"),
                format!("NOOP {bad}"),
            ] {
                assert_eq!(
                    parse_command(line.as_bytes()),
                    Err(CommandError::Syntax("control characters are not allowed")),
                    "{line:?}"
                );
            }
        }
        assert_eq!(
            parse_command("RCPT TO:<jürgen@bücher.example>".as_bytes()),
            Ok(Command::Rcpt(
                mailbox("jürgen@bücher.example"),
                RcptParams::default()
            ))
        );
    }

    #[test]
    fn every_prefix_of_a_command_parses_or_errs_without_panicking() {
        let line = b"MAIL FROM:<a@b.example> SIZE=12 BODY=8BITMIME SMTPUTF8";
        for end in 0..=line.len() {
            let _ = parse_command(&line[..end]);
        }
    }
}
