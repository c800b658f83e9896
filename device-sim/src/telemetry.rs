//! A plausible device model for telemetry: temperature random walk, battery drain, rare alarms.

use rand::Rng;
use serde::Serialize;

/// Temperature stays inside these bounds (°C).
pub const TEMPERATURE_MIN: f64 = -20.0;
pub const TEMPERATURE_MAX: f64 = 60.0;
/// Largest temperature change in one step (°C).
pub const TEMPERATURE_STEP: f64 = 0.5;
/// Battery drain per step, in percent.
pub const BATTERY_DRAIN: f64 = 0.01;
/// Probability that a step raises an alarm.
pub const ALARM_PROBABILITY: f64 = 0.001;

/// One telemetry message as published on `devices/{thing}/telemetry`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TelemetrySample {
    pub seq: u64,
    pub temperature: f64,
    pub battery: f64,
    pub alarm: bool,
    pub setpoint: f64,
}

/// State of one simulated sensor. The temperature drifts randomly and is pulled toward the
/// setpoint (the device's actuator), the battery drains and is swapped when empty.
#[derive(Debug, Clone)]
pub struct TelemetryModel {
    seq: u64,
    temperature: f64,
    battery: f64,
    setpoint: f64,
}

impl TelemetryModel {
    pub fn new(rng: &mut impl Rng) -> Self {
        TelemetryModel {
            seq: 0,
            temperature: rng.gen_range(15.0..25.0),
            battery: rng.gen_range(50.0..100.0),
            setpoint: 21.0,
        }
    }

    pub fn setpoint(&self) -> f64 {
        self.setpoint
    }

    /// Applies a new setpoint from the shadow (clamped into the physical range).
    pub fn set_setpoint(&mut self, setpoint: f64) {
        if setpoint.is_finite() {
            self.setpoint = setpoint.clamp(TEMPERATURE_MIN, TEMPERATURE_MAX);
        }
    }

    /// Advances the model by one step and returns the sample to publish.
    pub fn step(&mut self, rng: &mut impl Rng) -> TelemetrySample {
        self.seq += 1;
        let noise = rng.gen_range(-TEMPERATURE_STEP..=TEMPERATURE_STEP) * 0.8;
        let pull = ((self.setpoint - self.temperature) * 0.1)
            .clamp(-TEMPERATURE_STEP * 0.2, TEMPERATURE_STEP * 0.2);
        self.temperature =
            (self.temperature + noise + pull).clamp(TEMPERATURE_MIN, TEMPERATURE_MAX);
        self.battery -= BATTERY_DRAIN;
        if self.battery <= 0.0 {
            // Someone swapped the battery.
            self.battery = 100.0;
        }
        let alarm = rng.gen_bool(ALARM_PROBABILITY) || self.battery < 5.0;
        TelemetrySample {
            seq: self.seq,
            temperature: (self.temperature * 100.0).round() / 100.0,
            battery: (self.battery * 100.0).round() / 100.0,
            alarm,
            setpoint: self.setpoint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn samples_stay_in_bounds_over_a_long_run() {
        let mut rng = StdRng::seed_from_u64(42);
        let mut model = TelemetryModel::new(&mut rng);
        let mut previous = None;
        let mut alarms = 0;
        for step in 0..200_000 {
            if step % 10_000 == 0 {
                model.set_setpoint(if step % 20_000 == 0 { 1000.0 } else { -1000.0 });
            }
            let sample = model.step(&mut rng);
            assert!((TEMPERATURE_MIN..=TEMPERATURE_MAX).contains(&sample.temperature));
            assert!(
                (0.0..=100.0).contains(&sample.battery),
                "{}",
                sample.battery
            );
            if let Some(previous) = previous {
                let jump: f64 = sample.temperature - previous;
                assert!(jump.abs() <= TEMPERATURE_STEP + 0.011, "jump {jump}");
            }
            previous = Some(sample.temperature);
            alarms += usize::from(sample.alarm);
            assert_eq!(sample.seq, step + 1);
        }
        // Rare but present (random alarms plus low-battery stretches).
        assert!(alarms > 0 && alarms < 20_000, "alarms {alarms}");
    }

    #[test]
    fn setpoint_is_clamped_and_ignores_nan() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut model = TelemetryModel::new(&mut rng);
        model.set_setpoint(22.5);
        assert_eq!(model.setpoint(), 22.5);
        model.set_setpoint(f64::NAN);
        assert_eq!(model.setpoint(), 22.5);
        model.set_setpoint(500.0);
        assert_eq!(model.setpoint(), TEMPERATURE_MAX);
    }
}
