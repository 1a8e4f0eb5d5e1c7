//! `dwcp pba`: bandwidth prediction models (docs/adaptivity.md, "Bandwidth
//! prediction"): collect rate samples from a live agent, train an LSTM
//! (pba/train.py in its venv), evaluate it against the simple predictors,
//! deploy it where the agent loads it; and `dwcp benchmark pba`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dwcp_core::agent::control_call;
use dwcp_core::predict::trace::{self, Evaluation, Trace};
use dwcp_core::predict::{self, Lstm, Predictor};
use serde_json::{json, Value};

#[derive(Subcommand, Debug)]
pub enum PbaCmd {
    /// Sample the local agent's wire rate (all running sessions, Mbit/s)
    /// once per interval into a CSV trace (`time_s,mbit_s`) for training.
    CollectSamples(CollectArgs),
    /// Train an LSTM predictor (pba/train.py in the PBA venv, `make pba-venv`)
    /// and write it as ONNX.
    Train(TrainArgs),
    /// The model and the simple predictors on test traces: MAE, RMSE, R²
    /// for the next second and the next 5 s' mean.
    Evaluate(EvaluateArgs),
    /// Check a model, then atomically replace MODEL_DIR/MODE.onnx with it
    /// (the agent reloads a model file when it changes).
    DeployModel(DeployArgs),
}

#[derive(Args, Debug)]
pub struct CollectArgs {
    /// How long to sample (e.g. 300s, 10m).
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    /// The CSV file to write.
    #[arg(long)]
    output: PathBuf,
    /// Time between samples.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Also write intervals in which no migration was moving bytes (as 0).
    #[arg(long)]
    include_idle: bool,
    /// The agent's control socket.
    #[arg(long, default_value = "/run/dwcp/agent.sock")]
    agent: PathBuf,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training data: a directory with train/ and valid/ (and test/)
    /// subdirectories of traces, or collected sample files (each split
    /// 80/20 in time into training and validation).
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// The mode the model is for (datacenter, hybrid, internet); recorded
    /// in the model.
    #[arg(long, default_value = "internet")]
    mode: String,
    /// Training epochs (the epoch best on the validation data is kept).
    #[arg(long, default_value_t = 20)]
    epochs: u32,
    /// The ONNX file to write.
    #[arg(long)]
    output: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Samples the model sees per prediction.
    #[arg(long, default_value_t = 10)]
    window: u32,
    /// LSTM hidden units.
    #[arg(long, default_value_t = 24)]
    hidden: u32,
    /// Python of the PBA venv [default: $DWCP_PBA_VENV/bin/python, else
    /// $XDG_CACHE_HOME/dwcp/pba-venv/bin/python].
    #[arg(long)]
    python: Option<PathBuf>,
    /// pba/train.py [default: found in the source checkout above the
    /// executable or the current directory].
    #[arg(long)]
    trainer: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// The ONNX model [default: pba/models/internet.onnx of the checkout].
    #[arg(long)]
    model: Option<PathBuf>,
    /// A directory of test traces (or one trace file).
    #[arg(long)]
    test_data: PathBuf,
    /// Also write the per-trace errors as CSV.
    #[arg(long)]
    per_trace: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// The ONNX model to deploy.
    #[arg(long)]
    model: PathBuf,
    /// The mode it serves: the file becomes MODEL_DIR/MODE.onnx.
    #[arg(long)]
    mode: String,
    /// The agent's model directory.
    #[arg(long, env = "DWCP_MODEL_DIR", default_value = "/var/lib/dwcp/models")]
    model_dir: PathBuf,
}

