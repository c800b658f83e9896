//! Parsing of the CLI's human units (`60s`, `250ms`, `100/s`, `max`) and a pacer that turns a rate into send budgets.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A value on the command line that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty value")]
    Empty,
    #[error("not a number")]
    NotANumber,
    #[error("unknown unit (use ns, us, ms, s, m or h)")]
    UnknownUnit,
    #[error("rate must be positive, like 100/s, 5/ms, 600/m or max")]
    BadRate,
}

/// Parses `60s`, `250ms`, `1.5s`, `2m`, `1h`, `500us`; a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(UnitError::Empty);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| UnitError::NotANumber)?;
    if !value.is_finite() || value < 0.0 {
        return Err(UnitError::NotANumber);
    }
    let seconds_per_unit = match unit.trim() {
        "" | "s" | "sec" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(UnitError::UnknownUnit),
    };
    Ok(Duration::from_secs_f64(value * seconds_per_unit))
}

/// A send rate: a fixed number of messages per second, or as fast as flow control allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    PerSecond(f64),
    Max,
}

impl Rate {
    pub fn per_second(self) -> Option<f64> {
        match self {
            Rate::PerSecond(r) => Some(r),
            Rate::Max => None,
        }
    }
}

impl FromStr for Rate {
    type Err = UnitError;

    /// Parses `100/s`, `100`, `5/ms`, `600/m`, `max`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Err(UnitError::Empty);
        }
        if text.eq_ignore_ascii_case("max") {
            return Ok(Rate::Max);
        }
        let (count, per) = match text.split_once('/') {
            Some((count, per)) => (count, per),
            None => (text, "s"),
        };
        let count: f64 = count.trim().parse().map_err(|_| UnitError::NotANumber)?;
        let per = match per.trim() {
            "s" | "sec" => Duration::from_secs(1),
            "ms" => Duration::from_millis(1),
            "m" | "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => parse_duration(other)?,
        };
        let rate = count / per.as_secs_f64();
        if !rate.is_finite() || rate <= 0.0 {
            return Err(UnitError::BadRate);
        }
        Ok(Rate::PerSecond(rate))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::PerSecond(r) => write!(f, "{r}/s"),
            Rate::Max => f.write_str("max"),
        }
    }
}

/// Hands out send budgets so that, on average, `rate` messages leave per second.
///
/// It works on elapsed time rather than one timer per message, so rates above the timer
/// resolution (1 ms) are kept and a late wake-up is caught up without drift.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    started: tokio::time::Instant,
    granted: u64,
    tick: Duration,
}

impl Pacer {
    pub fn new(rate_per_second: f64) -> Self {
        // Wake often enough for smooth traffic, rarely enough to stay cheap.
        let per_message = Duration::from_secs_f64(1.0 / rate_per_second);
        let tick = per_message.clamp(Duration::from_millis(5), Duration::from_secs(1));
        Pacer {
            rate: rate_per_second,
            started: tokio::time::Instant::now(),
            granted: 0,
            tick,
        }
    }

    /// Number of messages owed at `elapsed` since start that have not been granted yet.
    pub fn owed_at(&self, elapsed: Duration) -> u64 {
        let due = (elapsed.as_secs_f64() * self.rate).floor() as u64;
        due.saturating_sub(self.granted)
    }

    /// Waits until at least one message is due and returns how many may be sent now.
    pub async fn next_batch(&mut self) -> u64 {
        loop {
            let owed = self.owed_at(self.started.elapsed());
            if owed > 0 {
                self.granted += owed;
                return owed;
            }
            tokio::time::sleep(self.tick).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration(""), Err(UnitError::Empty));
        assert_eq!(parse_duration("s"), Err(UnitError::NotANumber));
        assert_eq!(parse_duration("5 parsecs"), Err(UnitError::UnknownUnit));
        assert_eq!(parse_duration("-5s"), Err(UnitError::NotANumber));
    }

    #[test]
    fn rates() {
        assert_eq!("100/s".parse(), Ok(Rate::PerSecond(100.0)));
        assert_eq!("100".parse(), Ok(Rate::PerSecond(100.0)));
        assert_eq!("5/ms".parse(), Ok(Rate::PerSecond(5000.0)));
        assert_eq!("600/m".parse(), Ok(Rate::PerSecond(10.0)));
        assert_eq!("10/2s".parse(), Ok(Rate::PerSecond(5.0)));
        assert_eq!("MAX".parse(), Ok(Rate::Max));
        assert_eq!("0/s".parse::<Rate>(), Err(UnitError::BadRate));
        assert_eq!("abc/s".parse::<Rate>(), Err(UnitError::NotANumber));
        assert_eq!("".parse::<Rate>(), Err(UnitError::Empty));
    }

    #[test]
    fn pacer_owes_rate_times_elapsed() {
        let mut pacer = Pacer::new(1000.0);
        assert_eq!(pacer.owed_at(Duration::ZERO), 0);
        assert_eq!(pacer.owed_at(Duration::from_millis(10)), 10);
        pacer.granted = 10;
        assert_eq!(pacer.owed_at(Duration::from_millis(10)), 0);
        assert_eq!(pacer.owed_at(Duration::from_secs(1)), 990);
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_batches_follow_virtual_time() {
        let mut pacer = Pacer::new(200.0);
        let mut total = 0;
        let start = tokio::time::Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            total += pacer.next_batch().await;
        }
        assert!((199..=201).contains(&total), "total {total}");
    }
}
