//! `mta_sts:` in the configuration.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtaStsConfig {
    /// Look up and apply MTA-STS policies.
    pub enabled: bool,
    /// The longest a message waits for a policy lookup; a fetch that takes longer goes on in
    /// the background and the next message has its result.
    #[serde(with = "crate::settings::duration")]
    pub wait: Duration,
    /// TCP connect to the policy host.
    #[serde(with = "crate::settings::duration")]
    pub connect_timeout: Duration,
    /// The whole fetch: connect, handshake, request and body.
    #[serde(with = "crate::settings::duration")]
    pub fetch_timeout: Duration,
    /// After a failed fetch, the next one for the domain waits this long.
    #[serde(with = "crate::settings::duration")]
    pub retry_after_failure: Duration,
    /// How often cached policies are checked for a refresh, so that a domain mailed
    /// rarely still has a current policy (RFC 8461 5.1: refresh before expiry, not only
    /// when sending). `0s` refreshes only when a message needs the policy.
    #[serde(with = "crate::settings::duration")]
    pub refresh_interval: Duration,
    /// The most policy domains remembered.
    pub max_policies: usize,
    /// For labs and tests only: HTTPS host names (`mta-sts.example.com`) connected to at
    /// another `address:port`, as `delivery.port` does for SMTP. The certificate must still
    /// be valid for the host name.
    pub connect_to: HashMap<String, SocketAddr>,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            enabled: true,
            wait: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(30),
            retry_after_failure: Duration::from_secs(5 * 60),
            refresh_interval: Duration::from_secs(60 * 60),
            max_policies: 100_000,
            connect_to: HashMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_config_sections_refuse_unknown_keys_and_default_to_on_without_reports() {
        use crate::config::Config;
        let config = Config::parse("", Path::new("t.yaml")).unwrap();
        assert!(config.mta_sts.enabled);
        assert_eq!(config.mta_sts.wait, Duration::from_secs(2));
        assert!(config.tls_rpt.directory.is_none());
        let error = Config::parse("mta_sts:\n  wiat: 2s\n", Path::new("t.yaml")).unwrap_err();
        assert!(error.to_string().starts_with("t.yaml:2:3: "), "{error}");
        let error =
            Config::parse("tls_rpt:\n  mail_relay: nowhere\n", Path::new("t.yaml")).unwrap_err();
        assert!(error.to_string().starts_with("t.yaml:2:"), "{error}");
        let config = Config::parse(
            "mta_sts:\n  connect_to: { \"mta-sts.lab.test\": \"127.0.0.1:8443\" }\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        assert_eq!(
            config.mta_sts.connect_to.get("mta-sts.lab.test"),
            Some(&"127.0.0.1:8443".parse().unwrap())
        );
    }
}
