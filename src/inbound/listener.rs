//! Accepting MTA connections: access control and the session limit.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::inbound::session::Session;
use crate::inbound::transparent;
use crate::proxy::Proxy;
use crate::sessions::{Drain, SessionState};
use crate::smtp::Reply;

/// Where a listener's sessions send their mail.
#[derive(Clone, Debug)]
pub enum Accepting {
    /// To the recipient domain's MX hosts, or the rule's route.
    SmartHost,
    /// To the connection's original destination; `own` are the addresses all our listeners
    /// are bound to, which as original destination would be a loop.
    Transparent { own: Arc<[SocketAddr]> },
}

/// Serves SMTP on an already-bound listener until `shutdown` completes, then drains: the
/// transactions in flight may finish within `timeouts.shutdown_drain`, the rest get 421.
pub async fn run(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    serve(listener, proxy, Accepting::SmartHost, shutdown).await;
}

/// As [`run`], for a listener of either mode.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    accepting: Accepting,
    shutdown: impl Future<Output = ()>,
) {
    // Shared by every listener: the limit is on sessions, not on each listener's.
    let (sessions, max) = (proxy.session_slots.clone(), proxy.session_slots_max);
    let per_client = proxy.sessions_per_client.clone();
    // Replies go out at once (no Nagle): set once on the listener where the connections it
    // accepts inherit it (Linux), one system call less per session.
    let nodelay_inherited = cfg!(target_os = "linux")
        && socket2::SockRef::from(&listener)
            .set_tcp_nodelay(true)
            .is_ok();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, client) = match accepted {
            Ok((stream, client)) => {
                if !nodelay_inherited {
                    let _ = stream.set_nodelay(true);
                }
                (stream, client)
            }
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
            .any(|net| net.contains(client.ip().to_canonical()))
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
        let limit = proxy.config.limits.max_sessions_per_client;
        let Some(slot) = ClientSlot::take(&per_client, client.ip(), limit) else {
            tracing::warn!(client = %client, "connection refused: too many sessions from this address");
            let reply = Reply::new(
                421,
                "4.3.2",
                "too many sessions from your address, try again later",
            );
            tokio::spawn(refuse(stream, reply));
            continue;
        };
        let proxy = proxy.clone();
        proxy.stats.sessions.inc();
        proxy.stats.active_sessions.inc();
        let accepting = accepting.clone();
        tokio::spawn(async move {
            match accepting {
                Accepting::SmartHost => Session::new(proxy.clone(), stream, client).run().await,
                Accepting::Transparent { own } => {
                    run_redirected(proxy.clone(), stream, client, &own).await;
                }
            }
            proxy.stats.active_sessions.dec();
            drop((permit, slot));
        });
    }
    drop(listener);
    drain(&proxy, &sessions, max).await;
    // No session is left to take them.
    proxy.outbound.pool.close_all();
}

/// Lets sessions finish: all permits back means all sessions ended.
async fn drain(proxy: &Proxy, sessions: &Semaphore, max: usize) {
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = proxy.drain.send(Drain::Draining);
    let grace = proxy.config.timeouts.shutdown_drain;
    tracing::info!(
        event = "draining",
        "stopped accepting; draining sessions for up to {}s",
        grace.as_secs()
    );
    if tokio::time::timeout(grace, sessions.acquire_many(all))
        .await
        .is_ok()
    {
        return;
    }
    tracing::warn!("drain time over: closing the remaining sessions with 421");
    let _ = proxy.drain.send(Drain::Forced);
    // A session deep in a body relay notices at its next read; don't wait for ever. But a
    // transaction past its final dot waits for the remote's verdict: stopping it would
    // leave the MTA without an answer for a message the remote may have taken, and the MTA
    // would send it again. Those are waited for, up to timeouts.data_end.
    let data_end = proxy.config.timeouts.data_end;
    let verdicts = || proxy.sessions.count(SessionState::Verdict);
    let mut waited = false;
    for _ in 0..2 {
        let waiting = verdicts();
        let window = match waiting {
            0 => Duration::from_secs(10),
            _ => {
                tracing::warn!(
                    event = "draining_verdicts",
                    waiting,
                    "{waiting} transactions wait for their remote's verdict on the message: waiting up to {}s",
                    data_end.as_secs()
                );
                waited = true;
                data_end.max(Duration::from_secs(10))
            }
        };
        if tokio::time::timeout(window, sessions.acquire_many(all))
            .await
            .is_ok()
            || waited
        {
            break;
        }
    }
    let still = verdicts();
    if still > 0 {
        tracing::warn!(
            event = "stopped_waiting",
            still,
            "stopping with {still} transactions still waiting for their remote's verdict: their MTA may send them again"
        );
    }
}

/// One session counted against its client address; the count drops with it.
struct ClientSlot {
    ip: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl ClientSlot {
    fn take(
        counts: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        ip: IpAddr,
        max: usize,
    ) -> Option<ClientSlot> {
        let mut map = counts.lock().ok()?;
        let count = map.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            ip,
            counts: counts.clone(),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.counts.lock()
            && let Some(count) = map.get_mut(&self.ip)
        {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A session of a transparent listener, or a 451 when the connection has no usable
/// original destination: not redirected at all, or redirected to one of our own listeners
/// (our own delivery came back to us: the socket mark or owner match is missing).
async fn run_redirected(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    client: SocketAddr,
    own: &[SocketAddr],
) {
    let destination = match transparent::original_destination(&stream) {
        Ok(destination) => destination,
        Err(e) => {
            tracing::warn!(client = %client, "connection refused on the transparent listener: {e}");
            let reply = Reply::new(451, "4.3.0", format!("no original destination: {e}"));
            return refuse(stream, reply).await;
        }
    };
    if transparent::is_own_listener(destination, own) {
        tracing::error!(event = "redirect_loop", client = %client, destination = %destination, "connection refused: its original destination is one of tlsrouter's own listeners, a loop (does the redirect let tlsrouter's own connections pass, by socket mark or owner?)");
        let reply = Reply::new(
            451,
            "4.4.6",
            format!("mail loop: {destination} is this tlsrouter's own listener"),
        );
        return refuse(stream, reply).await;
    }
    tracing::debug!(client = %client, destination = %destination, "redirected connection");
    Session::new(proxy, stream, client)
        .redirected_to(destination)
        .run()
        .await;
}

async fn refuse(mut stream: TcpStream, reply: Reply) {
    let _ = stream.write_all(&reply.to_wire()).await;
    let _ = stream.shutdown().await;
}
