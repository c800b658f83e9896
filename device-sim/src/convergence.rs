//! Latency bookkeeping of desired changes: when the operator sent each change, when its delta
//! reached the device, and when the device reported it back (desired -> delta -> reported).
//! The operator fills the table; devices of an in-process fleet look their changes up in it.

use crate::stats::LatencySeries;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

struct PendingChange {
    setpoint: f64,
    sent: Instant,
    delta_seen: bool,
}

/// Desired changes not yet reported back, keyed by thing. The operator fills it; devices of an
/// in-process fleet look their delta and their accepted report up in it.
pub struct PendingChanges {
    changes: Mutex<HashMap<String, PendingChange>>,
    delta_latency: Arc<LatencySeries>,
    converged_latency: Arc<LatencySeries>,
    /// Woken whenever a change converges, so a run can end as soon as none is outstanding.
    converged: tokio::sync::Notify,
    /// Changes whose value the device had already reported: no delta, converged at once.
    without_delta: AtomicU64,
}

impl std::fmt::Debug for PendingChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingChanges").finish_non_exhaustive()
    }
}

impl PendingChanges {
    pub fn new(delta_latency: Arc<LatencySeries>, converged_latency: Arc<LatencySeries>) -> Self {
        PendingChanges {
            changes: Mutex::new(HashMap::new()),
            delta_latency,
            converged_latency,
            converged: tokio::sync::Notify::new(),
            without_delta: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingChange>> {
        self.changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The operator sent `setpoint` to `thing` (a newer change replaces an older one).
    pub fn sent(&self, thing: &str, setpoint: f64) {
        self.lock().insert(
            thing.to_owned(),
            PendingChange {
                setpoint,
                sent: Instant::now(),
                delta_seen: false,
            },
        );
    }

    /// A device received a delta carrying `setpoint`.
    pub fn delta_received(&self, thing: &str, setpoint: f64) {
        if let Some(change) = self.lock().get_mut(thing) {
            if change.setpoint == setpoint && !change.delta_seen {
                change.delta_seen = true;
                self.delta_latency.record(change.sent.elapsed());
            }
        }
    }

    /// A device's report of `setpoint` was accepted: desired and reported have converged.
    pub fn reported(&self, thing: &str, setpoint: f64) {
        let mut changes = self.lock();
        if changes.get(thing).is_some_and(|c| c.setpoint == setpoint) {
            if let Some(change) = changes.remove(thing) {
                self.converged_latency.record(change.sent.elapsed());
            }
            drop(changes);
            self.converged.notify_waiters();
        }
    }

    /// The operator's change of `thing` to `setpoint` was accepted while the device's reported
    /// value already was `setpoint`: the shadow sends no delta, and the change has converged.
    pub fn accepted_as_reported(&self, thing: &str, setpoint: f64) {
        let mut changes = self.lock();
        if changes
            .get(thing)
            .is_some_and(|c| c.setpoint == setpoint && !c.delta_seen)
        {
            if let Some(change) = changes.remove(thing) {
                self.converged_latency.record(change.sent.elapsed());
                self.without_delta.fetch_add(1, Ordering::Relaxed);
            }
            drop(changes);
            self.converged.notify_waiters();
        }
    }

    /// Changes that converged without a delta (see [`Self::accepted_as_reported`]).
    pub fn converged_without_delta(&self) -> u64 {
        self.without_delta.load(Ordering::Relaxed)
    }

    /// Returns once no change is outstanding.
    pub async fn all_converged(&self) {
        loop {
            // Registered before the check, so a convergence between the two is not missed.
            let notified = self.converged.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.outstanding() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Changes not (yet) converged.
    pub fn outstanding(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_changes_record_delta_then_convergence() {
        let delta = Arc::new(LatencySeries::new("delta"));
        let converged = Arc::new(LatencySeries::new("converged"));
        let pending = PendingChanges::new(Arc::clone(&delta), Arc::clone(&converged));
        pending.sent("a", 20.0);
        pending.delta_received("a", 19.0); // stale delta: ignored
        pending.delta_received("a", 20.0);
        pending.delta_received("a", 20.0); // duplicate: counted once
        pending.reported("a", 20.0);
        pending.reported("a", 20.0);
        assert_eq!(delta.summary().count, 1);
        assert_eq!(converged.summary().count, 1);
        assert_eq!(pending.outstanding(), 0);
    }
}
