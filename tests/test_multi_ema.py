"""Correctness of the multi-EMA family against float64 references and peers.

- References (``tests/references.py``): AdEMAMix with and without the paper's
  alpha / b3 warm-ups, a general three-EMA combination with a scheduled decay.
- Optax: ``varjax.ademamix`` against ``optax.contrib.ademamix`` run in float64;
  ``scale_by_second_moment(multi_ema(b1))`` against ``optax.scale_by_adam``.
- pytorch-optimizer ``AdEMAMix`` (with ``t_alpha_beta3``) in float64; it evaluates
  the schedulers at the 1-based step like the paper and varjax's schedules, and
  its weight decay is coupled unless ``weight_decouple=True``.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer as po
import references as ref
import torch
from test_rectification import (
    assert_sequences_close,
    gradient_sequence,
    initial_params,
    run_block,
    run_optimizer,
    run_reference,
    run_torch,
)

import varjax


@pytest.mark.parametrize("warmup", [None, 40])
def test_ademamix_matches_float64_reference(warmup) -> None:
    grads, params = gradient_sequence(), initial_params()
    if warmup is None:
        block = varjax.scale_by_ademamix(alpha=8.0)
    else:
        block = varjax.scale_by_ademamix(
            b3=varjax.ademamix_beta3_schedule(0.9999, warmup, b1=0.9),
            alpha=varjax.ademamix_alpha_schedule(8.0, warmup),
        )
    expected = run_reference(ref.AdEMAMix(alpha=8.0, warmup=warmup), grads, params)
    # a scheduled b3 near 1 arrives as a float32 array: 1 - b3(t) carries up to ~6e-4
    # relative error, which shows where m1_hat and alpha * m2 nearly cancel (22 EPS32
    # of the largest step with the warm-up, under 1 without)
    ulps = 8 if warmup is None else 64
    assert_sequences_close(run_block(block, grads, params), expected, rtol=2e-5, ulps=ulps)


def test_schedulers_match_the_paper() -> None:
    alpha = varjax.ademamix_alpha_schedule(5.0, 100)
    b3 = varjax.ademamix_beta3_schedule(0.9999, 100, b1=0.9)
    for count in (0, 1, 10, 50, 99, 100, 1000):
        t = count + 1  # Optax counts from 0, the paper's t from 1
        assert float(alpha(count)) == pytest.approx(ref.ademamix_alpha(t, 5.0, 100), rel=1e-6)
        assert float(b3(count)) == pytest.approx(ref.ademamix_beta3(t, 0.9, 0.9999, 100), rel=1e-6)
    # the half-life ln(1/2) / ln(b3(t)) moves linearly from b1's to b3's
    half_life = [math.log(0.5) / math.log(float(b3(t - 1))) for t in (25, 50, 75)]
    h1, h3 = math.log(0.5) / math.log(0.9), math.log(0.5) / math.log(0.9999)
    for t, h in zip((25, 50, 75), half_life, strict=True):
        assert h == pytest.approx((1 - t / 100) * h1 + t / 100 * h3, rel=1e-3)
    assert float(b3(99)) == pytest.approx(0.9999, rel=1e-7)


def test_beta3_schedule_rejects_swapped_decays() -> None:
    """b1 and b3 swapped gave a constant 0.9 before; the start must be below the end."""
    with pytest.raises(ValueError, match=r"needs b1 < b3, got b1=0.9999 and b3=0.9"):
        varjax.ademamix_beta3_schedule(0.9, 100, b1=0.9999)
    with pytest.raises(ValueError, match="b1 < b3"):
        varjax.ademamix_beta3_schedule(0.9, 100, b1=0.9)  # equal: no warm-up at all
    with pytest.raises(ValueError, match="b1 < b3"):
        varjax.ademamix(1e-3, b1=0.9, b3=0.8, b3_warmup_steps=100)
    # the order of the old signature (b1, b3, warmup_steps) fails loudly, not silently
    with pytest.raises(TypeError):
        varjax.ademamix_beta3_schedule(0.9, 0.9999, 100)
    with pytest.raises(ValueError, match="warmup_steps"):
        varjax.ademamix_beta3_schedule(0.9, 0.9999)
    # keywords of the old signature still work, and both schedules share the order
    old = varjax.ademamix_beta3_schedule(b1=0.9, b3=0.9999, warmup_steps=100)
    new = varjax.ademamix_beta3_schedule(0.9999, 100)  # b1 defaults to 0.9
    assert float(old(10)) == float(new(10)) < 0.9999
    assert list(inspect.signature(varjax.ademamix_alpha_schedule).parameters)[:2] == [
        "alpha",
        "warmup_steps",
    ]
    assert list(inspect.signature(varjax.ademamix_beta3_schedule).parameters)[:2] == [
        "b3",
        "warmup_steps",
    ]


def test_general_multi_ema_matches_reference() -> None:
    grads, params = gradient_sequence(), initial_params()
    decay_schedule = optax.linear_schedule(0.5, 0.99, 30)
    block = varjax.multi_ema(
        decays=(0.9, decay_schedule, 0.999), weights=(1.0, -0.5, 3.0), debias=(True, True, False)
    )
    reference = ref.MultiEMA(
        [lambda t: 0.9, lambda t: float(decay_schedule(t - 1)), lambda t: 0.999],
        [lambda t: 1.0, lambda t: -0.5, lambda t: 3.0],
        [True, True, False],
    )
    expected = run_reference(reference, grads, params)
    assert_sequences_close(run_block(block, grads, params), expected, rtol=1e-4, ulps=8)


def test_second_moment_around_one_ema_is_adam() -> None:
    grads, params = gradient_sequence(), initial_params()
    adam_like = varjax.scale_by_second_moment(varjax.multi_ema((0.9,), (1.0,), (True,)))
    with jax.enable_x64(True):
        expected = run_block(optax.scale_by_adam(), grads, params, jnp.float64)
    assert_sequences_close(run_block(adam_like, grads, params), expected, rtol=2e-5, ulps=8)


def test_ademamix_matches_optax() -> None:
    grads, params = gradient_sequence(), initial_params()
    ours = run_optimizer(varjax.ademamix(0.01, alpha=8.0, weight_decay=0.1), grads, params)
    with jax.enable_x64(True):
        theirs = run_optimizer(
            optax.contrib.ademamix(0.01, alpha=8.0, weight_decay=0.1), grads, params, jnp.float64
        )
    assert_sequences_close(ours, theirs, rtol=1e-5, ulps=8)


@pytest.mark.parametrize("warmup", [None, 30])
def test_ademamix_matches_pytorch_optimizer(warmup) -> None:
    shapes = [(7, 5), (13,), (1,)]
    grads, params = gradient_sequence(shapes=shapes), initial_params(shapes=shapes)
    kwargs = {"lr": 0.01, "alpha": 8.0, "t_alpha_beta3": warmup, "weight_decay": 0.05}
    theirs = run_torch(
        po.AdEMAMix, {**kwargs, "weight_decouple": True, "foreach": False}, grads, params
    )
    with jax.enable_x64(True):
        tx = varjax.ademamix(
            0.01, alpha=8.0, alpha_warmup_steps=warmup, b3_warmup_steps=warmup, weight_decay=0.05
        )
        ours = run_optimizer(tx, grads, params, jnp.float64)
    assert_sequences_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError, match="one length"):
        varjax.multi_ema((0.9, 0.99), (1.0,), (True, False))
    with pytest.raises(ValueError, match=r"decays\[1\]"):
        varjax.multi_ema((0.9, 1.0), (1.0, 1.0), (True, False))


def test_rectified_ademamix_matches_reference() -> None:
    """RAdam's rectification around AdEMAMix (its b2 is the rectified second moment)."""
    grads, params = gradient_sequence(), initial_params()
    block = varjax.rectify(varjax.scale_by_ademamix(alpha=8.0), b2=0.999)
    expected = run_reference(ref.Rectify(ref.AdEMAMix(alpha=8.0), b2=0.999), grads, params)
    assert_sequences_close(run_block(block, grads, params), expected, rtol=2e-5, ulps=8)


