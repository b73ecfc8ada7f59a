//! Running totals of the audit trail, kept as records arrive, so the
//! dashboard answers from a few thousand rows instead of millions: one row
//! per session (its span, counts, whether it stopped), decisions per hour,
//! surface and person, and refusals per day, surface, resource and person.
//!
//! Each batch adds its own totals in the same transaction as its records,
//! so the totals never disagree with what is stored.

use std::collections::BTreeMap;

use crate::db::{params, Tx};
use crate::error::ApiError;

#[derive(Default)]
struct Session {
    first_ts: String,
    last_ts: String,
    records: i64,
    denied: i64,
    stopped: bool,
}

/// One batch's totals, for one machine and person.
#[derive(Default)]
pub struct Batch {
    sessions: BTreeMap<String, Session>,
    /// (hour, surface) -> (allowed, denied)
    decisions: BTreeMap<(String, String), (i64, i64)>,
    /// (day, surface, resource) -> count
    refusals: BTreeMap<(String, String, String), i64>,
}

impl Batch {
    /// Counts one stored record.
    pub fn add(&mut self, r: &sbx_audit::Record) {
        let e = &r.event;
        let denied = e.decision.as_deref().is_some_and(|d| d != "allow");
        let s = self.sessions.entry(r.session.clone()).or_default();
        if s.records == 0 {
            s.first_ts = r.ts.clone();
        }
        s.last_ts = r.ts.clone();
        s.records += 1;
        s.denied += i64::from(denied);
        s.stopped |= r.category == sbx_audit::Category::Session && e.action == "stop";
        let Some(decision) = &e.decision else {
            return;
        };
        let surface = e.surface.clone().unwrap_or_default();
        let hour: String = r.ts.chars().take(13).collect();
        let d = self.decisions.entry((hour, surface.clone())).or_default();
        if decision == "allow" {
            d.0 += 1;
        } else {
            d.1 += 1;
            let day: String = r.ts.chars().take(10).collect();
            *self
                .refusals
                .entry((day, surface, e.resource.clone()))
                .or_default() += 1;
        }
    }

    /// Adds the batch's totals, for records of `machine` shipped as
    /// `user_id` of `team_id`.
    pub fn store(
        self,
        c: &mut Tx<'_>,
        machine: &str,
        user_id: i64,
        team_id: Option<i64>,
    ) -> Result<(), ApiError> {
        // 0 stands for "no team" in keys, where NULLs would not conflict.
        let team = team_id.unwrap_or(0);
        for (session, s) in self.sessions {
            c.execute(
                "INSERT INTO audit_sessions (machine, session, user_id, team_id, first_ts, last_ts, records, denied, stopped)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (machine, session) DO UPDATE SET last_ts = excluded.last_ts,
                     records = audit_sessions.records + excluded.records,
                     denied = audit_sessions.denied + excluded.denied,
                     stopped = CASE WHEN excluded.stopped = 1 THEN 1 ELSE audit_sessions.stopped END",
                params![machine, session, user_id, team, s.first_ts, s.last_ts, s.records, s.denied, i64::from(s.stopped)],
            )?;
        }
        for ((hour, surface), (allowed, denied)) in self.decisions {
            c.execute(
                "INSERT INTO audit_counts (hour, surface, user_id, team_id, allowed, denied)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (hour, surface, user_id, team_id) DO UPDATE SET
                     allowed = audit_counts.allowed + excluded.allowed,
                     denied = audit_counts.denied + excluded.denied",
                params![hour, surface, user_id, team, allowed, denied],
            )?;
        }
        for ((day, surface, resource), n) in self.refusals {
            c.execute(
                "INSERT INTO audit_refusals (day, surface, resource, user_id, team_id, n)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (day, surface, resource, user_id, team_id) DO UPDATE SET
                     n = audit_refusals.n + excluded.n",
                params![day, surface, resource, user_id, team, n],
            )?;
        }
        Ok(())
    }
}
