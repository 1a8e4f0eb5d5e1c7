#!/usr/bin/env python3
"""Train the PBA bandwidth predictor (one-layer LSTM) and export it to ONNX.

Trains on --train, keeps the epoch with the lowest 5-s-mean MAE on --valid
(early stopping: the tuning split), then reports on --test (never used for
a choice) against the simple predictors. numpy only for the training (hand-
written BPTT + Adam); the ONNX graph is built with onnx.helper.

The model's input is the last WINDOW samples, normalised per window (see
pba_common.py; the parameters go into the ONNX file's metadata_props, keys
dwcp.pba.*); its two outputs are the log-ratios of the next second's rate
and of the next 5 s' mean rate to the window's mean.

    python3 pba/train.py --train T --valid V --test X --output pba/models/internet.onnx
    python3 pba/train.py --input samples.csv --output model.onnx   # one collected series
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lstm_np import Adam, Lstm  # noqa: E402
import pba_common as pc  # noqa: E402

FORMAT_VERSION = "1"


def build_xy(traces, n):
    ws, y1s, y5s = [], [], []
    for _, tr in traces:
        w, y1, y5 = pc.windows(tr, n)
        ws.append(w)
        y1s.append(y1)
        y5s.append(y5)
    return np.concatenate(ws), np.concatenate(y1s), np.concatenate(y5s)


def lstm_predict(model, w, mu, sigma, batch=8192):
    out1, out5 = [], []
    for s in range(0, len(w), batch):
        x, scale = pc.normalise(w[s : s + batch], mu, sigma)
        o = np.clip(model.forward(x[:, :, None]), -pc.OUT_CLAMP, pc.OUT_CLAMP)
        out1.append(scale * np.exp(o[:, 0]))
        out5.append(scale * np.exp(o[:, 1]))
    return np.concatenate(out1), np.concatenate(out5)


def export_onnx(model, n, mu, sigma, path, meta):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    H = model.H
    p = model.p
    W = p["W"].astype(np.float32)[None]  # [1, 4H, 1]
    R = p["R"].astype(np.float32)[None]  # [1, 4H, H]
    B = np.concatenate([p["b"], np.zeros(4 * H)]).astype(np.float32)[None]  # [1, 8H]
    inits = [
        numpy_helper.from_array(W, "W"),
        numpy_helper.from_array(R, "R"),
        numpy_helper.from_array(B, "B"),
        numpy_helper.from_array(p["Wd"].astype(np.float32), "Wd"),
        numpy_helper.from_array(p["bd"].astype(np.float32), "bd"),
        numpy_helper.from_array(np.array([1, H], dtype=np.int64), "hshape"),
    ]
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Y_h"], hidden_size=H, name="lstm"),
        helper.make_node("Reshape", ["Y_h", "hshape"], ["h"], name="flatten"),
        helper.make_node("Gemm", ["h", "Wd", "bd"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "dwcp_pba_lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], producer_name="dwcp-pba")
    m.ir_version = 8
    props = {
        "dwcp.pba.format": FORMAT_VERSION,
        "dwcp.pba.window": str(n),
        "dwcp.pba.mu": repr(float(mu)),
        "dwcp.pba.sigma": repr(float(sigma)),
        "dwcp.pba.scale_floor": repr(pc.SCALE_FLOOR),
        "dwcp.pba.rel_floor": repr(pc.REL_FLOOR),
        "dwcp.pba.out_clamp": repr(pc.OUT_CLAMP),
        "dwcp.pba.outputs": "ln_next_1s_over_scale,ln_mean_5s_over_scale",
    }
    props.update(meta)
    helper.set_model_props(m, props)
    onnx.checker.check_model(m)
    tmp = path + ".tmp"
    onnx.save(m, tmp)
    os.replace(tmp, path)
    return m


def check_onnx(m, model, n, mu, sigma, w):
    """The exported graph computes what the numpy model computes."""
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(m)
    x, _ = pc.normalise(w, mu, sigma)
    ref = model.forward(x[:, :, None])
    worst = 0.0
    for k in range(len(w)):
        got = ev.run(None, {"x": x[k].astype(np.float32).reshape(n, 1, 1)})[0]
        worst = max(worst, float(np.max(np.abs(got[0] - ref[k]))))
    return worst


def split_series(traces, frac=0.8):
    tr, va = [], []
    for name, s in traces:
        k = int(len(s) * frac)
        tr.append((name, s[:k]))
        va.append((name, s[k:]))
    return tr, va


def report(traces, n, model, mu, sigma, alpha, per_trace_csv):
    """Table rows (predictor, target, MAE, RMSE, R2) over all positions, and
    the per-trace CSV."""
    preds = {}
    ws, y1, y5 = build_xy(traces, n)
    l1, l5 = lstm_predict(model, ws, mu, sigma)
    simple = {
        "last_value": pc.last_value(ws),
        f"ewma({alpha:g})": pc.ewma(ws, alpha),
        "harmonic_mean(5)": pc.harmonic_mean(ws),
    }
    for k, v in simple.items():
        preds[k] = (v, v)
    preds["lstm"] = (l1, l5)
    rows = []
    for name, (p1, p5) in preds.items():
        rows.append((name, "next_1s") + pc.metrics(p1, y1))
        rows.append((name, "mean_5s") + pc.metrics(p5, y5))
    if per_trace_csv:
        with open(per_trace_csv, "w") as f:
            f.write("trace,samples,predictor,target,mae,rmse,r2\n")
            for tname, tr in traces:
                w, t1, t5 = pc.windows(tr, n)
                if len(w) == 0:
                    continue
                q1, q5 = lstm_predict(model, w, mu, sigma)
                sp = {
                    "last_value": pc.last_value(w),
                    f"ewma({alpha:g})": pc.ewma(w, alpha),
                    "harmonic_mean(5)": pc.harmonic_mean(w),
                }
                per = {k: (v, v) for k, v in sp.items()}
                per["lstm"] = (q1, q5)
                for pn, (a1, a5) in per.items():
                    for tg, a, y in (("next_1s", a1, t1), ("mean_5s", a5, t5)):
                        mae, rmse, r2 = pc.metrics(a, y)
                        f.write(f"{tname},{len(w)},{pn},{tg},{mae:.6f},{rmse:.6f},{r2:.6f}\n")
    return rows, len(y1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", help="directory (or file) of training traces")
    ap.add_argument("--valid", help="directory of validation traces (early stopping)")
    ap.add_argument("--test", help="directory of test traces (report only)")
    ap.add_argument("--input", nargs="+", help="collected series (dwcp pba collect-samples); "
                    "each split 80/20 in time into train/valid")
    ap.add_argument("--output", required=True, help="the ONNX file to write")
    ap.add_argument("--mode", default="internet", help="the mode this model is for (metadata)")
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ewma-alpha", type=float, default=0.9,
                    help="EWMA weight in the report (0.9: best 5-s MAE on the FCC valid split)")
    ap.add_argument("--report-dir", help="write report.json, report.md and per_trace.csv here")
    a = ap.parse_args()

    try:
        if a.input:
            series = [(os.path.basename(p), pc.load_trace(p)) for p in a.input]
            train, valid = split_series(series)
        else:
            if not (a.train and a.valid):
                ap.error("give --train and --valid, or --input")
            train, valid = pc.load_dir(a.train), pc.load_dir(a.valid)
        test = pc.load_dir(a.test) if a.test else None
    except (pc.TraceError, OSError) as e:
        pc.eprint(f"error: {e}")
        return 2

    n = a.window
    wtr, y1tr, y5tr = build_xy(train, n)
    wva, y1va, y5va = build_xy(valid, n)
    if len(wtr) < 50 or len(wva) < 10:
        pc.eprint(f"error: too few samples: {len(wtr)} training and {len(wva)} validation windows "
                  f"(window {n} + 5); collect a longer series")
        return 2
    # mu/sigma of the per-window log-ratios on the training split
    lr_tr = np.log(np.maximum(wtr, pc.REL_FLOOR * np.maximum(wtr.mean(1), pc.SCALE_FLOOR)[:, None])
                   / np.maximum(wtr.mean(1), pc.SCALE_FLOOR)[:, None])
    mu, sigma = float(lr_tr.mean()), float(max(lr_tr.std(), 1e-3))
    xtr, str_ = pc.normalise(wtr, mu, sigma)
    xtr = xtr[:, :, None]

    rng = np.random.default_rng(a.seed)
    model = Lstm(a.hidden, seed=a.seed)
    opt = Adam(model.p, lr=a.lr)
    hm_va = pc.harmonic_mean(wva)
    hm_mae5 = pc.metrics(hm_va, y5va)[0]
    pc.eprint(f"train windows {len(wtr)}, valid {len(wva)}; window {n}, hidden {a.hidden}, "
              f"seed {a.seed}; harmonic-mean 5-s MAE on valid {hm_mae5:.4f}")
    scan = ", ".join(f"{al:.1f}: {pc.metrics(pc.ewma(wva, al), y5va)[0]:.4f}"
                     for al in np.arange(1, 11) / 10)
    pc.eprint(f"EWMA 5-s MAE on valid by alpha: {scan}")
    best = (float("inf"), None, -1)
    t0 = time.time()
    for ep in range(a.epochs):
        if ep == int(a.epochs * 0.7):
            opt.lr *= 0.3
        perm = rng.permutation(len(xtr))
        tot = 0.0
        for s in range(0, len(perm), a.batch):
            idx = perm[s : s + a.batch]
            out = model.forward(xtr[idx], keep=True)
            o = np.clip(out, -pc.OUT_CLAMP, pc.OUT_CLAMP)
            sc = str_[idx]
            p1 = sc * np.exp(o[:, 0])
            p5 = sc * np.exp(o[:, 1])
            e1 = p1 - y1tr[idx]
            e5 = p5 - y5tr[idx]
            tot += float(np.abs(e1).sum() + np.abs(e5).sum())
            inside = (np.abs(out) < pc.OUT_CLAMP).astype(float)
            d = np.stack([np.sign(e1) * p1, np.sign(e5) * p5], axis=1) * inside / len(idx)
            grads = model.backward(d)
            opt.step(model.p, grads)
        v1, v5 = lstm_predict(model, wva, mu, sigma)
        m1, m5 = pc.metrics(v1, y1va)[0], pc.metrics(v5, y5va)[0]
        mark = ""
        if m5 < best[0]:
            best = (m5, {k: v.copy() for k, v in model.p.items()}, ep)
            mark = " *"
        pc.eprint(f"epoch {ep + 1:3d}  train loss {tot / len(xtr):.4f}  valid MAE 1s {m1:.4f} "
                  f"5s {m5:.4f} ({(m5 / hm_mae5 - 1) * 100:+.1f} % vs HM){mark}  [{time.time() - t0:.0f} s]")
    model.p = best[1]
    pc.eprint(f"best epoch {best[2] + 1}: valid 5-s MAE {best[0]:.4f}")

    meta = {
        "dwcp.pba.mode": a.mode,
        "dwcp.pba.hidden": str(a.hidden),
        "dwcp.pba.seed": str(a.seed),
        "dwcp.pba.epochs": f"{best[2] + 1} of {a.epochs}",
        "dwcp.pba.valid_mae_5s": f"{best[0]:.4f}",
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    m = export_onnx(model, n, mu, sigma, a.output, meta)
    worst = check_onnx(m, model, n, mu, sigma, wva[:: max(1, len(wva) // 20)][:20])
    pc.eprint(f"wrote {a.output} ({os.path.getsize(a.output)} bytes); ONNX reference vs numpy: "
              f"max |diff| {worst:.2e}")
    if worst > 1e-3:
        pc.eprint("error: the exported graph does not match the trained model")
        return 1

    if test is not None:
        csv = os.path.join(a.report_dir, "per_trace.csv") if a.report_dir else None
        if a.report_dir:
            os.makedirs(a.report_dir, exist_ok=True)
        rows, npos = report(test, n, model, mu, sigma, a.ewma_alpha, csv)
        lines = [f"test split: {len(test)} traces, {npos} positions (window {n})", "",
                 "| predictor | target | MAE (Mbit/s) | RMSE | R² |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} |")
        hm5 = [r for r in rows if r[0] == "harmonic_mean(5)" and r[1] == "mean_5s"][0][2]
        ls5 = [r for r in rows if r[0] == "lstm" and r[1] == "mean_5s"][0][2]
        lines += ["", f"LSTM 5-s-mean MAE vs harmonic mean: {(ls5 / hm5 - 1) * 100:+.1f} %"]
        print("\n".join(lines))
        if a.report_dir:
            with open(os.path.join(a.report_dir, "report.md"), "w") as f:
                f.write("\n".join(lines) + "\n")
            with open(os.path.join(a.report_dir, "report.json"), "w") as f:
                json.dump({"traces": len(test), "positions": npos, "window": n,
                           "rows": [dict(zip(("predictor", "target", "mae", "rmse", "r2"), r)) for r in rows]},
                          f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
