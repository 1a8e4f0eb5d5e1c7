//! Rate traces and the evaluation of predictors over them.
//!
//! A trace is one sample per line: `time_s<TAB>Mbit/s` (the FCC traces, the
//! link emulator's format) or `time_s,mbit_s` (`dwcp pba collect-samples`,
//! with that header). Blank lines and lines starting with `#` are skipped;
//! anything else that does not parse is an error naming `file:line`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::Predictor;

/// A trace that could not be read, with the file and (for bad lines) the line.
#[derive(Debug)]
pub struct TraceError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub msg: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.path.display(), self.msg),
            None => write!(f, "{}: {}", self.path.display(), self.msg),
        }
    }
}

impl std::error::Error for TraceError {}

/// A named series of rate samples, Mbit/s.
#[derive(Debug, Clone)]
pub struct Trace {
    pub name: String,
    pub samples: Vec<f64>,
}

/// Parses a trace's text (`path` names it in errors).
pub fn parse_trace(path: &Path, text: &str) -> Result<Vec<f64>, TraceError> {
    let err = |line, msg: String| TraceError {
        path: path.to_path_buf(),
        line: Some(line),
        msg,
    };
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let s = raw.trim();
        if s.is_empty() || s.starts_with('#') {
            continue;
        }
        if n == 1 && s.replace(' ', "") == "time_s,mbit_s" {
            continue;
        }
        let fields: Vec<&str> = if s.contains('\t') {
            s.split('\t').collect()
        } else if s.contains(',') {
            s.split(',').collect()
        } else {
            s.split_whitespace().collect()
        };
        if fields.len() != 2 {
            return Err(err(
                n,
                format!(
                    "expected 2 fields (time_s, Mbit/s), got {}: {s:?}",
                    fields.len()
                ),
            ));
        }
        let t: Result<f64, _> = fields[0].trim().parse();
        let v: Result<f64, _> = fields[1].trim().parse();
        let (Ok(_), Ok(v)) = (t, v) else {
            return Err(err(n, format!("not a number: {s:?}")));
        };
        if !v.is_finite() || v < 0.0 {
            return Err(err(
                n,
                format!("the rate must be finite and >= 0, got {}", fields[1].trim()),
            ));
        }
        out.push(v);
    }
    Ok(out)
}

/// Reads one trace file.
pub fn load_trace(path: &Path) -> Result<Trace, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|e| TraceError {
        path: path.to_path_buf(),
        line: None,
        msg: format!("cannot read: {e}"),
    })?;
    Ok(Trace {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        samples: parse_trace(path, &text)?,
    })
}

/// Every trace file of a directory (names starting with `.` skipped, sorted),
/// or the one file `path` names.
pub fn load_traces(path: &Path) -> Result<Vec<Trace>, TraceError> {
    if path.is_file() {
        return Ok(vec![load_trace(path)?]);
    }
    let rd = std::fs::read_dir(path).map_err(|e| TraceError {
        path: path.to_path_buf(),
        line: None,
        msg: format!("cannot read the directory: {e}"),
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(TraceError {
            path: path.to_path_buf(),
            line: None,
            msg: "no trace files".into(),
        });
    }
    files.iter().map(|p| load_trace(p)).collect()
}

/// Error sums for MAE, RMSE and R².
#[derive(Debug, Clone, Copy, Default)]
pub struct Errors {
    n: u64,
    abs: f64,
    sq: f64,
    y: f64,
    y2: f64,
}

impl Errors {
    pub fn add(&mut self, pred: f64, y: f64) {
        let e = pred - y;
        self.n += 1;
        self.abs += e.abs();
        self.sq += e * e;
        self.y += y;
        self.y2 += y * y;
    }
    pub fn merge(&mut self, o: &Errors) {
        self.n += o.n;
        self.abs += o.abs;
        self.sq += o.sq;
        self.y += o.y;
        self.y2 += o.y2;
    }
    pub fn count(&self) -> u64 {
        self.n
    }
    pub fn mae(&self) -> f64 {
        self.abs / self.n as f64
    }
    pub fn rmse(&self) -> f64 {
        (self.sq / self.n as f64).sqrt()
    }
    /// 1 - SSE / SST (NaN when the targets do not vary).
    pub fn r2(&self) -> f64 {
        let sst = self.y2 - self.y * self.y / self.n as f64;
        if sst > 0.0 {
            1.0 - self.sq / sst
        } else {
            f64::NAN
        }
    }
}

/// One predictor's errors over a set of traces.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub predictor: String,
    pub next_1s: Errors,
    pub mean_5s: Errors,
    /// Per trace: (name, next_1s, mean_5s).
    pub per_trace: Vec<(String, Errors, Errors)>,
    /// Time of each `predict()` call, ns.
    pub latency_ns: Vec<u64>,
}