class SimplifiedAdEMAMix:
    """Morwani et al., 2025: m = b1 m + g; (m + alpha g) / (sqrt(nu_hat) + eps)."""

    def __init__(self, b1=0.99, b2=0.95, alpha=2.0, eps=1e-8) -> None:
        self.adam = ref.Adam(b1=0.0, b2=b2)  # for nu_hat only
        self.b1, self.alpha, self.eps, self.m = b1, alpha, eps, None

    def step(self, grads, params=None):
        self.m = [
            g + self.b1 * m for m, g in zip(self.m or [0.0 * g for g in grads], grads, strict=True)
        ]
        _, nu_hat = self.adam.moments(grads)
        return [
            (m + self.alpha * g) / (np.sqrt(v) + self.eps)
            for m, g, v in zip(self.m, grads, nu_hat, strict=True)
        ]


def test_simplified_ademamix_matches_reference_and_optax() -> None:
    grads, params = gradient_sequence(), initial_params()
    expected = run_reference(SimplifiedAdEMAMix(alpha=2.0), grads, params)
    block = varjax.scale_by_simplified_ademamix(alpha=2.0)
    assert_sequences_close(run_block(block, grads, params), expected, rtol=2e-5, ulps=8)
    ours = run_optimizer(
        varjax.simplified_ademamix(1e-3, alpha=2.0, weight_decay=0.1), grads, params
    )
    with jax.enable_x64(True):
        tx = optax.contrib.simplified_ademamix(1e-3, alpha=2.0, weight_decay=0.1)
        theirs = run_optimizer(tx, grads, params, jnp.float64)
    assert_sequences_close(ours, theirs, rtol=1e-5, ulps=8)


