//! Per-thing request budgets: a rate (token bucket, one second of burst) and a
//! cap on requests in progress. Over budget is a 429, never a silent drop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// Why a request is over its thing's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    /// The thing has `max_in_flight` requests in progress.
    InFlight,
    /// The rate is used up; the next request's worth comes back in `next`.
    Rate { next: Duration },
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

    /// Takes one request's worth of `thing`'s budget, or says why it is spent.
    pub fn acquire(self: &Arc<Self>, thing: &str) -> Result<Permit, Spent> {
        let now = Instant::now();
        let capacity = f64::from(self.per_second);
        let Ok(mut things) = self.things.lock() else {
            return Err(Spent::InFlight);
        };
        if things.len() > SWEEP_ABOVE && !things.contains_key(thing) {
            things.retain(|_, b| b.in_flight > 0 || b.refill(now, capacity) < capacity);
        }
        let budget = things.entry(thing.to_string()).or_insert(Budget {
            tokens: capacity,
            refilled: now,
            in_flight: 0,
        });
        if self.max_in_flight > 0 && budget.in_flight >= self.max_in_flight {
            return Err(Spent::InFlight);
        }
        if self.per_second > 0 {
            let tokens = budget.refill(now, capacity);
            if tokens < 1.0 {
                let next = Duration::from_secs_f64((1.0 - tokens) / capacity);
                return Err(Spent::Rate { next });
            }
            budget.tokens -= 1.0;
        }
        budget.in_flight += 1;
        Ok(Permit {
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

    #[tokio::test(start_paused = true)]
    async fn rate_is_per_thing_and_refills() {
        let t = Throttle::new(20, 0);
        let granted: Vec<_> = (0..20).filter_map(|_| t.acquire("a").ok()).collect();
        assert_eq!(granted.len(), 20);
        assert_eq!(
            t.acquire("a").err(),
            Some(Spent::Rate {
                next: Duration::from_millis(50)
            }),
            "one token comes back every 50 ms"
        );
        assert!(t.acquire("b").is_ok(), "another thing has its own budget");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!((0..5).filter_map(|_| t.acquire("a").ok()).count(), 2);
        tokio::time::advance(Duration::from_millis(20)).await;
        match t.acquire("a") {
            Err(Spent::Rate { next }) => assert!(
                next > Duration::from_millis(29) && next <= Duration::from_millis(30),
                "{next:?}"
            ),
            other => panic!("expected a rate refusal, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_cap_frees_on_drop() {
        let t = Throttle::new(0, 10);
        let held: Vec<_> = (0..10).filter_map(|_| t.acquire("a").ok()).collect();
        assert_eq!(held.len(), 10);
        assert_eq!(t.acquire("a").err(), Some(Spent::InFlight));
        drop(held);
        assert!(t.acquire("a").is_ok());
    }
}
