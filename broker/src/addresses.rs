//! Limits per source address: how many connections one address may hold
//! at once, and what failed logins cost it. After a failed login the
//! refusal is delayed (longer with each failure); after too many failures
//! within a window the address is refused outright for a while, before its
//! credentials are looked at (so a password cannot be guessed quickly).
//! A successful login does not forgive the failures (one valid account
//! must not reset the count for guesses at others); they expire with the
//! window.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

/// The limits, in `[mqtt.addresses]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AddressLimits {
    /// Connections one address may hold at once (0: no limit).
    pub max_connections: usize,
    /// Loopback addresses are not held to `max_connections` (load
    /// generators and local tools open thousands).
    pub loopback_unlimited: bool,
    /// Failed logins within `failed_login_window_secs` after which the
    /// address is refused for `failed_login_block_secs` (0: never).
    pub max_failed_logins: u32,
    pub failed_login_window_secs: u64,
    pub failed_login_block_secs: u64,
    /// The refusal of a failed login waits this long times the address's
    /// failures in the window, up to 2 s.
    pub failed_login_delay_ms: u64,
}

impl Default for AddressLimits {
    fn default() -> Self {
        AddressLimits {
            max_connections: 1000,
            loopback_unlimited: true,
            max_failed_logins: 10,
            failed_login_window_secs: 60,
            failed_login_block_secs: 300,
            failed_login_delay_ms: 200,
        }
    }
}

/// The longest a failed login's refusal is delayed.
const MAX_DELAY: Duration = Duration::from_secs(2);
/// Addresses remembered before the ones whose failures are over are dropped.
const PRUNE_ABOVE: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
    blocked_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    connections: HashMap<IpAddr, usize>,
    failures: HashMap<IpAddr, Failures>,
}

/// Every address's connections and failed logins.
#[derive(Debug)]
pub struct Addresses {
    limits: AddressLimits,
    state: Mutex<State>,
}

/// One connection's place in its address's count; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    addresses: Arc<Addresses>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.addresses.lock();
        if let Some(count) = state.connections.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                state.connections.remove(&self.ip);
            }
        }
    }
}

impl Addresses {
    pub fn new(limits: AddressLimits) -> Arc<Addresses> {
        Arc::new(Addresses {
            limits,
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.limits.failed_login_window_secs)
    }

    /// A place for a new connection from `ip`: `Some(None)` when loopback or
    /// unlimited, `None` when the address holds its maximum already.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Option<Slot>> {
        let max = self.limits.max_connections;
        if max == 0 || (ip.is_loopback() && self.limits.loopback_unlimited) {
            return Some(None);
        }
        let mut state = self.lock();
        let count = state.connections.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Some(Slot {
            addresses: Arc::clone(self),
            ip,
        }))
    }

    /// Whether `ip` is refused for its failed logins now.
    pub fn blocked(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        self.lock()
            .failures
            .get(&ip)
            .and_then(|f| f.blocked_until)
            .is_some_and(|until| until > now)
    }

    /// Records a failed login from `ip`; returns how long to wait before
    /// refusing it.
    pub fn failed(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let window = self.window();
        let mut state = self.lock();
        if state.failures.len() > PRUNE_ABOVE {
            state.failures.retain(|_, f| {
                f.since + window > now || f.blocked_until.is_some_and(|until| until > now)
            });
        }
        let failures = state.failures.entry(ip).or_insert(Failures {
            count: 0,
            since: now,
            blocked_until: None,
        });
        if failures.since + window <= now {
            *failures = Failures {
                count: 0,
                since: now,
                blocked_until: None,
            };
        }
        failures.count += 1;
        let max = self.limits.max_failed_logins;
        if max > 0 && failures.count >= max {
            failures.blocked_until =
                Some(now + Duration::from_secs(self.limits.failed_login_block_secs));
        }
        (Duration::from_millis(self.limits.failed_login_delay_ms) * failures.count).min(MAX_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REMOTE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 8));

    #[test]
    fn an_address_holds_at_most_its_share_of_connections() {
        let addresses = Addresses::new(AddressLimits {
            max_connections: 2,
            ..AddressLimits::default()
        });
        let a = addresses.admit(REMOTE).expect("first");
        let b = addresses.admit(REMOTE).expect("second");
        assert!(a.is_some() && b.is_some());
        assert!(addresses.admit(REMOTE).is_none(), "third refused");
        assert!(addresses.admit(OTHER).is_some(), "another address is not");
        let loopback = IpAddr::from([127, 0, 0, 1]);
        let many: Vec<_> = (0..10).map(|_| addresses.admit(loopback)).collect();
        assert!(many.iter().all(|s| matches!(s, Some(None))), "loopback");
        drop(a);
        assert!(addresses.admit(REMOTE).is_some(), "a place was given back");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_logins_are_slowed_then_refused_for_a_while() {
        let addresses = Addresses::new(AddressLimits {
            max_failed_logins: 3,
            failed_login_window_secs: 60,
            failed_login_block_secs: 300,
            failed_login_delay_ms: 200,
            ..AddressLimits::default()
        });
        assert_eq!(addresses.failed(REMOTE), Duration::from_millis(200));
        assert_eq!(addresses.failed(REMOTE), Duration::from_millis(400));
        assert!(!addresses.blocked(REMOTE));
        addresses.failed(REMOTE);
        assert!(addresses.blocked(REMOTE), "third failure");
        assert!(!addresses.blocked(OTHER));
        tokio::time::advance(Duration::from_secs(301)).await;
        assert!(!addresses.blocked(REMOTE), "the block ends");
        // The window passed: counting starts again.
        assert_eq!(addresses.failed(REMOTE), Duration::from_millis(200));
    }
}
