//! Reading the TLS-RPT reports tlsrouter sends: the gzip JSON, and the attachment of a
//! mailed report.

use std::io::Read;

use base64::Engine;

/// The JSON report in a gzip stream.
pub fn gunzip(bytes: &[u8]) -> serde_json::Value {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .expect("a gzip stream");
    serde_json::from_str(&text).expect("JSON")
}

/// The base64 part after the gzip part's headers, up to the closing boundary.
pub fn attachment_of(message: &str) -> Vec<u8> {
    let start = message
        .find("Content-Type: application/tlsrpt+gzip")
        .expect("a gzip part");
    let part = &message[start..];
    let body_start = part.find("\r\n\r\n").expect("the part's headers end") + 4;
    let body = &part[body_start..];
    let body_end = body.find("\r\n--").expect("the closing boundary");
    let base64: String = body[..body_end].split("\r\n").collect();
    base64::engine::general_purpose::STANDARD
        .decode(base64)
        .expect("base64")
}
