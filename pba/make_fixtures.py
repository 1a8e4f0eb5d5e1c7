#!/usr/bin/env python3
"""The bad model files dwcp-core's tests load (committed under
dwcp-core/tests/data/pba/): each must be refused, or fall back, with a
clear message.

    python3 pba/make_fixtures.py dwcp-core/tests/data/pba
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lstm_np import Lstm  # noqa: E402
from train import export_onnx  # noqa: E402


def main(out):
    import onnx

    os.makedirs(out, exist_ok=True)
    m = Lstm(4, seed=3)
    # NaN output: the head's bias is NaN (valid graph, valid metadata).
    m.p["bd"][:] = np.nan
    export_onnx(m, 10, 0.0, 1.0, os.path.join(out, "nan-output.onnx"), {"dwcp.pba.mode": "test"})
    m.p["bd"][:] = 0.0
    # Wrong shape: metadata says window 10, the graph takes [5, 1, 1].
    export_onnx(m, 5, 0.0, 1.0, os.path.join(out, "wrong-shape.onnx"), {"dwcp.pba.window": "10"})
    # No normalisation metadata.
    p = os.path.join(out, "no-metadata.onnx")
    export_onnx(m, 10, 0.0, 1.0, p, {})
    model = onnx.load(p)
    del model.metadata_props[:]
    onnx.save(model, p)
    # A small valid model (window 10, hidden 4): deploy-model and reload tests.
    export_onnx(m, 10, 0.0, 1.0, os.path.join(out, "tiny.onnx"), {"dwcp.pba.mode": "test"})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dwcp-core/tests/data/pba")
