//! What the writer task is asked to do, in order, and the script one observation is
//! written with.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::cache::entry::CacheEntry;
use crate::cache::shared::Swept;

/// What the writer task does, in order.
#[derive(Debug)]
pub(super) enum Write {
    Record(Box<CacheEntry>),
    Pin(Vec<CacheEntry>),
    /// A host or recipient domain (`None`: everything), and who waits to hear how far the
    /// flush got.
    Flush {
        name: Option<String>,
        reply: Option<oneshot::Sender<Swept>>,
    },
    /// Other shared state (MTA-STS policies): JSON under `KIND:NAME`.
    Value {
        kind: &'static str,
        name: String,
        json: String,
        ttl: Duration,
    },
    Forget {
        kind: &'static str,
        name: String,
    },
}

/// The write of one observation; see the merge rules in the module documentation.
pub(super) const WRITE_SCRIPT: &str = r#"
local now = tonumber(ARGV[6])
local cur = redis.call('HMGET', KEYS[1], 'kind', 'source', 'pinned', 'expires_at', 'entry')
local cur_expires = tonumber(cur[4]) or 0
local status = 'written'
if ARGV[4] ~= '1' and cur_expires > now then
  -- What holds past any TTL a relay gives was not written by one: it holds nothing back.
  if cur[3] == '1' and cur_expires <= now + tonumber(ARGV[10]) then
    status = 'pinned'
  elseif ARGV[2] == 'success' and cur[1] == 'failure' and cur[2] ~= ARGV[3]
      and cur_expires <= now + tonumber(ARGV[11]) then
    status = 'kept'
  end
end
if status == 'written' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'entry', ARGV[1], 'kind', ARGV[2], 'source', ARGV[3],
    'pinned', ARGV[4], 'expires_at', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[7])
end
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[2], ARGV[8], 'EX', ARGV[9])
end
if status == 'kept' then
  return {status, cur[5]}
end
return {status, ''}
"#;
