//! The ONNX bandwidth predictor: the committed model against the harmonic
//! mean on real test traces, bad model files, NaN output, reload on change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dwcp_core::predict::trace::{self, evaluate};
use dwcp_core::predict::{best_simple, HarmonicMean, Lstm, ModelFile, Predictor};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pba")
}

fn shipped_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pba/models/internet.onnx")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "dwcp-predict-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn shipped_model_beats_harmonic_mean_on_test_traces() {
    let m = Lstm::load(&shipped_model()).expect("the committed model loads");
    let info = m.info().clone();
    assert_eq!(info.window, trace::WARMUP);
    assert_eq!(info.mode.as_deref(), Some("internet"));
    assert!(info.size < 64 * 1024, "model is {} bytes", info.size);
    let traces = trace::load_traces(&data().join("traces")).unwrap();
    assert_eq!(traces.len(), 8);
    let mut lstm = m;
    let l = evaluate(&mut lstm, &traces, trace::WARMUP);
    let h = evaluate(&mut HarmonicMean::new(5), &traces, trace::WARMUP);
    assert_eq!(l.mean_5s.count(), h.mean_5s.count());
    assert!(l.mean_5s.count() > 1000);
    let gain = l.mean_5s.mae() / h.mean_5s.mae() - 1.0;
    eprintln!(
        "5-s mean MAE on {} positions: lstm {:.4}, harmonic mean {:.4} ({:+.1} %)",
        l.mean_5s.count(),
        l.mean_5s.mae(),
        h.mean_5s.mae(),
        gain * 100.0
    );
    assert!(
        gain < -0.10,
        "lstm only {:+.1} % vs harmonic mean",
        gain * 100.0
    );
    // Scale invariance: the same traces ×10 (a 100 Mbit/s-class path) give
    // the same relative errors.
    let x10: Vec<_> = traces
        .iter()
        .map(|t| trace::Trace {
            name: t.name.clone(),
            samples: t.samples.iter().map(|v| v * 10.0).collect(),
        })
        .collect();
    let l10 = evaluate(&mut lstm, &x10, trace::WARMUP);
    let rel = l10.mean_5s.mae() / (10.0 * l.mean_5s.mae());
    assert!((rel - 1.0).abs() < 0.01, "x10 MAE ratio {rel}");
}

#[test]
fn before_a_full_window_the_fallback_predicts() {
    let mut m = Lstm::load(&shipped_model()).unwrap();
    assert_eq!(m.predict(), None);
    let mut lv = best_simple();
    for v in [3.0, 4.0, 5.0] {
        m.observe(v);
        lv.observe(v);
    }
    assert_eq!(m.predict(), lv.predict());
    for _ in 0..10 {
        m.observe(5.0);
    }
    // A flat window: the model predicts about the same rate.
    let p = m.predict().unwrap();
    assert!((p.mean_5s - 5.0).abs() < 1.0, "{p:?}");
    assert!(p.next_1s.is_finite() && p.next_1s > 0.0);
}

fn load_err(p: &Path) -> String {
    let e = Lstm::load(p).expect_err("must be refused").to_string();
    assert!(
        e.contains(&p.display().to_string()),
        "the error names the file: {e}"
    );
    e
}

#[test]
fn bad_model_files_are_refused_with_the_reason() {
    let d = scratch("bad");
    let e = load_err(&d.join("missing.onnx"));
    assert!(e.contains("cannot read"), "{e}");
    let empty = d.join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    assert!(load_err(&empty).contains("empty file"));
    let corrupt = d.join("corrupt.onnx");
    std::fs::write(&corrupt, b"\x08\x07this is not protobuf\xff\xff\xff").unwrap();
    let e = load_err(&corrupt);
    assert!(e.contains("not an ONNX model"), "{e}");
    // a valid model cut short
    let bytes = std::fs::read(shipped_model()).unwrap();
    let cut = d.join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(load_err(&cut).contains("not an ONNX model"));
    let e = load_err(&data().join("no-metadata.onnx"));
    assert!(
        e.contains("metadata_props has no \"dwcp.pba.format\""),
        "{e}"
    );
    let e = load_err(&data().join("wrong-shape.onnx"));
    assert!(
        e.contains("input shape is [5, 1, 1], expected [10, 1, 1]"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn nan_output_falls_back_to_the_simple_predictor() {
    let mut m = Lstm::load(&data().join("nan-output.onnx")).expect("a NaN model still loads");
    let mut lv = best_simple();
    for i in 0..30 {
        let v = 1.0 + (i % 7) as f64;
        m.observe(v);
        lv.observe(v);
        let p = m.predict().unwrap();
        assert!(p.next_1s.is_finite() && p.mean_5s.is_finite());
        assert_eq!(Some(p), lv.predict());
    }
}

#[test]
fn model_file_reloads_when_replaced() {
    let d = scratch("reload");
    let path = d.join("internet.onnx");
    let mut mf = ModelFile::new(&path).with_check_interval(Duration::ZERO);
    assert_eq!(mf.name(), "ewma(0.9)");
    for v in [2.0, 4.0] {
        mf.observe(v);
    }
    let p = mf.predict_next_1s().unwrap();
    assert!((p - 3.8).abs() < 1e-12, "{p}");
    // deployed: temporary file renamed over the path
    let tmp = d.join(".internet.onnx.tmp");
    std::fs::copy(shipped_model(), &tmp).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    mf.observe(4.0);
    assert_eq!(mf.name(), "lstm");
    assert!(mf.model().is_some());
    // the history was replayed: a full window after 10 samples in all
    for _ in 0..7 {
        mf.observe(4.0);
    }
    let p = mf.predict().unwrap();
    assert!((p.mean_5s - 4.0).abs() < 1.0, "{p:?}");
    // replaced by a corrupt file: the loaded model stays
    std::fs::write(&tmp, b"garbage").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    mf.observe(4.0);
    assert_eq!(mf.name(), "lstm");
    assert!(mf.predict().unwrap().mean_5s.is_finite());
    // replaced by another valid model: that one is used
    std::fs::copy(data().join("tiny.onnx"), &tmp).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    mf.observe(4.0);
    assert_eq!(mf.model().unwrap().info().mode.as_deref(), Some("test"));
    std::fs::remove_dir_all(&d).unwrap();
}
