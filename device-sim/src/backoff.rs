//! Reconnect and retry delays: exponential backoff with full jitter, bounded by a floor and a cap.

use rand::Rng;
use std::time::Duration;

/// Exponential backoff with "full jitter" (a random delay between the floor and the current
/// ceiling), which spreads a fleet's reconnects instead of letting them arrive in waves.
#[derive(Debug, Clone)]
pub struct Backoff {
    floor: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(floor: Duration, cap: Duration) -> Self {
        Backoff {
            floor,
            cap: cap.max(floor),
            attempt: 0,
        }
    }

    /// Reconnect delays: 100 ms growing to 30 s.
    pub fn reconnect() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
    }

    /// Delays after a `429 Too Many Requests` answer: 1 s growing to 60 s.
    pub fn throttled() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// The ceiling of the next delay: floor * 2^attempt, at most the cap.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        self.floor.saturating_mul(factor).min(self.cap)
    }

    /// The next delay to wait, drawn from `[floor, ceiling]`; grows the ceiling.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        if ceiling <= self.floor {
            return self.floor;
        }
        rng.gen_range(self.floor..=ceiling)
    }

    /// Back to the floor after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn delays_stay_within_floor_and_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let floor = Duration::from_millis(100);
        let cap = Duration::from_secs(30);
        let mut backoff = Backoff::new(floor, cap);
        let mut previous_ceiling = Duration::ZERO;
        for attempt in 0..100 {
            let ceiling = backoff.ceiling();
            assert!(ceiling >= previous_ceiling, "ceiling shrank at {attempt}");
            previous_ceiling = ceiling;
            let delay = backoff.next_delay(&mut rng);
            assert!(
                delay >= floor && delay <= ceiling && delay <= cap,
                "{delay:?}"
            );
        }
        assert_eq!(backoff.ceiling(), cap);
    }

    #[test]
    fn ceiling_doubles_then_resets() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
        backoff.next_delay(&mut rng);
        assert_eq!(backoff.ceiling(), Duration::from_millis(200));
        backoff.next_delay(&mut rng);
        assert_eq!(backoff.ceiling(), Duration::from_millis(400));
        for _ in 0..10 {
            backoff.next_delay(&mut rng);
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(1));
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
        assert_eq!(backoff.attempts(), 0);
    }

    #[test]
    fn throttled_backoff_is_longer_than_reconnect() {
        assert!(Backoff::throttled().ceiling() > Backoff::reconnect().ceiling());
    }
}
