//! AUTH to a smart host: PLAIN or LOGIN, over authenticated TLS only.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::{AttemptFailure, Broken, Reached};
use crate::net::connection::{Connection, ExchangeError};
use crate::net::dns::ServerId;
use crate::outbound::Outbound;
use crate::outbound::failure::AuthFailure;
use crate::outcome::TlsOutcome;
use crate::rules::model::AuthSpec;
use crate::smtp::Reply;

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