pub fn run(cmd: PbaCmd, json_out: bool) -> Result<()> {
    match cmd {
        PbaCmd::CollectSamples(a) => collect(a),
        PbaCmd::Train(a) => train(a),
        PbaCmd::Evaluate(a) => evaluate(a, json_out),
        PbaCmd::DeployModel(a) => deploy(a, json_out).map(|_| ()),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60.0)
    } else if let Some(v) = s.strip_suffix('h') {
        (v, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: use e.g. 300s, 10m, 500ms"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?}: must be > 0"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// The first directory above the executable or the current directory that
/// holds `pba/train.py` (a source checkout).
pub fn checkout() -> Option<PathBuf> {
    let mut starts = Vec::new();
    if let Ok(e) = std::env::current_exe() {
        starts.push(e);
    }
    if let Ok(c) = std::env::current_dir() {
        starts.push(c);
    }
    for s in starts {
        for d in s.ancestors() {
            if d.join("pba/train.py").is_file() {
                return Some(d.to_path_buf());
            }
        }
    }
    None
}

/// The shipped model: `pba/models/internet.onnx` of the checkout.
pub fn default_model() -> Result<PathBuf> {
    checkout()
        .map(|d| d.join("pba/models/internet.onnx"))
        .context("no --model given and no source checkout (pba/models/internet.onnx) found above the executable or the current directory")
}

// ---------------------------------------------------------------- collect

/// Wire bytes a session has moved (source: sent, destination: received).
fn wire_bytes(s: &Value) -> u64 {
    let k = if s["role"] == "responder" {
        "wire_in"
    } else {
        "wire_out"
    };
    s[k].as_u64().unwrap_or(0)
}

/// Sums the wire-byte increase of every session between two `stats`
/// answers (matched by name and role) and says whether any was running.
pub fn wire_delta(prev: &Value, now: &Value) -> (u64, bool) {
    let key = |s: &Value| format!("{}/{}", s["name"], s["role"]);
    let mut total = 0u64;
    let mut running = false;
    for s in now["sessions"].as_array().into_iter().flatten() {
        let before = prev["sessions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| key(p) == key(s))
            .map(wire_bytes)
            .unwrap_or(0);
        let d = wire_bytes(s).saturating_sub(before);
        total += d;
        running |= s["state"] == "running" || d > 0;
    }
    (total, running)
}

fn collect(a: CollectArgs) -> Result<()> {
    if a.interval < Duration::from_millis(100) {
        bail!("--interval must be at least 100ms");
    }
    // The agent first: no file is left behind when it cannot be reached.
    let mut prev = control_call(&a.agent, &json!({"op": "stats"}))?;
    let mut f =
        File::create(&a.output).with_context(|| format!("creating {}", a.output.display()))?;
    writeln!(f, "time_s,mbit_s")?;
    let start = Instant::now();
    let mut prev_at = Instant::now();
    let (mut written, mut idle) = (0u64, 0u64);
    eprintln!(
        "sampling {} every {:?} for {:?} into {}",
        a.agent.display(),
        a.interval,
        a.duration,
        a.output.display()
    );
    let mut next = prev_at + a.interval;
    while start.elapsed() < a.duration {
        let now_i = Instant::now();
        if next > now_i {
            std::thread::sleep(next - now_i);
        }
        next += a.interval;
        let now = control_call(&a.agent, &json!({"op": "stats"}))?;
        let at = Instant::now();
        let dt = at.duration_since(prev_at).as_secs_f64();
        let (bytes, running) = wire_delta(&prev, &now);
        prev = now;
        prev_at = at;
        if !running && !a.include_idle {
            idle += 1;
            continue;
        }
        let mbit = bytes as f64 * 8.0 / dt / 1e6;
        writeln!(f, "{:.3},{mbit:.6}", at.duration_since(start).as_secs_f64())?;
        f.flush()?;
        written += 1;
    }
    eprintln!(
        "{written} samples written to {} ({idle} idle intervals skipped)",
        a.output.display()
    );
    Ok(())
}

// ------------------------------------------------------------------ train

fn venv_python() -> PathBuf {
    if let Some(v) = std::env::var_os("DWCP_PBA_VENV") {
        return PathBuf::from(v).join("bin/python");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("dwcp/pba-venv/bin/python")
}

fn train(a: TrainArgs) -> Result<()> {
    let python = a.python.clone().unwrap_or_else(venv_python);
    if !python.exists() {
        bail!(
            "the PBA trainer's Python is not at {}: create the venv with `make pba-venv` \
             (numpy and onnx, pinned in pba/requirements.txt), or give --python / DWCP_PBA_VENV",
            python.display()
        );
    }
    let trainer = match &a.trainer {
        Some(t) => t.clone(),
        None => checkout().map(|d| d.join("pba/train.py")).context(
            "pba/train.py not found above the executable or the current directory: give --trainer",
        )?,
    };
    if !is_valid_mode(&a.mode) {
        bail!(
            "--mode {:?}: use letters, digits, - and _ (datacenter, hybrid, internet)",
            a.mode
        );
    }
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(&trainer);
    let split = a.input.len() == 1
        && a.input[0].join("train").is_dir()
        && a.input[0].join("valid").is_dir();
    if split {
        let d = &a.input[0];
        cmd.arg("--train").arg(d.join("train"));
        cmd.arg("--valid").arg(d.join("valid"));
        if d.join("test").is_dir() {
            cmd.arg("--test").arg(d.join("test"));
        }
    } else {
        for p in &a.input {
            if !p.is_file() {
                bail!(
                    "--input {}: not a file, nor a directory with train/ and valid/",
                    p.display()
                );
            }
            // Bad lines are reported here, with file:line, before Python starts.
            trace::load_trace(p)?;
        }
        cmd.arg("--input").args(&a.input);
    }
    cmd.args(["--mode", &a.mode])
        .args(["--epochs", &a.epochs.to_string()])
        .args(["--seed", &a.seed.to_string()])
        .args(["--window", &a.window.to_string()])
        .args(["--hidden", &a.hidden.to_string()])
        .arg("--output")
        .arg(&a.output);
    eprintln!("running {cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("starting {}", python.display()))?;
    if !st.success() {
        bail!("the trainer failed ({st})");
    }
    // The file it wrote must load here too.
    let m = Lstm::load(&a.output)?;
    eprintln!(
        "{}: window {}, {} bytes; loads in dwcp",
        a.output.display(),
        m.info().window,
        m.info().size
    );
    Ok(())
}

// --------------------------------------------------------------- evaluate

/// The simple predictors and (when given) the model over `traces`.
pub fn evaluate_all(model: Option<&Path>, traces: &[Trace]) -> Result<Vec<Evaluation>> {
    let mut out = Vec::new();
    for mut p in predict::simple_predictors() {
        out.push(trace::evaluate(p.as_mut(), traces, trace::WARMUP));
    }
    if let Some(m) = model {
        let mut l = Lstm::load(m)?;
        out.push(trace::evaluate(&mut l, traces, trace::WARMUP));
    }
    Ok(out)
}

pub fn table(evs: &[Evaluation]) -> String {
    let mut s = String::from(
        "| predictor | target | MAE (Mbit/s) | RMSE (Mbit/s) | R² |\n|---|---|---:|---:|---:|\n",
    );
    for e in evs {
        for (t, er) in [("next 1 s", &e.next_1s), ("mean 5 s", &e.mean_5s)] {
            s += &format!(
                "| {} | {t} | {:.4} | {:.4} | {:.4} |\n",
                e.predictor,
                er.mae(),
                er.rmse(),
                er.r2()
            );
        }
    }
    s
}

fn errors_json(e: &trace::Errors) -> Value {
    json!({"mae": e.mae(), "rmse": e.rmse(), "r2": finite_or_null(e.r2()), "n": e.count()})
}

fn finite_or_null(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

pub fn per_trace_csv(evs: &[Evaluation]) -> String {
    let mut s = String::from("trace,predictor,target,n,mae,rmse,r2\n");
    for e in evs {
        for (name, e1, e5) in &e.per_trace {
            for (t, er) in [("next_1s", e1), ("mean_5s", e5)] {
                s += &format!(
                    "{name},{},{t},{},{:.6},{:.6},{:.6}\n",
                    e.predictor,
                    er.count(),
                    er.mae(),
                    er.rmse(),
                    er.r2()
                );
            }
        }
    }
    s
}

fn evaluate(a: EvaluateArgs, json_out: bool) -> Result<()> {
    let model = match a.model {
        Some(m) => m,
        None => default_model()?,
    };
    let traces = trace::load_traces(&a.test_data)?;
    let evs = evaluate_all(Some(&model), &traces)?;
    if let Some(p) = &a.per_trace {
        std::fs::write(p, per_trace_csv(&evs))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if json_out {
        let rows: Vec<Value> = evs
            .iter()
            .map(|e| {
                json!({"predictor": e.predictor, "next_1s": errors_json(&e.next_1s),
                       "mean_5s": errors_json(&e.mean_5s)})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"model": model, "traces": traces.len(), "predictors": rows})
            )?
        );
    } else {
        println!(
            "{} traces, {} positions each predictor; model {}\n",
            traces.len(),
            evs[0].next_1s.count(),
            model.display()
        );
        print!("{}", table(&evs));
    }
    Ok(())
}

// ----------------------------------------------------------------- deploy

fn is_valid_mode(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 64
        && m.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks `model`, then puts it at `<model_dir>/<mode>.onnx` by writing a
/// temporary file in that directory, syncing it and renaming it over the
/// old one: a reader sees the old model or the new one, never a part.
pub fn deploy(a: DeployArgs, json_out: bool) -> Result<PathBuf> {
    if !is_valid_mode(&a.mode) {
        bail!(
            "--mode {:?}: use letters, digits, - and _ (datacenter, hybrid, internet)",
            a.mode
        );
    }
    let m = Lstm::load(&a.model)?;
    if let Some(trained) = &m.info().mode {
        if trained != &a.mode {
            tracing::warn!(
                "{} was trained for mode {trained:?}, deployed as {:?}",
                a.model.display(),
                a.mode
            );
        }
    }
    std::fs::create_dir_all(&a.model_dir)
        .with_context(|| format!("creating the model directory {}", a.model_dir.display()))?;
    let dest = a.model_dir.join(format!("{}.onnx", a.mode));
    let tmp = a
        .model_dir
        .join(format!(".{}.onnx.tmp-{}", a.mode, std::process::id()));
    let bytes =
        std::fs::read(&a.model).with_context(|| format!("reading {}", a.model.display()))?;
    let r = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dest)?;
        File::open(&a.model_dir)?.sync_all()
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("installing {}", dest.display()));
    }
    if json_out {
        println!(
            "{}",
            json!({"ok": true, "model": dest, "mode": a.mode, "bytes": bytes.len(),
                   "window": m.info().window})
        );
    } else {
        eprintln!(
            "deployed {} as {} ({} bytes, window {}); the agent loads it at its next check",
            a.model.display(),
            dest.display(),
            bytes.len(),
            m.info().window
        );
    }
    Ok(dest)
}

// ------------------------------------------------------------------ agent

/// The agent's predictor: `MODEL_DIR/internet.onnx` when it loads (else
/// `ewma(0.9)`, said once in the log), reloaded when the file changes, fed
/// once a second with the wire rate of the agent's migrations (read from its
/// own control socket, as `collect-samples` does). Each prediction is
/// published ([`predict::publish`]) for the ETA and the tuning of the
/// agent's migrations (docs/adaptivity.md), and logged at debug level.
pub fn spawn_agent_predictor(control: PathBuf, model_dir: PathBuf) -> Result<()> {
    std::thread::Builder::new()
        .name("pba".into())
        .spawn(move || {
            let mut model = predict::ModelFile::new(&model_dir.join("internet.onnx"));
            let mut prev: Option<(Value, Instant)> = None;
            loop {
                std::thread::sleep(Duration::from_secs(1));
                model.check(false);
                let Ok(now) = control_call(&control, &json!({"op": "stats"})) else {
                    prev = None;
                    continue;
                };
                let at = Instant::now();
                if let Some((p, t)) = &prev {
                    let (bytes, running) = wire_delta(p, &now);
                    if running {
                        let dt = at.duration_since(*t).as_secs_f64().max(1e-3);
                        model.observe(bytes as f64 * 8.0 / dt / 1e6);
                        if let Some(p) = model.predict() {
                            predict::publish(p, &model.name());
                            tracing::debug!(
                                "bandwidth prediction ({}): next 1 s {:.1} Mbit/s, 5-s mean {:.1} Mbit/s",
                                model.name(),
                                p.next_1s,
                                p.mean_5s
                            );
                        }
                    }
                }
                prev = Some((now, at));
            }
        })
        .context("starting the bandwidth predictor thread")?;
    Ok(())
}

// -------------------------------------------------------- benchmark pba

#[derive(Args, Debug)]
pub struct BenchPbaArgs {
    /// The ONNX model [default: pba/models/internet.onnx of the checkout].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Test traces [default: $DWCP_TRACES/fcc/test, else
    /// ../shared/traces/fcc/test beside the checkout].
    #[arg(long)]
    test_data: Option<PathBuf>,
    /// Directory for pba.md, pba.json and pba-per-trace.csv.
    #[arg(long, default_value = "dwcp-bench")]
    output: PathBuf,
}

fn default_test_data() -> Result<PathBuf> {
    if let Some(t) = std::env::var_os("DWCP_TRACES") {
        return Ok(PathBuf::from(t).join("fcc/test"));
    }
    checkout()
        .and_then(|d| d.parent().map(|p| p.join("shared/traces/fcc/test")))
        .filter(|p| p.is_dir())
        .context(
            "no --test-data, no $DWCP_TRACES and no ../shared/traces/fcc/test beside the checkout",
        )
}

pub fn bench(a: BenchPbaArgs, command: String) -> Result<()> {
    let model = match a.model {
        Some(m) => m,
        None => default_model()?,
    };
    let test = match a.test_data {
        Some(t) => t,
        None => default_test_data()?,
    };
    let traces = trace::load_traces(&test)?;
    let t0 = Instant::now();
    let lstm = Lstm::load(&model)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let info = lstm.info().clone();
    let evs = evaluate_all(Some(&model), &traces)?;
    let mut md = format!(
        "`{command}`\n\n{} test traces ({}), {} positions per predictor (from the {}th sample, \
         while 5 more follow).\n\n",
        traces.len(),
        test.display(),
        evs[0].next_1s.count(),
        trace::WARMUP
    );
    md += &table(&evs);
    md += "\n| predictor | inference p50 | p99 | model size |\n|---|---:|---:|---:|\n";
    let mut rows = Vec::new();
    for e in &evs {
        let p50 = trace::quantile(&e.latency_ns, 0.5);
        let p99 = trace::quantile(&e.latency_ns, 0.99);
        let size = if e.predictor == "lstm" {
            format!("{} bytes", info.size)
        } else {
            "-".into()
        };
        md += &format!(
            "| {} | {:.1} µs | {:.1} µs | {size} |\n",
            e.predictor,
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0
        );
        rows.push(json!({
            "predictor": e.predictor,
            "next_1s": errors_json(&e.next_1s),
            "mean_5s": errors_json(&e.mean_5s),
            "latency_p50_us": p50 as f64 / 1000.0,
            "latency_p99_us": p99 as f64 / 1000.0,
        }));
    }
    let hm = evs
        .iter()
        .find(|e| e.predictor.starts_with("harmonic_mean"))
        .map(|e| e.mean_5s.mae());
    let ls = evs.last().map(|e| e.mean_5s.mae());
    let gain = match (hm, ls) {
        (Some(h), Some(l)) if h > 0.0 => Some((l / h - 1.0) * 100.0),
        _ => None,
    };
    if let Some(g) = gain {
        md += &format!(
            "\nLSTM MAE for the 5-s mean vs the harmonic mean: {g:+.1} % (target: -20 % or better). \
             Model load: {load_ms:.1} ms.\n"
        );
    }
    print!("{md}");
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    std::fs::write(a.output.join("pba.md"), &md)?;
    std::fs::write(a.output.join("pba-per-trace.csv"), per_trace_csv(&evs))?;
    let j = json!({
        "command": command,
        "model": model,
        "model_bytes": info.size,
        "model_window": info.window,
        "model_metadata": info.props.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<String, Value>>(),
        "model_load_ms": load_ms,
        "test_data": test,
        "traces": traces.len(),
        "positions": evs[0].next_1s.count(),
        "predictors": rows,
        "lstm_vs_harmonic_mean_mae_5s_pct": gain,
    });
    std::fs::write(a.output.join("pba.json"), serde_json::to_string_pretty(&j)?)?;
    println!(
        "results: {}  per trace: {}",
        a.output.join("pba.json").display(),
        a.output.join("pba-per-trace.csv").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_delta_sums_sessions() {
        let prev = json!({"sessions": [
            {"name": "a", "role": "initiator", "state": "running", "wire_out": 1000},
            {"name": "b", "role": "responder", "state": "running", "wire_in": 500}]});
        let now = json!({"sessions": [
            {"name": "a", "role": "initiator", "state": "running", "wire_out": 3000},
            {"name": "b", "role": "responder", "state": "done", "wire_in": 700},
            {"name": "c", "role": "initiator", "state": "running", "wire_out": 100}]});
        assert_eq!(wire_delta(&prev, &now), (2000 + 200 + 100, true));
        let idle = json!({"sessions": [{"name": "a", "role": "initiator", "state": "done", "wire_out": 3000}]});
        assert_eq!(wire_delta(&idle, &idle), (0, false));
    }

    #[test]
    fn deploy_model_replaces_atomically_and_refuses_bad_models() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dwcp-core/tests/data/pba");
        let dir = std::env::temp_dir().join(format!("dwcp-deploy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let args = |model: PathBuf, mode: &str| DeployArgs {
            model,
            mode: mode.into(),
            model_dir: dir.clone(),
        };
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pba/models/internet.onnx");
        let dest = deploy(args(shipped.clone(), "internet"), false).unwrap();
        assert_eq!(dest, dir.join("internet.onnx"));
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(&shipped).unwrap()
        );
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = ino(&dest);
        // a second deploy renames a new file over it
        deploy(args(data.join("tiny.onnx"), "internet"), false).unwrap();
        assert_ne!(ino(&dest), before);
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(data.join("tiny.onnx")).unwrap()
        );
        // bad models are refused before anything is written
        for bad in ["wrong-shape.onnx", "no-metadata.onnx", "missing.onnx"] {
            let e = deploy(args(data.join(bad), "internet"), false).unwrap_err();
            assert!(format!("{e:#}").contains(bad), "{e:#}");
        }
        let e = deploy(args(data.join("tiny.onnx"), "../x"), false).unwrap_err();
        assert!(e.to_string().contains("--mode"), "{e}");
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(data.join("tiny.onnx")).unwrap()
        );
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["internet.onnx".to_string()],
            "no temporary files left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn evaluate_refuses_a_bad_trace_with_file_and_line() {
        let dir = std::env::temp_dir().join(format!("dwcp-badtrace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("t1"), "0\t1.0\n1\t2.0\n2\toops\n").unwrap();
        let e = trace::load_traces(&dir).unwrap_err().to_string();
        assert!(e.ends_with("t1:3: not a number: \"2\\toops\""), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations_and_modes() {
        assert_eq!(parse_duration("300s").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("x").is_err());
        assert!(is_valid_mode("internet"));
        assert!(!is_valid_mode("../etc/x"));
        assert!(!is_valid_mode(""));
    }
}
