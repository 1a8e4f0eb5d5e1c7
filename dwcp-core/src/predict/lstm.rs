//! The LSTM predictor: a model trained by `pba/train.py`, stored as ONNX,
//! run with tract (pure Rust; nothing is downloaded at build or run time).
//!
//! The model file carries its input normalisation in the ONNX
//! `metadata_props` (keys `dwcp.pba.*`, format 1):
//!
//! ```text
//! scale  = max(mean(window), scale_floor)
//! x_i    = (ln(max(s_i, rel_floor * scale) / scale) - mu) / sigma    input [window, 1, 1]
//! y      = model(x)                                                 output [1, 2]
//! next_1s = scale * exp(clamp(y0, ±out_clamp)), mean_5s likewise with y1
//! ```
//!
//! Until `window` samples have been seen, and whenever the model's output
//! is not a finite number, the prediction comes from the fallback (the best
//! simple predictor); the latter is logged once per model.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use super::{best_simple, clean, Prediction, Predictor};

/// A model file that cannot be used: the file and what is wrong with it.
#[derive(Debug)]
pub struct ModelError {
    pub path: PathBuf,
    pub msg: String,
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "model {}: {}", self.path.display(), self.msg)
    }
}

impl std::error::Error for ModelError {}

/// What the model file says about itself.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub window: usize,
    pub mu: f32,
    pub sigma: f32,
    pub scale_floor: f64,
    pub rel_floor: f64,
    pub out_clamp: f64,
    /// The mode it was trained for (`dwcp.pba.mode`), if it says.
    pub mode: Option<String>,
    /// File size, bytes.
    pub size: u64,
    /// Every `dwcp.pba.*` entry as written.
    pub props: Vec<(String, String)>,
}

type Plan = TypedRunnableModel<TypedModel>;

/// An LSTM model loaded from an ONNX file.
pub struct Lstm {
    path: PathBuf,
    info: ModelInfo,
    plan: Plan,
    window: VecDeque<f64>,
    fallback: Box<dyn Predictor>,
    cached: Option<Prediction>,
    bad_output_logged: bool,
}

impl fmt::Debug for Lstm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lstm")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

const FORMAT: &str = "1";

