//! Who may use the console: the admin token, asked once by the login form, then a session
//! cookie (`Secure`, `HttpOnly`, `SameSite=Strict`) and, on every form that changes
//! anything, the session's CSRF token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};

/// The cookie's name.
pub const COOKIE: &str = "tlsrouter_console";
/// How long a session lasts without a request.
const IDLE: Duration = Duration::from_secs(30 * 60);
/// How long a session lasts at most.
const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; a login beyond it ends the oldest.
const MAX_SESSIONS: usize = 64;

/// A logged-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    /// Every state-changing form carries it back.
    pub csrf: String,
    started: Instant,
    last: Instant,
}

pub struct Sessions {
    /// The admin token's digest: compared as digests, so the comparison says nothing of
    /// how much of a guess was right.
    token: Vec<u8>,
    open: Mutex<HashMap<String, Session>>,
    random: SystemRandom,
}

impl Sessions {
    pub fn new(token: &str) -> Sessions {
        Sessions {
            token: digest(&SHA256, token.as_bytes()).as_ref().to_vec(),
            open: Mutex::default(),
            random: SystemRandom::new(),
        }
    }

    /// A new session when `token` is the admin token: its id, for the cookie.
    pub fn login(&self, token: &str) -> Option<String> {
        if digest(&SHA256, token.as_bytes()).as_ref() != self.token.as_slice() {
            return None;
        }
        let id = self.secret()?;
        let csrf = self.secret()?;
        let now = Instant::now();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, s| alive(s, now));
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) =
                (open.iter().min_by_key(|(_, s)| s.last)).map(|(id, _)| id.clone())
        {
            open.remove(&oldest);
        }
        let session = Session {
            csrf,
            started: now,
            last: now,
        };
        open.insert(id.clone(), session);
        Some(id)
    }

    /// The session of a request's `Cookie` header, kept alive; `None` without a live one.
    pub fn find(&self, cookie_header: Option<&str>) -> Option<(String, Session)> {
        let id = cookie_header?.split(';').find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then(|| value.to_string())
        })?;
        let now = Instant::now();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let session = open.get_mut(&id)?;
        if !alive(session, now) {
            open.remove(&id);
            return None;
        }
        session.last = now;
        Some((id, session.clone()))
    }

    pub fn logout(&self, id: &str) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// 32 random bytes, hex.
    fn secret(&self) -> Option<String> {
        let mut bytes = [0u8; 32];
        self.random.fill(&mut bytes).ok()?;
        Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }
}

fn alive(session: &Session, now: Instant) -> bool {
    now.duration_since(session.last) < IDLE && now.duration_since(session.started) < LIFETIME
}

/// The `Set-Cookie` value of a new session.
pub fn cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict")
}

/// The `Set-Cookie` value that ends one.
pub fn expired_cookie() -> String {
    format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_opens_a_session_and_only_its_cookie_finds_it() {
        let sessions = Sessions::new("the admin token, long enough");
        assert!(sessions.login("a guess").is_none());
        let id = sessions
            .login("the admin token, long enough")
            .expect("a session");
        let header = format!("other=1; {COOKIE}={id}");
        let (found, session) = sessions.find(Some(&header)).expect("found");
        assert_eq!(found, id);
        assert_eq!(session.csrf.len(), 64);
        assert_ne!(session.csrf, id);
        assert!(sessions.find(Some(&format!("{COOKIE}=forged"))).is_none());
        assert!(sessions.find(None).is_none());
        sessions.logout(&id);
        assert!(sessions.find(Some(&header)).is_none(), "gone after logout");
    }
}
