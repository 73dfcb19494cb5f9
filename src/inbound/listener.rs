//! Accepting MTA connections: access control and the session limit.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::inbound::session::Session;
use crate::proxy::Proxy;
use crate::smtp::Reply;

/// Serves SMTP on an already-bound listener until `shutdown` completes.
pub async fn run(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    let sessions = Arc::new(Semaphore::new(proxy.config.limits.max_sessions));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let (stream, client) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Usually out of file descriptors: wait a little instead of spinning.
                tracing::error!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !proxy
            .config
            .allow_clients
            .iter()
            .any(|net| net.contains(client.ip()))
        {
            tracing::warn!(client = %client, "connection refused: client not in allow_clients");
            let reply = Reply::new(
                554,
                "5.7.1",
                format!("{} is not allowed to relay here", client.ip()),
            );
            tokio::spawn(refuse(stream, reply));
            continue;
        }
        let Ok(permit) = sessions.clone().try_acquire_owned() else {
            tracing::warn!(client = %client, "connection refused: too many sessions");
            tokio::spawn(refuse(
                stream,
                Reply::new(421, "4.3.2", "too many sessions, try again later"),
            ));
            continue;
        };
        let proxy = proxy.clone();
        proxy.stats.sessions.inc();
        proxy.stats.active_sessions.inc();
        tokio::spawn(async move {
            Session::new(proxy.clone(), stream, client).run().await;
            proxy.stats.active_sessions.dec();
            drop(permit);
        });
    }
}

async fn refuse(mut stream: TcpStream, reply: Reply) {
    let _ = stream.write_all(&reply.to_wire()).await;
    let _ = stream.shutdown().await;
}