impl Lstm {
    /// Loads and checks a model: it must parse as ONNX, carry the
    /// normalisation metadata, take `[window, 1, 1]` and give `[1, 2]`.
    pub fn load(path: &Path) -> Result<Lstm, ModelError> {
        let err = |msg: String| ModelError {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        if bytes.is_empty() {
            return Err(err("empty file".into()));
        }
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| err(format!("not an ONNX model: {e}")))?;
        let props: HashMap<String, String> = proto
            .metadata_props
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect();
        let get = |k: &str| -> Result<&str, ModelError> {
            props.get(k).map(|s| s.as_str()).ok_or_else(|| {
                err(format!(
                    "metadata_props has no {k:?} (not a model written by pba/train.py?)"
                ))
            })
        };
        let num = |k: &str| -> Result<f64, ModelError> {
            let s = get(k)?;
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| err(format!("metadata {k} = {s:?} is not a finite number")))
        };
        let format = get("dwcp.pba.format")?;
        if format != FORMAT {
            return Err(err(format!(
                "metadata dwcp.pba.format = {format:?}; this dwcp reads format {FORMAT}"
            )));
        }
        let window = get("dwcp.pba.window")?
            .parse::<usize>()
            .ok()
            .filter(|w| (1..=1024).contains(w))
            .ok_or_else(|| err("metadata dwcp.pba.window is not in 1..=1024".into()))?;
        let sigma = num("dwcp.pba.sigma")?;
        if sigma <= 0.0 {
            return Err(err(format!(
                "metadata dwcp.pba.sigma = {sigma} must be > 0"
            )));
        }
        let info = ModelInfo {
            window,
            mu: num("dwcp.pba.mu")? as f32,
            sigma: sigma as f32,
            scale_floor: num("dwcp.pba.scale_floor")?.max(1e-12),
            rel_floor: num("dwcp.pba.rel_floor")?.max(0.0),
            out_clamp: num("dwcp.pba.out_clamp")?.abs(),
            mode: props.get("dwcp.pba.mode").cloned(),
            size: bytes.len() as u64,
            props: {
                let mut v: Vec<_> = props
                    .iter()
                    .filter(|(k, _)| k.starts_with("dwcp.pba."))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                v.sort();
                v
            },
        };
        let model = onnx
            .model_for_proto_model(&proto)
            .map_err(|e| err(format!("cannot build the graph: {e:#}")))?;
        if model.inputs.len() != 1 || model.outputs.len() != 1 {
            return Err(err(format!(
                "expected 1 input and 1 output, the graph has {} and {}",
                model.inputs.len(),
                model.outputs.len()
            )));
        }
        let want = [window, 1, 1];
        let declared = model
            .input_fact(0)
            .map_err(|e| err(format!("input: {e}")))?
            .shape
            .concretize();
        if let Some(d) = &declared {
            let dims: Vec<String> = d.iter().map(|x| x.to_string()).collect();
            let want_s: Vec<String> = want.iter().map(|x| x.to_string()).collect();
            if dims != want_s {
                return Err(err(format!(
                    "input shape is [{}], expected [{}] (window {window} from its metadata, batch 1, 1 feature)",
                    dims.join(", "),
                    want_s.join(", ")
                )));
            }
        }
        let plan = model
            .with_input_fact(0, f32::fact(want).into())
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| err(format!("cannot prepare the graph: {e:#}")))?;
        let l = Lstm {
            path: path.to_path_buf(),
            info,
            plan,
            window: VecDeque::with_capacity(window),
            fallback: best_simple(),
            cached: None,
            bad_output_logged: false,
        };
        // One run on a flat window: checks the output's shape now, not at
        // the first prediction of a migration.
        l.run(&vec![1.0; window])
            .map_err(|e| err(format!("test inference failed: {e}")))?;
        Ok(l)
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw model on one window of samples: the two outputs before
    /// denormalisation, and the window's scale.
    fn run(&self, samples: &[f64]) -> Result<([f32; 2], f64), String> {
        let i = &self.info;
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        let scale = mean.max(i.scale_floor);
        let x: Vec<f32> = samples
            .iter()
            .map(|&s| {
                let r = s.max(i.rel_floor * scale) / scale;
                ((r.ln() as f32) - i.mu) / i.sigma
            })
            .collect();
        let t = tract_ndarray::Array3::from_shape_vec((i.window, 1, 1), x)
            .map_err(|e| e.to_string())?;
        let out = self
            .plan
            .run(tvec!(Tensor::from(t).into()))
            .map_err(|e| format!("{e:#}"))?;
        let y = out[0].to_array_view::<f32>().map_err(|e| e.to_string())?;
        if y.shape() != [1, 2] {
            return Err(format!("output shape is {:?}, expected [1, 2]", y.shape()));
        }
        Ok(([y[[0, 0]], y[[0, 1]]], scale))
    }

    /// Denormalised predictions, or why they are unusable.
    fn denorm(&self, y: [f32; 2], scale: f64) -> Result<Prediction, String> {
        let c = self.info.out_clamp;
        let f = |v: f32| -> Result<f64, String> {
            let v = v as f64;
            if !v.is_finite() {
                return Err(format!("the model's output is {v}"));
            }
            Ok(scale * v.clamp(-c, c).exp())
        };
        Ok(Prediction {
            next_1s: f(y[0])?,
            mean_5s: f(y[1])?,
        })
    }
}

impl Predictor for Lstm {
    fn name(&self) -> String {
        "lstm".into()
    }

    fn observe(&mut self, mbit_s: f64) {
        let Some(v) = clean(mbit_s) else { return };
        if self.window.len() == self.info.window {
            self.window.pop_front();
        }
        self.window.push_back(v);
        self.fallback.observe(v);
        self.cached = None;
    }

    fn predict(&mut self) -> Option<Prediction> {
        if self.window.len() < self.info.window {
            return self.fallback.predict();
        }
        if let Some(p) = self.cached {
            return Some(p);
        }
        let w: Vec<f64> = self.window.iter().copied().collect();
        let r = self.run(&w).and_then(|(y, s)| self.denorm(y, s));
        let p = match r {
            Ok(p) => p,
            Err(e) => {
                if !self.bad_output_logged {
                    self.bad_output_logged = true;
                    tracing::warn!(
                        "bandwidth model {}: {e}; using {} for such predictions (logged once)",
                        self.path.display(),
                        self.fallback.name()
                    );
                }
                self.fallback.predict()?
            }
        };
        self.cached = Some(p);
        Some(p)
    }

