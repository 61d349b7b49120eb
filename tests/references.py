"""Float64 NumPy references of the rectification family, written from the papers.

Each reference is a class with ``step(grads, params) -> updates`` over a *list*
of float64 arrays, following its paper's algorithm line by line (plus the
``eps`` placement documented in varjax: ``m_hat / (sqrt(v_hat) + eps)``). None
of them calls varjax. Updates are in Optax's convention: the direction before
the learning rate (``params -= lr * update``).
"""

from __future__ import annotations

import math

import numpy as np


class Adam:
    """Adam's moments (Kingma & Ba, 2015, Algorithm 1), optionally with AMSGrad's max."""

    def __init__(self, b1: float = 0.9, b2: float = 0.999, amsgrad: bool = False) -> None:
        self.b1, self.b2, self.amsgrad, self.t = b1, b2, amsgrad, 0
        self.m = self.v = self.v_max = None

    def moments(self, grads: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Advance one step; return (m_hat, v_hat), v_hat being the running max under AMSGrad."""
        if self.m is None:
            self.m = [np.zeros_like(g) for g in grads]
            self.v = [np.zeros_like(g) for g in grads]
            self.v_max = [np.zeros_like(g) for g in grads]
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        self.m = [b1 * m + (1 - b1) * g for m, g in zip(self.m, grads, strict=True)]
        self.v = [b2 * v + (1 - b2) * g * g for v, g in zip(self.v, grads, strict=True)]
        m_hat = [m / (1 - b1**t) for m in self.m]
        v_hat = [v / (1 - b2**t) for v in self.v]
        if self.amsgrad:
            self.v_max = [np.maximum(a, b) for a, b in zip(self.v_max, v_hat, strict=True)]
            v_hat = self.v_max
        return m_hat, v_hat

    def step(self, grads, params=None, eps: float = 1e-8):
        m_hat, v_hat = self.moments(grads)
        return [m / (np.sqrt(v) + eps) for m, v in zip(m_hat, v_hat, strict=True)]


def rectification_term(t: int, b2: float) -> tuple[float, float]:
    """(rho_t, r_t) of RAdam (Liu et al., 2020, Algorithm 2); r_t is nan where rho_t <= 4."""
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho <= 4:
        return rho, math.nan
    return rho, math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))


class RAdam(Adam):
    """Rectified Adam: r_t * Adam step when rho_t >= threshold, else the bias-corrected momentum."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-8, threshold=5.0, amsgrad=False) -> None:
        super().__init__(b1, b2, amsgrad)
        self.eps, self.threshold = eps, threshold

    def step(self, grads, params=None):
        m_hat, v_hat = self.moments(grads)
        rho, r = rectification_term(self.t, self.b2)
        if rho < self.threshold:
            return m_hat
        return [r * m / (np.sqrt(v) + self.eps) for m, v in zip(m_hat, v_hat, strict=True)]


class Rectify:
    """RAdam's rectification around another reference, with the three fallbacks."""

    def __init__(self, inner, b1=0.9, b2=0.999, threshold=5.0, fallback="momentum") -> None:
        self.inner, self.b1, self.b2, self.threshold, self.fallback = (
            inner,
            b1,
            b2,
            threshold,
            fallback,
        )
        self.t, self.m = 0, None

    def step(self, grads, params=None):
        inner = self.inner.step(grads, params)
        self.t += 1
        if self.m is None:
            self.m = [np.zeros_like(g) for g in grads]
        self.m = [self.b1 * m + (1 - self.b1) * g for m, g in zip(self.m, grads, strict=True)]
        rho, r = rectification_term(self.t, self.b2)
        if rho >= self.threshold:
            return [r * u for u in inner]
        if self.fallback == "momentum":
            return [m / (1 - self.b1**self.t) for m in self.m]
        return list(grads) if self.fallback == "sgd" else [np.zeros_like(g) for g in grads]


class Adopt:
    """ADOPT (Taniguchi et al., 2024, Algorithm 2 with clipping c_t = t^(1/4))."""

    def __init__(self, b1=0.9, b2=0.9999, eps=1e-6, clip_exponent=0.25) -> None:
        self.b1, self.b2, self.eps, self.clip_exponent = b1, b2, eps, clip_exponent
        self.t, self.m, self.v = 0, None, None

    def step(self, grads, params=None):
        if self.v is None:  # t = 0: v_0 = g_0^2, no parameter update
            self.v = [g * g for g in grads]
            self.m = [np.zeros_like(g) for g in grads]
            return [np.zeros_like(g) for g in grads]
        self.t += 1
        clip = self.t**self.clip_exponent if self.clip_exponent is not None else np.inf
        normed = [
            np.clip(g / np.maximum(np.sqrt(v), self.eps), -clip, clip)
            for g, v in zip(grads, self.v, strict=True)
        ]
        self.m = [self.b1 * m + (1 - self.b1) * n for m, n in zip(self.m, normed, strict=True)]
        self.v = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(self.v, grads, strict=True)]
        return list(self.m)


class Grams(Adam):
    """Grams (Cao et al., 2024): sign(g) * |Adam step|."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-8, amsgrad=False) -> None:
        super().__init__(b1, b2, amsgrad)
        self.eps = eps

    def step(self, grads, params=None):
        steps = super().step(grads, eps=self.eps)
        return [np.sign(g) * np.abs(u) for g, u in zip(grads, steps, strict=True)]


class DiffGrad(Adam):
    """diffGrad (Dubey et al., 2019): Adam step times sigmoid(|g_{t-1} - g_t|), g_0 = 0."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-8, amsgrad=False) -> None:
        super().__init__(b1, b2, amsgrad)
        self.eps, self.prev = eps, None

    def step(self, grads, params=None):
        prev = self.prev if self.prev is not None else [np.zeros_like(g) for g in grads]
        steps = super().step(grads, eps=self.eps)
        self.prev = [g.copy() for g in grads]
        friction = [1 / (1 + np.exp(-np.abs(p - g))) for p, g in zip(prev, grads, strict=True)]
        return [f * u for f, u in zip(friction, steps, strict=True)]


