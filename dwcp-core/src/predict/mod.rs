//! Bandwidth prediction (PBA): from a series of rate samples (Mbit/s, one
//! per interval, normally one second) predict the rate of the next interval
//! and the mean rate over the next five.
//!
//! - [`Predictor`]: the one trait; [`LastValue`], [`Ewma`], [`HarmonicMean`]
//!   (the adaptive-bitrate literature's baseline) and, with the `onnx`
//!   feature, [`Lstm`] (a trained model in an ONNX file, run by tract) and
//!   [`ModelFile`] (an `Lstm` that reloads when its file changes, with the
//!   simple fallback while there is none).
//! - [`trace`]: the trace format (`time_s<TAB>Mbit/s`), evaluation of a
//!   predictor over traces (MAE, RMSE, R²).
//!
//! Samples that are not finite are ignored; negative ones count as 0.

pub mod trace;

#[cfg(feature = "onnx")]
mod lstm;
#[cfg(feature = "onnx")]
pub use lstm::{Lstm, ModelError, ModelFile, ModelInfo};

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// One prediction, Mbit/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// The rate over the next interval.
    pub next_1s: f64,
    /// The mean rate over the next five intervals.
    pub mean_5s: f64,
}

/// The agent's newest prediction of the wire rate of its migrations (the
/// sum over its sessions), with the predictor's name: the agent's predictor
/// thread publishes it once a second ([`publish`]), the closed-loop tuning
/// and the ETA read it ([`latest`]). One agent per process.
static LATEST: Mutex<Option<(Instant, Prediction, String)>> = Mutex::new(None);

/// How long a published prediction stands (the predictor runs once a
/// second; three missed runs and it is stale).
pub const PREDICTION_FRESH: Duration = Duration::from_secs(3);

/// Publishes the agent's newest prediction (Mbit/s) by `predictor`. A
/// prediction that is not finite or negative is not published.
pub fn publish(p: Prediction, predictor: &str) {
    if [p.next_1s, p.mean_5s]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0)
    {
        *LATEST.lock() = Some((Instant::now(), p, predictor.to_string()));
    }
}

/// The newest published prediction and its predictor, while fresh
/// ([`PREDICTION_FRESH`]).
pub fn latest() -> Option<(Prediction, String)> {
    let l = LATEST.lock();
    let (at, p, name) = l.as_ref()?;
    (at.elapsed() < PREDICTION_FRESH).then(|| (*p, name.clone()))
}

/// A bandwidth predictor fed one rate sample per interval.
pub trait Predictor: Send + std::fmt::Debug {
    /// A short name for tables and logs (`last_value`, `ewma(0.5)`, `lstm`).
    fn name(&self) -> String;
    /// The rate measured over the interval that just ended, Mbit/s.
    fn observe(&mut self, mbit_s: f64);
    /// Both predictions; `None` before the first sample.
    fn predict(&mut self) -> Option<Prediction>;
    /// Forget every sample (a new path).
    fn reset(&mut self);
    /// The predicted rate of the next interval, Mbit/s.
    fn predict_next_1s(&mut self) -> Option<f64> {
        self.predict().map(|p| p.next_1s)
    }
    /// The predicted mean rate over the next five intervals, Mbit/s.
    fn predict_mean_5s(&mut self) -> Option<f64> {
        self.predict().map(|p| p.mean_5s)
    }
}

/// The sample as the predictors use it: `None` for NaN/inf, 0 for negative.
pub(crate) fn clean(mbit_s: f64) -> Option<f64> {
    mbit_s.is_finite().then_some(mbit_s.max(0.0))
}

/// Predicts that the rate stays what it was over the last interval.
#[derive(Debug, Clone, Default)]
pub struct LastValue {
    last: Option<f64>,
}

