//! Connections waiting for a server's greeting, counted per server address. A server that
//! accepts connections and never greets (a tarpit, a host behind a firewall that answers
//! for it) would otherwise hold one MTA session per message sent to it, until every
//! session is its; so at most so many wait at once, and the next transactions go on to the
//! domain's other servers at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

/// How many connections wait for each server's greeting now.
#[derive(Debug)]
pub struct Greetings {
    limit: usize,
    waiting: Mutex<HashMap<SocketAddr, usize>>,
}

/// One connection's place among those waiting for `addr`'s greeting, given back when
/// dropped (greeted, failed or abandoned alike).
#[derive(Debug)]
pub struct Waiting<'a> {
    greetings: &'a Greetings,
    addr: SocketAddr,
}

/// The server already has as many connections waiting for its greeting as allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not tried: {limit} connections already wait for its greeting (delivery.max_waiting_per_server)"
)]
pub struct Busy {
    pub limit: usize,
}

impl Greetings {
    pub fn new(limit: usize) -> Greetings {
        Greetings {
            limit,
            waiting: Mutex::default(),
        }
    }

    /// A place among the connections waiting for `addr`'s greeting, if one is free.
    pub fn wait(&self, addr: SocketAddr) -> Result<Waiting<'_>, Busy> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let count = waiting.entry(addr).or_default();
        if *count >= self.limit {
            return Err(Busy { limit: self.limit });
        }
        *count += 1;
        Ok(Waiting {
            greetings: self,
            addr,
        })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = (self.greetings.waiting.lock()).unwrap_or_else(|e| e.into_inner());
        if let Some(count) = waiting.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                waiting.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_has_at_most_the_limit_waiting_and_each_place_comes_back() {
        let greetings = Greetings::new(2);
        let addr: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let other: SocketAddr = "127.0.0.2:25".parse().unwrap();
        let first = greetings.wait(addr).unwrap();
        let _second = greetings.wait(addr).unwrap();
        assert_eq!(greetings.wait(addr).unwrap_err(), Busy { limit: 2 });
        assert!(
            greetings.wait(other).is_ok(),
            "another server is counted apart"
        );
        drop(first);
        assert!(greetings.wait(addr).is_ok());
    }

    #[test]
    fn no_count_is_kept_for_a_server_nobody_waits_for() {
        let greetings = Greetings::new(1);
        let addr: SocketAddr = "127.0.0.1:25".parse().unwrap();
        drop(greetings.wait(addr).unwrap());
        assert!(greetings.waiting.lock().unwrap().is_empty());
    }
}