/// The number of samples every predictor has seen before it is scored: the
/// window of the shipped model, so all predictors are scored on the same
/// positions (the Python trainer's report uses the same rule).
pub const WARMUP: usize = 10;

/// Runs `p` over each trace (reset at the start of each): after each sample
/// `t` (from the `warmup`-th on, while five more follow) the prediction is
/// scored against sample `t+1` and the mean of `t+1..=t+5`.
pub fn evaluate(p: &mut dyn Predictor, traces: &[Trace], warmup: usize) -> Evaluation {
    let mut ev = Evaluation {
        predictor: p.name(),
        ..Default::default()
    };
    for tr in traces {
        p.reset();
        let s = &tr.samples;
        let (mut e1, mut e5) = (Errors::default(), Errors::default());
        for t in 0..s.len() {
            p.observe(s[t]);
            if t + 1 < warmup.max(1) || t + 5 >= s.len() {
                continue;
            }
            let t0 = Instant::now();
            let pr = p.predict();
            ev.latency_ns.push(t0.elapsed().as_nanos() as u64);
            let Some(pr) = pr else { continue };
            let mean5 = s[t + 1..=t + 5].iter().sum::<f64>() / 5.0;
            e1.add(pr.next_1s, s[t + 1]);
            e5.add(pr.mean_5s, mean5);
        }
        ev.next_1s.merge(&e1);
        ev.mean_5s.merge(&e5);
        if e1.count() > 0 {
            ev.per_trace.push((tr.name.clone(), e1, e5));
        }
    }
    ev
}

/// The `q`-quantile (0..=1) of a set of latencies, ns.
pub fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    s[((s.len() - 1) as f64 * q).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::{HarmonicMean, LastValue};

    #[test]
    fn bad_lines_name_file_and_line() {
        let p = Path::new("x/t1");
        assert_eq!(
            parse_trace(p, "0\t1.5\n1\t2\n\n# c\n4\t0\n").unwrap(),
            vec![1.5, 2.0, 0.0]
        );
        assert_eq!(
            parse_trace(p, "time_s,mbit_s\n0,3\n1,4.5\n").unwrap(),
            vec![3.0, 4.5]
        );
        let e = parse_trace(p, "0\t1\n1\tabc\n").unwrap_err();
        assert_eq!(e.to_string(), "x/t1:2: not a number: \"1\\tabc\"");
        let e = parse_trace(p, "0\t1\n1\t2\t3\n").unwrap_err();
        assert!(
            e.to_string().starts_with("x/t1:2: expected 2 fields"),
            "{e}"
        );
        let e = parse_trace(p, "0\t1\n1\t2\n2\t-1\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "x/t1:3: the rate must be finite and >= 0, got -1"
        );
        let e = parse_trace(p, "0\tNaN\n").unwrap_err();
        assert!(e.to_string().starts_with("x/t1:1: the rate must be"), "{e}");
        let e = load_trace(Path::new("/nonexistent/trace")).unwrap_err();
        assert!(
            e.to_string().starts_with("/nonexistent/trace: cannot read"),
            "{e}"
        );
    }

    #[test]
    fn evaluation_exact() {
        // 0..=9: last value predicts s[t]; next is s[t]+1, the mean of the
        // next five s[t]+3: MAE 1 and 3 at every position.
        let tr = Trace {
            name: "ramp".into(),
            samples: (0..10).map(|x| x as f64).collect(),
        };
        let ev = evaluate(&mut LastValue::new(), std::slice::from_ref(&tr), 2);
        // positions t = 1..=4 (t+5 <= 9)
        assert_eq!(ev.next_1s.count(), 4);
        assert_eq!(ev.next_1s.mae(), 1.0);
        assert_eq!(ev.mean_5s.mae(), 3.0);
        assert_eq!(ev.mean_5s.rmse(), 3.0);
        // targets 2,3,4,5: SST = 5, SSE = 4 -> R² = 0.2
        assert!((ev.next_1s.r2() - 0.2).abs() < 1e-12);
        assert_eq!(ev.per_trace.len(), 1);
        assert_eq!(ev.latency_ns.len(), 4);
        // a constant trace: every predictor exact
        let flat = Trace {
            name: "flat".into(),
            samples: vec![5.0; 30],
        };
        let ev = evaluate(&mut HarmonicMean::new(5), &[flat], WARMUP);
        assert_eq!(ev.mean_5s.mae(), 0.0);
        assert_eq!(ev.next_1s.count() as usize, 30 - 5 - (WARMUP - 1));
    }

    #[test]
    fn quantiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 51);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&[], 0.5), 0);
    }
}
