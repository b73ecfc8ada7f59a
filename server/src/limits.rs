//! Rate limits: a fixed window per key. The routes anyone can call (setup,
//! the device flow) count per client address, so guessing codes or tokens
//! is slow; every other route counts per token, so one leaked or runaway
//! token cannot swamp the server.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::ApiError;

pub struct RateLimiter<K> {
    per_minute: u32,
    seen: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Hash + Eq> RateLimiter<K> {
    pub fn new(per_minute: u32) -> RateLimiter<K> {
        RateLimiter {
            per_minute,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a request from `key`; refuses past the limit in this minute.
    pub fn check(&self, key: K) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 100_000 {
            seen.retain(|_, (t, _)| now.duration_since(*t) < Duration::from_secs(60));
        }
        let entry = seen.entry(key).or_insert((now, 0));
        if now.duration_since(entry.0) >= Duration::from_secs(60) {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if entry.1 > self.per_minute {
            return Err(ApiError::TooMany);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn the_window_refuses_past_its_count() {
        let r = RateLimiter::<IpAddr>::new(3);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            r.check(ip).unwrap();
        }
        assert!(matches!(r.check(ip), Err(ApiError::TooMany)));
        r.check("127.0.0.2".parse().unwrap()).unwrap();
    }
}
