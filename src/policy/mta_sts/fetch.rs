//! The HTTPS fetch of a policy, checked as RFC 8461 3.3 says.

use crate::net::https::HttpsError;
use crate::policy::mta_sts::lookup::{PolicyError, PolicyErrorKind};
use crate::policy::mta_sts::policy::{PolicyText, parse_policy};
use crate::policy::mta_sts::store::PolicyStore;

/// RFC 8461 3.3: senders may refuse policies larger than this.
pub const POLICY_BODY_LIMIT: usize = 64 * 1024;

impl PolicyStore {
    /// `GET https://mta-sts.<domain>/.well-known/mta-sts.txt`, checked as RFC 8461 3.3 says.
    pub(super) async fn fetch(&self, domain: &str) -> Result<(PolicyText, String), PolicyError> {
        let url = format!("https://mta-sts.{domain}/.well-known/mta-sts.txt");
        let response = self
            .https
            .get(&url, POLICY_BODY_LIMIT)
            .await
            .map_err(|e| match e {
                HttpsError::Certificate { .. } => {
                    PolicyError::new(PolicyErrorKind::WebpkiInvalid, e.to_string())
                }
                HttpsError::Failed { .. } => {
                    PolicyError::new(PolicyErrorKind::FetchError, e.to_string())
                }
            })?;
        let fetch_error = |detail: String| PolicyError::new(PolicyErrorKind::FetchError, detail);
        if response.status.is_redirection() {
            return Err(fetch_error(format!(
                "{url}: {} (redirects are not followed, RFC 8461 3.3)",
                response.status
            )));
        }
        if response.status != hyper::StatusCode::OK {
            return Err(fetch_error(format!("{url}: {}", response.status)));
        }
        if response.media_type != "text/plain" {
            return Err(fetch_error(format!(
                "{url}: content type {:?}, not text/plain",
                response.media_type
            )));
        }
        let raw = String::from_utf8(response.body.to_vec())
            .map_err(|_| PolicyError::new(PolicyErrorKind::Invalid, format!("{url}: not UTF-8")))?;
        let text = parse_policy(&raw)
            .map_err(|e| PolicyError::new(PolicyErrorKind::Invalid, format!("{url}: {e}")))?;
        Ok((text, raw))
    }
}
