//! Per-thing request budgets: a rate (token bucket, one second of burst) and a
//! cap on requests in progress. Over budget is a 429, never a silent drop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// Tracks every thing's budget.
#[derive(Debug)]
pub struct Throttle {
    per_second: u32,
    max_in_flight: u32,
    things: Mutex<HashMap<String, Budget>>,
}

#[derive(Debug)]
struct Budget {
    tokens: f64,
    refilled: Instant,
    in_flight: u32,
}

/// A request in progress; dropping it frees its in-flight slot.
#[derive(Debug)]
pub struct Permit {
    throttle: Arc<Throttle>,
    thing: String,
}

/// Entries kept before idle things are swept out of the table.
const SWEEP_ABOVE: usize = 100_000;

impl Throttle {
    /// `per_second` or `max_in_flight` of 0 means unlimited.
    pub fn new(per_second: u32, max_in_flight: u32) -> Arc<Throttle> {
        Arc::new(Throttle {
            per_second,
            max_in_flight,
            things: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one request's worth of `thing`'s budget, or `None` when it is spent.
    pub fn acquire(self: &Arc<Self>, thing: &str) -> Option<Permit> {
        let now = Instant::now();
        let capacity = f64::from(self.per_second);
        let mut things = self.things.lock().ok()?;
        if things.len() > SWEEP_ABOVE && !things.contains_key(thing) {
            things.retain(|_, b| b.in_flight > 0 || b.refill(now, capacity) < capacity);
        }
        let budget = things.entry(thing.to_string()).or_insert(Budget {
            tokens: capacity,
            refilled: now,
            in_flight: 0,
        });
        if self.max_in_flight > 0 && budget.in_flight >= self.max_in_flight {
            return None;
        }
        if self.per_second > 0 {
            if budget.refill(now, capacity) < 1.0 {
                return None;
            }
            budget.tokens -= 1.0;
        }
        budget.in_flight += 1;
        Some(Permit {
            throttle: Arc::clone(self),
            thing: thing.to_string(),
        })
    }
}

impl Budget {
    fn refill(&mut self, now: Instant, capacity: f64) -> f64 {
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * capacity).min(capacity);
        self.refilled = now;
        self.tokens
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Ok(mut things) = self.throttle.things.lock() {
            if let Some(budget) = things.get_mut(&self.thing) {
                budget.in_flight = budget.in_flight.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn rate_is_per_thing_and_refills() {
        let t = Throttle::new(20, 0);
        let granted: Vec<_> = (0..25).filter_map(|_| t.acquire("a")).collect();
        assert_eq!(granted.len(), 20);
        assert!(t.acquire("b").is_some(), "another thing has its own budget");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!((0..5).filter_map(|_| t.acquire("a")).count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_cap_frees_on_drop() {
        let t = Throttle::new(0, 10);
        let held: Vec<_> = (0..10).filter_map(|_| t.acquire("a")).collect();
        assert_eq!(held.len(), 10);
        assert!(t.acquire("a").is_none());
        drop(held);
        assert!(t.acquire("a").is_some());
    }
}
