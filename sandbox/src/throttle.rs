//! How fast the guest may make the host write records. Whatever the guest
//! causes to be recorded (refusals, its agent's reports, console panics)
//! passes a token bucket: a burst, then a steady rate; past it, records
//! are counted instead of written, and one record says how many were
//! dropped, so the log stays readable and its disk use bounded while
//! nothing goes unaccounted for. The decisions themselves are never
//! throttled: a refused request is refused whether or not it is written.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sbx_audit::{AuditLog, Entry};

pub struct Throttle {
    /// Records a second, steadily.
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

struct State {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl Throttle {
    pub fn new(per_second: u32, burst: u32) -> Throttle {
        Throttle {
            rate: f64::from(per_second),
            burst: f64::from(burst),
            state: Mutex::new(State {
                tokens: f64::from(burst),
                last: Instant::now(),
                dropped: 0,
            }),
        }
    }

    /// Whether one more record may be written now; if not, it is counted.
    pub fn admit(&self) -> bool {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
        s.tokens = (s.tokens + elapsed * self.rate).min(self.burst);
        s.last = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            s.dropped += 1;
            false
        }
    }

    /// How many were dropped since the last call.
    pub fn take_dropped(&self) -> u64 {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).dropped)
    }
}

/// How often the counts of dropped records are written.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// The session's limits on what the guest can make it record.
pub struct Limits {
    /// Refusals by the shares: 200 at once, then 20 a second (a `stat` of a
    /// denied path in a loop wrote 3.6 MB/s of records unthrottled).
    pub refusals: Throttle,
    /// The guest agent's reports: 1,000 at once, then 100 a second (two
    /// per command run).
    pub guest_events: Throttle,
    /// Kernel panics and oopses seen on the console: 10 at once, then one
    /// a second.
    pub console: Throttle,
    /// Symlinks made in shares that point out of them: 200 at once, then
    /// 20 a second.
    pub leaving_links: Throttle,
}

impl Limits {
    pub fn new() -> Arc<Limits> {
        Arc::new(Limits {
            refusals: Throttle::new(20, 200),
            guest_events: Throttle::new(100, 1000),
            console: Throttle::new(1, 10),
            leaving_links: Throttle::new(20, 200),
        })
    }

    /// Writes one record per kind that dropped any since the last report.
    pub fn report(&self, log: &AuditLog) {
        for (what, t) in [
            ("fs refusals", &self.refusals),
            ("guest events", &self.guest_events),
            ("console reports", &self.console),
            ("leaving symlinks", &self.leaving_links),
        ] {
            let n = t.take_dropped();
            if n > 0 {
                if let Err(e) = log.record(Entry::dropped(what, n)) {
                    tracing::error!("{e}");
                }
            }
        }
    }

    /// Reports every few seconds for as long as the process runs.
    pub fn start_reporting(self: &Arc<Self>, log: Arc<AuditLog>) -> std::io::Result<()> {
        let limits = self.clone();
        sbx_seccomp::spawn("dropped-records", sbx_seccomp::Kind::Audit, move || loop {
            std::thread::sleep(REPORT_EVERY);
            limits.report(&log);
        })
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_every_drop_counted() {
        let t = Throttle::new(10, 100);
        let start = Instant::now();
        let admitted = (0..1000).filter(|_| t.admit_at(start)).count();
        assert_eq!(admitted, 100);
        assert_eq!(t.take_dropped(), 900);
        assert_eq!(t.take_dropped(), 0);
        // A second later, ten more.
        let later = start + Duration::from_secs(1);
        let admitted = (0..50).filter(|_| t.admit_at(later)).count();
        assert_eq!(admitted, 10);
        assert_eq!(t.take_dropped(), 40);
        // Long idle refills to the burst, no further.
        let much_later = later + Duration::from_secs(3600);
        assert_eq!((0..500).filter(|_| t.admit_at(much_later)).count(), 100);
    }
}