def test_simplified_ademamix_state_is_optax_size() -> None:
    """One momentum, one second moment and one count, as Optax's (65,540 B for 8,192
    float32 parameters; 98,312 B before, with a decay-0 EMA and a second count)."""
    params = {"w": jnp.zeros(8192), "b": jnp.zeros((3, 5), jnp.bfloat16)}
    ours = varjax.simplified_ademamix(1e-3).init(params)
    theirs = optax.contrib.simplified_ademamix(1e-3).init(params)
    assert varjax.state_bytes(ours) == varjax.state_bytes(theirs) == 4 + 2 * (4 * 8192 + 2 * 15)


def test_simplified_ademamix_matches_pytorch_optimizer() -> None:
    shapes = [(7, 5), (13,), (1,)]
    grads, params = gradient_sequence(shapes=shapes), initial_params(shapes=shapes)
    kwargs = {"lr": 1e-3, "alpha": 2.0, "foreach": False}
    theirs = run_torch(po.SimplifiedAdEMAMix, kwargs, grads, params)
    # Two convention differences, both mapped here:
    # - pytorch-optimizer keeps an EMA, (1 - b1) times the paper's sum m = b1 m + g:
    #   its (ema + alpha g) is (1 - b1) (m + alpha / (1 - b1) g);
    # - it divides by the second moment's bias correction twice, so its step is
    #   ours (Optax's, the paper's) divided by 1 - b2^t: a per-step learning rate.
    b1, b2 = 0.99, 0.95

    def rate(count):
        return 1e-3 * (1 - b1) / (1 - b2 ** (count + 1))

    with jax.enable_x64(True):
        ours = run_optimizer(
            varjax.simplified_ademamix(rate, b1, b2, alpha=2.0 / (1 - b1)),
            grads,
            params,
            jnp.float64,
        )
    assert_sequences_close(ours, theirs, rtol=1e-6, atol=1e-9)


# g + lamb * (an EMA or a window mean of g): 2-3 roundings relative to each element
# (rtol 2e-6, 17 EPS32), and the state's where g and lamb * mu cancel (measured 0.3
# EPS32 beyond rtol with AVX-512; 8 covers the FMA-free SSE4.2 code, which failed 1e-6)
GROKFAST_TOLERANCE = {"rtol": 2e-6, "ulps": 8}


class GrokfastEMA:
    """Lee et al., 2024, Algorithm 2: mu_1 = g_1, mu = alpha mu + (1 - alpha) g; g + lamb mu."""

    def __init__(self, alpha=0.98, lamb=2.0) -> None:
        self.alpha, self.lamb, self.mu = alpha, lamb, None

    def step(self, grads, params=None):
        if self.mu is None:
            self.mu = [g.copy() for g in grads]
        else:
            self.mu = [
                self.alpha * m + (1 - self.alpha) * g for m, g in zip(self.mu, grads, strict=True)
            ]
        return [g + self.lamb * m for g, m in zip(grads, self.mu, strict=True)]