    fn reset(&mut self) {
        self.window.clear();
        self.fallback.reset();
        self.cached = None;
    }
}

/// The model the agent uses for one mode: `<model-dir>/<mode>.onnx`, loaded
/// when present and reloaded when its modification time changes (checked at
/// most once per `check_every`), so `dwcp pba deploy-model` takes effect
/// without a restart. While there is no usable model it predicts with the
/// best simple predictor; each change of state is logged once.
#[derive(Debug)]
pub struct ModelFile {
    path: PathBuf,
    lstm: Option<Lstm>,
    fallback: Box<dyn Predictor>,
    /// (mtime, inode, size) of the file last looked at (loaded or refused).
    seen: Option<(Option<SystemTime>, u64, u64)>,
    checked: bool,
    last_check: Option<Instant>,
    check_every: Duration,
    /// The recent samples, replayed into a newly loaded model.
    history: VecDeque<f64>,
}

const HISTORY: usize = 1024;

impl ModelFile {
    pub fn new(path: &Path) -> ModelFile {
        let mut m = ModelFile {
            path: path.to_path_buf(),
            lstm: None,
            fallback: best_simple(),
            seen: None,
            checked: false,
            last_check: None,
            check_every: Duration::from_secs(1),
            history: VecDeque::new(),
        };
        m.check(true);
        m
    }

    /// How often the file's mtime is looked at (default 1 s).
    pub fn with_check_interval(mut self, d: Duration) -> Self {
        self.check_every = d;
        self
    }

    /// The model in use, if any.
    pub fn model(&self) -> Option<&Lstm> {
        self.lstm.as_ref()
    }

    /// Looks at the file now (or when `check_every` has passed unless
    /// `force`), loading it when its mtime changed.
    pub fn check(&mut self, force: bool) {
        if !force
            && self
                .last_check
                .is_some_and(|t| t.elapsed() < self.check_every)
        {
            return;
        }
        self.last_check = Some(Instant::now());
        let key = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().ok(), m.ino(), m.len()));
        if self.checked && key == self.seen {
            return;
        }
        let first = !self.checked;
        self.checked = true;
        self.seen = key;
        if key.is_none() {
            if first {
                tracing::info!(
                    "bandwidth predictor: {} (no model at {})",
                    self.fallback.name(),
                    self.path.display()
                );
            } else if self.lstm.is_some() {
                tracing::info!(
                    "bandwidth model {} removed; keeping the loaded one",
                    self.path.display()
                );
            }
            return;
        }
        match Lstm::load(&self.path) {
            Ok(mut l) => {
                for &v in &self.history {
                    l.observe(v);
                }
                tracing::info!(
                    "bandwidth predictor: lstm from {} (window {}, {} bytes)",
                    self.path.display(),
                    l.info().window,
                    l.info().size
                );
                self.lstm = Some(l);
            }
            Err(e) => tracing::warn!(
                "{e}; {}",
                match &self.lstm {
                    Some(_) => "keeping the model loaded before".to_string(),
                    None => format!("bandwidth predictor: {}", self.fallback.name()),
                }
            ),
        }
    }
}

impl Predictor for ModelFile {
    fn name(&self) -> String {
        match &self.lstm {
            Some(l) => l.name(),
            None => self.fallback.name(),
        }
    }
    fn observe(&mut self, mbit_s: f64) {
        self.check(false);
        if let Some(v) = clean(mbit_s) {
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(v);
        }
        self.fallback.observe(mbit_s);
        if let Some(l) = &mut self.lstm {
            l.observe(mbit_s);
        }
    }
    fn predict(&mut self) -> Option<Prediction> {
        match &mut self.lstm {
            Some(l) => l.predict(),
            None => self.fallback.predict(),
        }
    }
    fn reset(&mut self) {
        self.history.clear();
        self.fallback.reset();
        if let Some(l) = &mut self.lstm {
            l.reset();
        }
    }
}