impl LastValue {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Predictor for LastValue {
    fn name(&self) -> String {
        "last_value".into()
    }
    fn observe(&mut self, mbit_s: f64) {
        if let Some(v) = clean(mbit_s) {
            self.last = Some(v);
        }
    }
    fn predict(&mut self) -> Option<Prediction> {
        self.last.map(|v| Prediction {
            next_1s: v,
            mean_5s: v,
        })
    }
    fn reset(&mut self) {
        self.last = None;
    }
}

/// Exponentially weighted moving average: `e = alpha * sample + (1 - alpha) * e`,
/// starting at the first sample.
#[derive(Debug, Clone)]
pub struct Ewma {
    alpha: f64,
    value: Option<f64>,
}

impl Ewma {
    /// `alpha` in (0, 1]; values outside are clamped into it.
    pub fn new(alpha: f64) -> Self {
        let alpha = if alpha.is_finite() {
            alpha.clamp(1e-6, 1.0)
        } else {
            0.5
        };
        Ewma { alpha, value: None }
    }
}

impl Predictor for Ewma {
    fn name(&self) -> String {
        format!("ewma({})", self.alpha)
    }
    fn observe(&mut self, mbit_s: f64) {
        if let Some(v) = clean(mbit_s) {
            self.value = Some(match self.value {
                Some(e) => self.alpha * v + (1.0 - self.alpha) * e,
                None => v,
            });
        }
    }
    fn predict(&mut self) -> Option<Prediction> {
        self.value.map(|v| Prediction {
            next_1s: v,
            mean_5s: v,
        })
    }
    fn reset(&mut self) {
        self.value = None;
    }
}

/// Harmonic mean of the last `k` samples (fewer at the start); a zero
/// sample in them makes it 0.
#[derive(Debug, Clone)]
pub struct HarmonicMean {
    k: usize,
    buf: VecDeque<f64>,
}

impl HarmonicMean {
    pub fn new(k: usize) -> Self {
        let k = k.max(1);
        HarmonicMean {
            k,
            buf: VecDeque::with_capacity(k),
        }
    }
}

impl Predictor for HarmonicMean {
    fn name(&self) -> String {
        format!("harmonic_mean({})", self.k)
    }
    fn observe(&mut self, mbit_s: f64) {
        if let Some(v) = clean(mbit_s) {
            if self.buf.len() == self.k {
                self.buf.pop_front();
            }
            self.buf.push_back(v);
        }
    }
    fn predict(&mut self) -> Option<Prediction> {
        if self.buf.is_empty() {
            return None;
        }
        let v = if self.buf.iter().any(|&x| x <= 0.0) {
            0.0
        } else {
            self.buf.len() as f64 / self.buf.iter().map(|x| 1.0 / x).sum::<f64>()
        };
        Some(Prediction {
            next_1s: v,
            mean_5s: v,
        })
    }
    fn reset(&mut self) {
        self.buf.clear();
    }
}

/// The simple predictor used when there is no model: the best of the simple
/// ones by MAE for the 5-s mean (the target the tuning uses) on the FCC valid
/// split, EWMA(0.9); it is also the best of them on the test split
/// (`dwcp benchmark pba`, docs/adaptivity.md).
pub fn best_simple() -> Box<dyn Predictor> {
    Box::new(Ewma::new(EWMA_ALPHA))
}

/// The simple predictors `dwcp pba evaluate` and `dwcp benchmark pba` compare.
pub fn simple_predictors() -> Vec<Box<dyn Predictor>> {
    vec![
        Box::new(LastValue::new()),
        Box::new(Ewma::new(EWMA_ALPHA)),
        Box::new(HarmonicMean::new(5)),
    ]
}

/// EWMA weight of the newest sample: the best 5-s-mean MAE on the FCC valid
/// split among 0.1, 0.2, .., 1.0 (0.9: 0.1453 Mbit/s; 0.5: 0.1555).
pub const EWMA_ALPHA: f64 = 0.9;

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(p: &mut dyn Predictor, xs: &[f64]) -> Prediction {
        for &x in xs {
            p.observe(x);
        }
        p.predict().unwrap()
    }

    #[test]
    fn last_value_is_the_last_sample() {
        let mut p = LastValue::new();
        assert_eq!(p.predict(), None);
        let r = feed(&mut p, &[3.0, 7.5, f64::NAN, 2.25]);
        assert_eq!((r.next_1s, r.mean_5s), (2.25, 2.25));
        p.observe(-4.0);
        assert_eq!(p.predict_next_1s(), Some(0.0));
        p.reset();
        assert_eq!(p.predict_mean_5s(), None);
    }

    #[test]
    fn ewma_exact() {
        let mut p = Ewma::new(0.5);
        // 4 -> 0.5*8 + 0.5*4 = 6 -> 0.5*2 + 0.5*6 = 4
        let r = feed(&mut p, &[4.0, 8.0, f64::INFINITY, 2.0]);
        assert_eq!(r.next_1s, 4.0);
        assert_eq!(r.mean_5s, 4.0);
        assert_eq!(p.name(), "ewma(0.5)");
        let mut q = Ewma::new(0.25);
        assert_eq!(feed(&mut q, &[8.0, 0.0]).next_1s, 6.0);
    }

    #[test]
    fn harmonic_mean_exact() {
        let mut p = HarmonicMean::new(5);
        // the first two: 2 / (1/1 + 1/4) = 1.6
        assert_eq!(feed(&mut p, &[1.0, 4.0]).next_1s, 1.6);
        // the window keeps the last 5: 2,2,4,4,4 -> 5 / (1/2+1/2+3/4) = 5/1.75
        let r = feed(&mut p, &[2.0, 2.0, 4.0, 4.0, 4.0]);
        assert!((r.mean_5s - 5.0 / 1.75).abs() < 1e-12, "{r:?}");
        // a zero sample in the window makes it 0, until it leaves the window
        assert_eq!(feed(&mut p, &[0.0]).next_1s, 0.0);
        assert_eq!(feed(&mut p, &[1.0, 1.0, 1.0, 1.0]).next_1s, 0.0);
        assert_eq!(feed(&mut p, &[1.0]).next_1s, 1.0);
        assert_eq!(p.name(), "harmonic_mean(5)");
    }
}