class GrokfastMA:
    """Lee et al., 2024, Algorithm 1: g + lamb * mean of the last w gradients (once w are seen)."""

    def __init__(self, window=100, lamb=5.0, warmup=True) -> None:
        self.window, self.lamb, self.warmup, self.history = window, lamb, warmup, []

    def step(self, grads, params=None):
        self.history = [*self.history, grads][-self.window :]
        if self.warmup and len(self.history) < self.window:
            return list(grads)
        means = [np.mean(leaves, axis=0) for leaves in zip(*self.history, strict=True)]
        return [g + self.lamb * m for g, m in zip(grads, means, strict=True)]


@pytest.mark.parametrize(
    ("block", "reference"),
    [
        (lambda: varjax.grokfast_ema(), lambda: GrokfastEMA()),
        (lambda: varjax.grokfast_ma(window=7), lambda: GrokfastMA(window=7)),
        (
            lambda: varjax.grokfast_ma(window=7, warmup=False),
            lambda: GrokfastMA(window=7, warmup=False),
        ),
    ],
    ids=["ema", "ma", "ma_no_warmup"],
)
def test_grokfast_matches_reference(block, reference) -> None:
    grads, params = gradient_sequence(), initial_params()
    expected = run_reference(reference(), grads, params)
    assert_sequences_close(run_block(block(), grads, params), expected, **GROKFAST_TOLERANCE)


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_grokfast_matches_pytorch_optimizer(kind: str) -> None:
    from pytorch_optimizer.optimizer.grokfast import gradfilter_ema, gradfilter_ma

    shapes = [(7, 5), (13,)]
    grads, params = gradient_sequence(shapes=shapes), initial_params(shapes=shapes)
    model = torch.nn.Module()
    model.w, model.b = (torch.nn.Parameter(torch.tensor(p)) for p in params)
    if kind == "ema":
        ours, theirs_filter = (
            varjax.grokfast_ema(alpha=0.9, lamb=1.5),
            lambda m, s: gradfilter_ema(m, s, alpha=0.9, lamb=1.5),
        )
    else:
        ours, theirs_filter = (
            varjax.grokfast_ma(window=5, lamb=3.0),
            lambda m, s: gradfilter_ma(m, s, window_size=5, lamb=3.0),
        )
    theirs, filter_state = [], None
    for g in grads:
        model.w.grad, model.b.grad = (torch.tensor(x) for x in g)
        filter_state = theirs_filter(model, filter_state)
        theirs.append([model.w.grad.numpy().copy(), model.b.grad.numpy().copy()])
    with jax.enable_x64(True):
        actual = run_block(ours, grads, params, jnp.float64)
    assert_sequences_close(actual, theirs, rtol=1e-12, atol=1e-12)


def test_grokfast_bad_arguments() -> None:
    with pytest.raises(ValueError, match="window"):
        varjax.grokfast_ma(window=0)
    with pytest.raises(ValueError, match="reduce"):
        varjax.grokfast_ma(reduce="median")
    with pytest.raises(ValueError, match="alpha"):
        varjax.grokfast_ema(alpha=1.0)


@pytest.mark.parametrize("warmup", [None, 30])
def test_ademamix_matches_bitsandbytes_32bit(warmup) -> None:
    """bitsandbytes' 32-bit AdEMAMix on CPU; float32 on both sides."""
    import bitsandbytes as bnb

    shapes = [(7, 5), (13,), (1,)]
    grads, params = gradient_sequence(shapes=shapes), initial_params(shapes=shapes)
    tensors = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in params]
    optimizer = bnb.optim.AdEMAMix(
        tensors,
        lr=0.01,
        alpha=8.0,
        t_alpha=warmup,
        t_beta3=warmup,
        weight_decay=0.05,
        optim_bits=32,
    )
    theirs = []
    for g in grads:
        for tensor, x in zip(tensors, g, strict=True):
            tensor.grad = torch.tensor(x, dtype=torch.float32)
        optimizer.step()
        theirs.append([t.detach().numpy().astype(np.float64) for t in tensors])
    tx = varjax.ademamix(
        0.01, alpha=8.0, alpha_warmup_steps=warmup, b3_warmup_steps=warmup, weight_decay=0.05
    )
    assert_sequences_close(run_optimizer(tx, grads, params), theirs, rtol=1e-5, ulps=8)
