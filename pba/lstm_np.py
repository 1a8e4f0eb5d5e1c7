"""A one-layer LSTM with a linear head, forward and backward in numpy.

Gate layout follows the ONNX LSTM operator (i, o, f, c), so the weights are
exported as they are: W [4H, 1], R [4H, H], B = [Wb, Rb] (Rb = 0).
"""

import numpy as np


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class Lstm:
    def __init__(self, hidden, n_in=1, n_out=2, seed=0):
        rng = np.random.default_rng(seed)
        h = hidden
        k = 1.0 / np.sqrt(h)
        self.H = h
        self.p = {
            "W": rng.uniform(-k, k, (4 * h, n_in)),
            "R": rng.uniform(-k, k, (4 * h, h)),
            "b": np.zeros(4 * h),
            "Wd": rng.uniform(-k, k, (h, n_out)) * 0.1,
            "bd": np.zeros(n_out),
        }
        # forget-gate bias 1 (gate order i, o, f, c)
        self.p["b"][2 * h : 3 * h] = 1.0

    def forward(self, x, keep=False):
        """x: [B, T, n_in] -> out [B, n_out]."""
        p, H = self.p, self.H
        B, T, _ = x.shape
        h = np.zeros((B, H))
        c = np.zeros((B, H))
        cache = []
        for t in range(T):
            z = x[:, t, :] @ p["W"].T + h @ p["R"].T + p["b"]
            i = sigmoid(z[:, :H])
            o = sigmoid(z[:, H : 2 * H])
            f = sigmoid(z[:, 2 * H : 3 * H])
            g = np.tanh(z[:, 3 * H :])
            c_new = f * c + i * g
            tc = np.tanh(c_new)
            h_new = o * tc
            if keep:
                cache.append((x[:, t, :], h, c, i, o, f, g, tc))
            h, c = h_new, c_new
        out = h @ p["Wd"] + p["bd"]
        if keep:
            self._cache = (cache, h)
        return out

    def backward(self, dout):
        p, H = self.p, self.H
        cache, hT = self._cache
        g_ = {k: np.zeros_like(v) for k, v in p.items()}
        g_["Wd"] = hT.T @ dout
        g_["bd"] = dout.sum(axis=0)
        dh = dout @ p["Wd"].T
        dc = np.zeros_like(dh)
        for xt, h_prev, c_prev, i, o, f, g, tc in reversed(cache):
            do = dh * tc
            dc = dc + dh * o * (1 - tc * tc)
            di = dc * g
            dg = dc * i
            df = dc * c_prev
            dz = np.concatenate(
                [di * i * (1 - i), do * o * (1 - o), df * f * (1 - f), dg * (1 - g * g)], axis=1
            )
            g_["W"] += dz.T @ xt
            g_["R"] += dz.T @ h_prev
            g_["b"] += dz.sum(axis=0)
            dh = dz @ p["R"]
            dc = dc * f
        return g_


class Adam:
    def __init__(self, params, lr=3e-3, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads, clip=1.0):
        norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
        s = clip / norm if norm > clip else 1.0
        self.t += 1
        for k in params:
            g = grads[k] * s
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            mh = self.m[k] / (1 - self.b1**self.t)
            vh = self.v[k] / (1 - self.b2**self.t)
            params[k] -= self.lr * mh / (np.sqrt(vh) + self.eps)
