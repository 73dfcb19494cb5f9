//! Connections waiting for a server's greeting, per server address. A server that accepts
//! connections and never greets (a tarpit, a host behind a firewall that answers for it)
//! would otherwise hold one MTA session per message sent to it, until every session is
//! its. So once so many connections have waited longer than a healthy server takes to
//! greet (`delivery.slow_greeting`), no more are opened to it, and the next transactions
//! go on to the domain's other servers at once. A burst of new connections to a server
//! that greets in time is never refused: only late waits count.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The connections waiting for each server's greeting, and since when.
#[derive(Debug)]
pub struct Greetings {
    limit: usize,
    late_after: Duration,
    waiting: Mutex<Waits>,
}

#[derive(Debug, Default)]
struct Waits {
    next_id: u64,
    by_server: HashMap<SocketAddr, Vec<(u64, Instant)>>,
}

/// One connection's place among those waiting for `addr`'s greeting, given back when
/// dropped (greeted, failed or abandoned alike).
#[derive(Debug)]
pub struct Waiting<'a> {
    greetings: &'a Greetings,
    addr: SocketAddr,
    id: u64,
}

/// The server already keeps as many connections waiting past `delivery.slow_greeting` as
/// allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not tried: {limit} connections already wait for its greeting longer than {late}s (delivery.max_waiting_per_server)"
)]
pub struct Busy {
    pub limit: usize,
    pub late: u64,
}

impl Greetings {
    pub fn new(limit: usize, late_after: Duration) -> Greetings {
        Greetings {
            limit,
            late_after,
            waiting: Mutex::default(),
        }
    }

    /// A place among the connections waiting for `addr`'s greeting, unless `limit` of them
    /// are late already.
    pub fn wait(&self, addr: SocketAddr) -> Result<Waiting<'_>, Busy> {
        let now = Instant::now();
        let mut waits = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let id = waits.next_id;
        let waiting = waits.by_server.entry(addr).or_default();
        let late = waiting
            .iter()
            .filter(|(_, since)| now.duration_since(*since) >= self.late_after)
            .count();
        if late >= self.limit {
            return Err(Busy {
                limit: self.limit,
                late: self.late_after.as_secs(),
            });
        }
        waiting.push((id, now));
        waits.next_id += 1;
        Ok(Waiting {
            greetings: self,
            addr,
            id,
        })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waits = (self.greetings.waiting.lock()).unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = waits.by_server.get_mut(&self.addr) {
            waiting.retain(|(id, _)| *id != self.id);
            if waiting.is_empty() {
                waits.by_server.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEVER_LATE: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn a_burst_to_a_server_that_greets_in_time_is_never_refused() {
        let greetings = Greetings::new(2, NEVER_LATE);
        let addr: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let burst: Vec<_> = (0..50).map(|_| greetings.wait(addr)).collect();
        assert!(burst.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn late_waits_are_counted_per_server_and_each_place_comes_back() {
        // Every wait is late at once.
        let greetings = Greetings::new(2, Duration::ZERO);
        let addr: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let other: SocketAddr = "127.0.0.2:25".parse().unwrap();
        let first = greetings.wait(addr).unwrap();
        let _second = greetings.wait(addr).unwrap();
        let busy = greetings.wait(addr).unwrap_err();
        assert_eq!(busy, Busy { limit: 2, late: 0 });
        assert!(
            greetings.wait(other).is_ok(),
            "another server is counted apart"
        );
        drop(first);
        assert!(greetings.wait(addr).is_ok(), "one late wait left");
    }

    #[tokio::test]
    async fn no_count_is_kept_for_a_server_nobody_waits_for() {
        let greetings = Greetings::new(1, NEVER_LATE);
        let addr: SocketAddr = "127.0.0.1:25".parse().unwrap();
        drop(greetings.wait(addr).unwrap());
        assert!(greetings.waiting.lock().unwrap().by_server.is_empty());
    }
}
