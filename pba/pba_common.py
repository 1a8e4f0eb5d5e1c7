"""Shared pieces of the PBA trainer and evaluator: trace loading, the window
normalisation (the same one dwcp-core/src/predict/ applies before it runs the
ONNX model), the simple predictors and the metrics.

A trace is one rate sample per line, Mbit/s, one line per interval (second):
`time_s<TAB>Mbit/s` (the FCC traces), or `time_s,mbit_s` (what
`dwcp pba collect-samples` writes, with that header line). Lines starting
with `#` and blank lines are skipped; any other line that does not parse is an
error naming file:line.
"""

import math
import os
import sys

import numpy as np

# Normalisation (format version 1), written into the ONNX file's
# metadata_props by train.py and read back by the Rust loader:
#   scale  = max(mean(window), SCALE_FLOOR)
#   x_i    = (ln(max(s_i, REL_FLOOR * scale) / scale) - mu) / sigma
#   output = [ln(next_1s / scale), ln(mean_5s / scale)]  ->  scale * exp(out)
SCALE_FLOOR = 1e-6
REL_FLOOR = 1e-3
OUT_CLAMP = 6.0


class TraceError(Exception):
    pass


def load_trace(path):
    vals = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if lineno == 1 and s.replace(" ", "") == "time_s,mbit_s":
                continue
            parts = s.split("\t") if "\t" in s else s.split(",") if "," in s else s.split()
            if len(parts) != 2:
                raise TraceError(f"{path}:{lineno}: expected 2 fields (time_s, Mbit/s), got {len(parts)}")
            try:
                v = float(parts[1])
                float(parts[0])
            except ValueError:
                raise TraceError(f"{path}:{lineno}: not a number: {s!r}") from None
            if not math.isfinite(v) or v < 0:
                raise TraceError(f"{path}:{lineno}: rate must be finite and >= 0, got {parts[1]}")
            vals.append(v)
    return np.asarray(vals, dtype=np.float64)


def trace_files(path):
    if os.path.isfile(path):
        return [path]
    names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if not files:
        raise TraceError(f"{path}: no trace files")
    return files


def load_dir(path):
    return [(os.path.basename(p), load_trace(p)) for p in trace_files(path)]


def windows(trace, n):
    """All positions t with a full window s[t-n+1..t] and 5 future samples:
    (raw windows [m, n], y1 [m], y5 [m])."""
    m = len(trace) - n - 4
    if m <= 0:
        return np.zeros((0, n)), np.zeros(0), np.zeros(0)
    idx = np.arange(m)[:, None] + np.arange(n)[None, :]
    w = trace[idx]
    y1 = trace[n : n + m]
    fut = trace[np.arange(m)[:, None] + n + np.arange(5)[None, :]]
    return w, y1, fut.mean(axis=1)


def normalise(w, mu, sigma):
    scale = np.maximum(w.mean(axis=1), SCALE_FLOOR)
    r = np.maximum(w, REL_FLOOR * scale[:, None]) / scale[:, None]
    return (np.log(r) - mu) / sigma, scale


# --- simple predictors (prediction = the same value for 1 s and 5-s mean) ---

def last_value(w):
    return w[:, -1]


def ewma(w, alpha=0.3):
    e = w[:, 0].copy()
    for i in range(1, w.shape[1]):
        e = alpha * w[:, i] + (1 - alpha) * e
    return e


def harmonic_mean(w, k=5):
    tail = w[:, -k:]
    # A zero sample makes the harmonic mean 0 (the rate was 0 in that second).
    with np.errstate(divide="ignore"):
        inv = np.where(tail > 0, 1.0 / np.maximum(tail, 1e-300), np.inf)
    s = inv.sum(axis=1)
    return np.where(np.isfinite(s), k / s, 0.0)


def metrics(pred, y):
    err = pred - y
    mae = float(np.mean(np.abs(err))) if len(y) else float("nan")
    rmse = float(math.sqrt(np.mean(err * err))) if len(y) else float("nan")
    sst = float(np.sum((y - y.mean()) ** 2)) if len(y) else 0.0
    r2 = 1.0 - float(np.sum(err * err)) / sst if sst > 0 else float("nan")
    return mae, rmse, r2


def eprint(*a):
    print(*a, file=sys.stderr, flush=True)
