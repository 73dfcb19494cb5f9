//! AUTH to a smart host: PLAIN or LOGIN, over authenticated TLS only.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::{AttemptFailure, Broken, Reached};
use crate::net::connection::{Connection, ExchangeError};
use crate::net::dns::ServerId;
use crate::outbound::credentials::CredentialsError;
use crate::outbound::delivery::Outbound;
use crate::outcome::TlsOutcome;
use crate::rules::model::AuthSpec;
use crate::smtp::Reply;

/// Why a smart host's AUTH did not go through. Mail waits (4xx) until an admin sees to it.
#[derive(Debug, thiserror::Error)]
pub enum AuthFailure {
    /// The legacy stack never authenticates the server: the password could go to anyone
    /// in the middle.
    #[error("{0}: no AUTH over unauthenticated legacy TLS")]
    LegacyTls(ServerId),
    #[error("{0}: AUTH only over TLS")]
    NotTls(String),
    #[error("smarthost credentials: {0}")]
    Credentials(CredentialsError),
    #[error("{0} offers neither AUTH PLAIN nor LOGIN")]
    NoMechanism(String),
    #[error("{host} refused AUTH: {reply}")]
    Refused { host: String, reply: Reply },
}

impl AuthFailure {
    /// What the MTA is told.
    pub fn reply(&self) -> Reply {
        let code = match self {
            AuthFailure::LegacyTls(_) | AuthFailure::NotTls(_) => "4.7.5",
            AuthFailure::Credentials(_) => "4.3.5",
            AuthFailure::NoMechanism(_) | AuthFailure::Refused { .. } => "4.7.0",
        };
        Reply::new(451, code, self)
    }
}

impl Outbound {
    /// AUTH PLAIN or LOGIN, over TLS only, with credentials read now (so they can rotate).
    pub(super) async fn authenticate(
        &self,
        reached: &mut Reached,
        server: &ServerId,
        auth: &AuthSpec,
    ) -> Result<(), AttemptFailure> {
        let host = reached.conn.host.clone();
        match &reached.tls {
            TlsOutcome::Legacy(_) => return Err(AuthFailure::LegacyTls(server.clone()).into()),
            TlsOutcome::Plain(_) => return Err(AuthFailure::NotTls(host).into()),
            TlsOutcome::Encrypted(_) => {}
        }
        let (user, password) =
            crate::outbound::credentials::read(auth).map_err(AuthFailure::Credentials)?;
        let timeout = self.timeouts.command;
        let what = "the reply to AUTH";
        let (conn, caps) = (&mut reached.conn, &reached.caps);
        let exchange = if caps.auth.iter().any(|m| m == "PLAIN") {
            let token = BASE64.encode(format!("\0{user}\0{password}"));
            let line = format!("AUTH PLAIN {token}");
            conn.command_secret(&line, "AUTH PLAIN ****", timeout, what)
                .await
        } else if caps.auth.iter().any(|m| m == "LOGIN") {
            self.auth_login(conn, &user, &password).await
        } else {
            return Err(AuthFailure::NoMechanism(host).into());
        };
        match exchange {
            Ok(reply) if reply.code == 235 => Ok(()),
            Ok(reply) => Err(AuthFailure::Refused { host, reply }.into()),
            Err(e) => Err(Broken::Auth(e).into()),
        }
    }

    async fn auth_login(
        &self,
        conn: &mut Connection,
        user: &str,
        password: &str,
    ) -> Result<Reply, ExchangeError> {
        let timeout = self.timeouts.command;
        let what = "the reply to AUTH LOGIN";
        let reply = conn.command("AUTH LOGIN", timeout, what).await?;
        if reply.code != 334 {
            return Ok(reply);
        }
        let reply = conn
            .command_secret(&BASE64.encode(user), "(username)", timeout, what)
            .await?;
        if reply.code != 334 {
            return Ok(reply);
        }
        conn.command_secret(&BASE64.encode(password), "(password)", timeout, what)
            .await
    }
}