class AdamAtan2(Adam):
    """Adam-atan2 (Everett et al., 2024): a * atan2(m_hat, b * sqrt(v_hat))."""

    def __init__(self, b1=0.9, b2=0.999, a=1.27, b=1.0) -> None:
        super().__init__(b1, b2)
        self.a, self.b = a, b

    def step(self, grads, params=None):
        m_hat, v_hat = self.moments(grads)
        return [
            self.a * np.arctan2(m, self.b * np.sqrt(v)) for m, v in zip(m_hat, v_hat, strict=True)
        ]


def cosine(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    return abs(np.sum(x * y)) / (max(np.linalg.norm(x), eps) * max(np.linalg.norm(y), eps))


def adamp_projection(p, g, u, delta, eps):
    """AdamP (Heo et al., 2021, Algorithm 2): (projected step, projected?) for one weight.

    Channels are columns (the last axis); the channel test comes first, then the
    whole-layer test, as in the paper's code.
    """
    rows = p.reshape(-1, p.shape[-1])
    g_rows, u_rows = g.reshape(rows.shape), u.reshape(rows.shape).copy()
    channels = range(rows.shape[1])
    if max(cosine(g_rows[:, c], rows[:, c], eps) for c in channels) < delta / math.sqrt(
        rows.shape[0]
    ):
        for c in channels:
            unit = rows[:, c] / (np.linalg.norm(rows[:, c]) + eps)
            u_rows[:, c] -= unit * np.dot(unit, u_rows[:, c])
        return u_rows.reshape(u.shape), True
    if cosine(g, p, eps) < delta / math.sqrt(p.size):
        unit = p / (np.linalg.norm(p) + eps)
        return u - unit * np.sum(unit * u), True
    return u, False


class AdamP(Adam):
    """AdamP: Adam's step, projected for scale-invariant weights, with wd_ratio-scaled decay."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1):
        super().__init__(b1, b2)
        self.eps, self.weight_decay, self.delta, self.wd_ratio = eps, weight_decay, delta, wd_ratio
        self.projected: list[bool] = []

    def step(self, grads, params):
        steps = super().step(grads, eps=self.eps)
        out, self.projected = [], []
        for u, g, p in zip(steps, grads, params, strict=True):
            projected = False
            if p.ndim >= 2:
                u, projected = adamp_projection(p, g, u, self.delta, self.eps)
            self.projected.append(projected)
            out.append(u + self.weight_decay * (self.wd_ratio if projected else 1.0) * p)
        return out


class Cautious:
    """Cautious masking (Liang et al., 2024) of another reference's step."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def step(self, grads, params=None):
        out = []
        for u, g in zip(self.inner.step(grads, params), grads, strict=True):
            mask = (u * g > 0).astype(np.float64)
            out.append(u * mask * mask.size / (mask.sum() + 1))
        return out


def ademamix_alpha(t: int, alpha: float, warmup: int | None) -> float:
    """AdEMAMix's alpha warm-up (Pagliardini et al., 2024, Eq. for alpha_t), t 1-based."""
    return alpha if warmup is None else min(t * alpha / warmup, alpha)


def ademamix_beta3(t: int, b1: float, b3: float, warmup: int | None) -> float:
    """AdEMAMix's b3 warm-up, linear in half-life from b1 to b3, t 1-based."""
    if warmup is None:
        return b3
    frac = t / warmup
    return min(
        math.exp(math.log(b1) * math.log(b3) / ((1 - frac) * math.log(b3) + frac * math.log(b1))),
        b3,
    )


class MultiEMA:
    """K EMAs of the gradient, weighted and summed; decays/weights are functions of 1-based t."""

    def __init__(self, decays, weights, debias) -> None:
        self.decays, self.weights, self.debias = decays, weights, debias
        self.t, self.emas = 0, None

    def step(self, grads, params=None):
        self.t += 1
        if self.emas is None:
            self.emas = [[np.zeros_like(g) for g in grads] for _ in self.decays]
        out = [np.zeros_like(g) for g in grads]
        for k, (decay, weight, debias) in enumerate(
            zip(self.decays, self.weights, self.debias, strict=True)
        ):
            d, w = decay(self.t), weight(self.t)
            self.emas[k] = [d * m + (1 - d) * g for m, g in zip(self.emas[k], grads, strict=True)]
            for i, m in enumerate(self.emas[k]):
                out[i] = out[i] + w * (m / (1 - d**self.t) if debias else m)
        return out


class AdEMAMix:
    """AdEMAMix (Pagliardini et al., 2024, Algorithm 1), with the paper's schedulers."""

    def __init__(self, b1=0.9, b2=0.999, b3=0.9999, alpha=5.0, eps=1e-8, warmup=None) -> None:
        self.numerator = MultiEMA(
            [lambda t: b1, lambda t: ademamix_beta3(t, b1, b3, warmup)],
            [lambda t: 1.0, lambda t: ademamix_alpha(t, alpha, warmup)],
            [True, False],
        )
        self.b2, self.eps, self.t, self.v = b2, eps, 0, None

    def step(self, grads, params=None):
        self.t += 1
        if self.v is None:
            self.v = [np.zeros_like(g) for g in grads]
        self.v = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(self.v, grads, strict=True)]
        top = self.numerator.step(grads)
        return [
            n / (np.sqrt(v / (1 - self.b2**self.t)) + self.eps)
            for n, v in zip(top, self.v, strict=True)
        ]
