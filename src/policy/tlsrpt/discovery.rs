//! Where a domain wants its reports: the `_smtp._tls` TXT record (RFC 8460 3).

use std::fmt;

use serde::Serialize;

/// Why a domain's `_smtp._tls` TXT answer gives no address for reports.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("no v=TLSRPTv1 record")]
    NoRecord,
    #[error("{0} v=TLSRPTv1 records, RFC 8460 wants one")]
    Several(usize),
    #[error("{0:?} is not name=value")]
    NotNameValue(String),
    #[error("rua given twice")]
    RuaTwice,
    #[error("no rua")]
    NoRua,
    #[error("no https: or mailto: address in rua")]
    NoUsableRua,
}

/// Where a domain wants its reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Rua {
    Https(String),
    /// The mailbox, percent-decoded, without any `?` header fields.
    Mailto(String),
}

impl fmt::Display for Rua {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rua::Https(url) => f.write_str(url),
            Rua::Mailto(address) => {
                // A mailbox may hold what a URI or the record's list would read as a
                // delimiter (`a?b@example.com` is a valid address): written encoded, it
                // reads back as the same address.
                f.write_str("mailto:")?;
                for c in address.chars() {
                    match c {
                        '%' | '?' | ',' | ';' => write!(f, "%{:02X}", c as u32)?,
                        _ => write!(f, "{c}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

/// Parses the `_smtp._tls` TXT records of a domain: exactly one must start with
/// `v=TLSRPTv1` (RFC 8460 3), with an `rua` of `https:` or `mailto:` URIs. URIs of other
/// schemes are skipped; a record with none usable is an error.
pub fn parse_tlsrpt_records(records: &[String]) -> Result<Vec<Rua>, RecordError> {
    let candidates: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.strip_prefix("v=TLSRPTv1").is_some_and(|rest| {
                let rest = rest.trim_start_matches([' ', '\t']);
                rest.is_empty() || rest.starts_with(';')
            })
        })
        .collect();
    let record = match candidates.as_slice() {
        [] => return Err(RecordError::NoRecord),
        [one] => *one,
        more => return Err(RecordError::Several(more.len())),
    };
    let mut rua = None;
    for field in record
        .split(';')
        .skip(1)
        .map(|f| f.trim_matches([' ', '\t']))
    {
        if field.is_empty() {
            continue;
        }
        let (name, value) = field
            .split_once('=')
            .ok_or_else(|| RecordError::NotNameValue(field.to_string()))?;
        if name == "rua" {
            if rua.is_some() {
                return Err(RecordError::RuaTwice);
            }
            let uris: Vec<Rua> = value
                .split(',')
                .map(|u| u.trim_matches([' ', '\t']))
                .filter_map(parse_rua)
                .collect();
            rua = Some(uris);
        }
    }
    match rua {
        None => Err(RecordError::NoRua),
        Some(uris) if uris.is_empty() => Err(RecordError::NoUsableRua),
        Some(uris) => Ok(uris),
    }
}

/// One `rua` URI, if it is an `https:` or `mailto:` address. What a domain publishes is
/// read byte-safely: a multi-byte character anywhere is no reason to stop.
pub fn parse_rua(uri: &str) -> Option<Rua> {
    let is_https = uri
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
    if is_https && uri.len() > 8 {
        return uri
            .parse::<hyper::Uri>()
            .ok()
            .map(|_| Rua::Https(uri.to_string()));
    }
    let rest = uri
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("mailto:"))
        .map(|_| &uri[7..])?;
    let address = percent_decode(rest.split('?').next()?)?;
    let (local, domain) = address.rsplit_once('@')?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>')
    };
    (plain(local) && plain(domain)).then_some(Rua::Mailto(address))
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multibyte_character_anywhere_in_a_record_is_no_reason_to_panic() {
        for record in [
            "v=TLSRPTv1; rua=abcdefg\u{e9}",
            "v=TLSRPTv1; rua=https:/\u{e9}x",
            "v=TLSRPTv1; rua=mailto\u{e9}:a@b",
            "v=TLSRPTv1; rua=\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
        ] {
            assert!(
                parse_tlsrpt_records(&[record.to_string()]).is_err(),
                "{record}"
            );
        }
        assert_eq!(
            parse_tlsrpt_records(&["v=TLSRPTv1; rua=abcdefg\u{e9},mailto:r@example.com".into()]),
            Ok(vec![Rua::Mailto("r@example.com".into())])
        );
    }

    #[test]
    fn a_mailto_address_written_out_reads_back_as_itself() {
        for uri in [
            "mailto:a%3fC@exa",
            "mailto:a%25b@c",
            "mailto:x%2Cy%3Bz@example.com",
        ] {
            let rua = parse_rua(uri).expect(uri);
            assert_eq!(parse_rua(&rua.to_string()), Some(rua), "{uri}");
        }
    }

    #[test]
    fn tlsrpt_records_give_https_and_mailto_addresses() {
        let one = |r: &str| parse_tlsrpt_records(&[r.to_string()]);
        assert_eq!(
            one("v=TLSRPTv1; rua=mailto:reports@example.com,https://r.example.com/tlsrpt"),
            Ok(vec![
                Rua::Mailto("reports@example.com".into()),
                Rua::Https("https://r.example.com/tlsrpt".into())
            ])
        );
        assert_eq!(
            one("v=TLSRPTv1;rua=mailto:a%2Cb@example.com?subject=x"),
            Ok(vec![Rua::Mailto("a,b@example.com".into())])
        );
        assert!(one("v=TLSRPTv1;").is_err());
        assert!(one("v=TLSRPTv1; rua=ftp://example.com/").is_err());
        assert!(one("v=TLSRPTv2; rua=mailto:a@b").is_err());
        let two = [
            "v=TLSRPTv1; rua=mailto:a@b".to_string(),
            "v=TLSRPTv1; rua=mailto:c@d".to_string(),
        ];
        assert!(parse_tlsrpt_records(&two).is_err());
    }
}
