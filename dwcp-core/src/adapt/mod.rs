//! The adaptive layer's measuring and deciding parts, as pure code a
//! session's clock feeds (docs/adaptivity.md):
//!
//! - [`sample`]: one [`LinkSample`] every `link-sample-ms` from the streams'
//!   TCP_INFO and the session's counters ([`LinkSampler`]);
//! - [`mode`]: datacenter / hybrid / internet from those samples, with
//!   hysteresis, a minimum dwell and a confidence threshold ([`ModeDetector`]);
//! - [`eta`]: the time a migration still needs, from the bytes left, the
//!   guest's dirty rate, the compression ratio and a rate estimate.
//!
//! Nothing here reads a socket or a clock of its own: every decision is a
//! function of the samples given, so the tests feed synthetic sequences.

pub mod eta;
pub mod mode;
pub mod sample;

use std::time::Duration;

pub use eta::{eta_s, EtaInput, MeasuredRate, RateEstimate};
pub use mode::{LinkMode, ModeConfig, ModeDetector, ModeReport, ModeSwitch};
pub use sample::{LinkSample, LinkSampler, SessionTotals};

use serde::Serialize;

/// Default interval between link samples.
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// Allowed sample intervals, as errors and help show them.
pub const SAMPLE_INTERVAL_RANGE: &str = "100..=1000 ms";

/// The adaptive layer's settings (part of [`crate::transport::TransportConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptConfig {
    /// Time between link samples, 100 ms ..= 1 s (`link-sample-ms`).
    pub sample_interval: Duration,
    /// The mode detector's thresholds and filters.
    pub mode: ModeConfig,
}

impl Default for AdaptConfig {
    fn default() -> Self {
        AdaptConfig {
            sample_interval: DEFAULT_SAMPLE_INTERVAL,
            mode: ModeConfig::default(),
        }
    }
}

/// What a session's `stats` shows of the adaptive layer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AdaptStats {
    /// The newest link sample (None before the first).
    pub link: Option<LinkSample>,
    /// The detected (or fixed) mode and its recent switches.
    pub mode: ModeReport,
    /// The rate the ETA is computed from, and the compression ratio.
    pub estimate: Option<RateEstimate>,
}
