"""Diagnostics against float64 formulas and a synthetic problem with a known answer.

- ``gradient_noise_scale``: the per-step estimates equal McCandlish et al.'s
  unbiased formulas (float64); on per-example gradients ``G + noise`` with a
  known diagonal covariance, the smoothed ``B_simple`` (3000 steps, decay
  0.999) lands within 5% of ``tr(Sigma) / |G|^2`` (measured 0.5% off; 0.25%
  and 1.6% with two other keys).
- ``gradient_snr_monitor``: per-layer signal, variance and GSNR against a
  float64 reference over micro-batches; unbiased on pure noise (0, not 1/n)
  and on a known signal; inside ``shard_map`` on 8 host devices with
  ``axis_name``, equal to the micro-batch path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from host_devices import run_on_host_devices
from tolerances import assert_close

import varjax
from varjax.diagnostics import noise_scale_estimates


def test_estimates_equal_the_papers_formulas() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        small_sq, large_sq = rng.uniform(1, 5), rng.uniform(0.5, 1)
        b_small, b_big = int(rng.integers(1, 64)), int(rng.integers(65, 1024))
        small_sq, large_sq = float(np.float32(small_sq)), float(np.float32(large_sq))
        g2, trace = noise_scale_estimates(
            jnp.asarray(small_sq, jnp.float32), jnp.asarray(large_sq, jnp.float32), b_small, b_big
        )
        expected_g2 = (b_big * large_sq - b_small * small_sq) / (b_big - b_small)
        expected_trace = (small_sq - large_sq) / (1 / b_small - 1 / b_big)
        # differences of float32 terms: a few roundings of the terms' size, not the result's
        # (measured < 0.5 EPS32 of it)
        terms = (b_big * large_sq + b_small * small_sq) / (b_big - b_small)
        assert_close(float(g2), expected_g2, rtol=0, ulps=8, scale=terms)
        terms = (small_sq + large_sq) / (1 / b_small - 1 / b_big)
        assert_close(float(trace), expected_trace, rtol=0, ulps=8, scale=terms)


def test_noise_scale_recovers_a_known_covariance() -> None:
    """Per-example gradients ``G + s * z`` (``z`` standard normal): ``tr(Sigma) = |s|^2``."""
    dim, small, large, steps = 64, 16, 256, 3000
    rng = np.random.default_rng(1)
    mean = jnp.asarray(rng.normal(size=dim), jnp.float32)
    spread = jnp.asarray(rng.uniform(0.5, 3.0, size=dim), jnp.float32)
    truth = float(jnp.sum(spread**2) / jnp.sum(mean**2))
    tx = varjax.gradient_noise_scale(small, large, decay=0.999)
    params = {"w": jnp.zeros(dim)}

    def step(state, key):
        examples = mean + spread * jax.random.normal(key, (large, dim))
        big, sub = {"w": examples.mean(0)}, {"w": examples[:small].mean(0)}
        updates, state = tx.update(big, state, params, small_batch_grads=sub)
        return state, updates["w"] - big["w"]

    keys = jax.random.split(jax.random.key(0), steps)
    state, passed = jax.jit(lambda s: jax.lax.scan(step, s, keys))(tx.init(params))
    assert np.all(np.asarray(passed) == 0)  # the updates pass through unchanged
    assert abs(float(state.noise_scale) / truth - 1) < 0.05, (float(state.noise_scale), truth)
    np.testing.assert_allclose(float(state.grad_norm_squared), float(jnp.sum(mean**2)), rtol=0.05)


def test_first_step_and_non_positive_estimate() -> None:
    tx = varjax.gradient_noise_scale(4, 16, decay=0.9)
    state = tx.init({"w": jnp.zeros(2)})
    big, small = {"w": jnp.ones(2)}, {"w": jnp.full(2, 2.0)}
    _, state = tx.update(big, state, small_batch_grads=small)
    g2, trace = noise_scale_estimates(jnp.asarray(8.0), jnp.asarray(2.0), 4, 16)
    # the bias-corrected EMA of one value is that value
    np.testing.assert_allclose(float(state.grad_norm_squared), float(g2), rtol=1e-6)
    np.testing.assert_allclose(float(state.noise_scale), float(trace / g2), rtol=1e-6)
    noisy = {"w": jnp.full(2, 10.0)}  # |G|^2 estimate below zero: no finite noise scale
    _, fresh = tx.update(big, tx.init({"w": jnp.zeros(2)}), small_batch_grads=noisy)
    assert float(fresh.grad_norm_squared) < 0 and float(fresh.noise_scale) == np.inf


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"small_batch_size": 0, "large_batch_size": 8}, "small_batch_size"),
        ({"small_batch_size": 8, "large_batch_size": 8}, "large_batch_size"),
        ({"small_batch_size": 2.5, "large_batch_size": 8}, "small_batch_size"),
        ({"small_batch_size": 2, "large_batch_size": 8, "decay": 1.0}, "decay"),
    ],
)
def test_bad_arguments(kwargs, arg) -> None:
    with pytest.raises(ValueError, match=arg):
        varjax.gradient_noise_scale(**kwargs)
    with pytest.raises(ValueError, match="decay"):
        varjax.gradient_snr_monitor(decay=-0.1)


def test_missing_small_batch_grads_raises() -> None:
    tx = optax.chain(varjax.gradient_noise_scale(2, 8), optax.sgd(0.1))
    params = {"w": jnp.zeros(2)}
    with pytest.raises(ValueError, match="small_batch_grads"):
        tx.update(params, tx.init(params), params)


def snr_reference(samples: np.ndarray) -> tuple[float, float, float]:
    """Float64 layer GSNR: means over elements of the unbiased squared mean
    (``mean^2 - var / n``) and of the unbiased variance, and their ratio."""
    samples = samples.astype(np.float64)
    n, mean, var = samples.shape[0], samples.mean(0), samples.var(0, ddof=1)
    signal = float(np.mean(mean**2 - var / n))
    variance = float(np.mean(var))
    return signal, variance, signal / variance


def test_gsnr_matches_reference() -> None:
    rng = np.random.default_rng(2)
    samples = {
        "kernel": (rng.normal(size=(8, 5, 3)) + 0.7).astype(np.float32),
        "bias": rng.normal(size=(8, 3)).astype(np.float32),
    }
    tx = varjax.gradient_snr_monitor()
    params = jax.tree.map(lambda s: jnp.zeros(s.shape[1:]), samples)
    grads = jax.tree.map(lambda s: jnp.asarray(s.mean(0)), samples)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), microbatch_grads=samples)
    for name, stack in samples.items():
        signal, variance, gsnr = snr_reference(stack)
        # signal = mean(mean^2 - var / n) cancels on the zero-mean bias: its float32
        # error (8-sample and element reductions, ~4 roundings deep) is relative to
        # the terms; the variance is a sum of positive terms (measured < 0.6 EPS32)
        terms = float(np.mean(stack.astype(np.float64).mean(0) ** 2)) + variance / len(stack)
        assert_close(float(state.signal[name]), signal, rtol=0, ulps=8, scale=terms)
        assert_close(float(state.variance[name]), variance, rtol=0, ulps=8)
        assert_close(float(state.gsnr[name]), gsnr, rtol=0, ulps=8, scale=terms / variance)
        np.testing.assert_array_equal(updates[name], grads[name])


def test_gsnr_is_unbiased_for_pure_noise_and_known_signal() -> None:
    """Without the ``var / n`` correction, pure noise would read ``1 / n``."""
    n, dim, steps = 8, 256, 400
    tx = varjax.gradient_snr_monitor(decay=0.99)
    params = {"noise": jnp.zeros(dim), "signal": jnp.zeros(dim)}
    keys = jax.random.split(jax.random.key(1), steps)

    def step(state, key):
        z = jax.random.normal(key, (2, n, dim))
        samples = {"noise": z[0], "signal": 0.5 + z[1]}  # GSNR 0 and 0.25
        _, state = tx.update(params, state, microbatch_grads=samples)
        return state, None

    state, _ = jax.jit(lambda s: jax.lax.scan(step, s, keys))(tx.init(params))
    assert abs(float(state.gsnr["noise"])) < 0.01  # against 1 / n = 0.125 uncorrected
    assert abs(float(state.gsnr["signal"]) - 0.25) < 0.02


def test_gsnr_edge_cases() -> None:
    tx = varjax.gradient_snr_monitor()
    params = {"same": jnp.zeros(2), "zero": jnp.zeros(2)}
    samples = {"same": jnp.ones((4, 2)), "zero": jnp.zeros((4, 2))}
    _, state = tx.update(params, tx.init(params), microbatch_grads=samples)
    assert float(state.gsnr["same"]) == np.inf  # signal without noise
    assert float(state.gsnr["zero"]) == 0.0  # neither
    with pytest.raises(ValueError, match=">= 2 samples"):
        tx.update(params, tx.init(params), microbatch_grads={"same": jnp.ones((1, 2)), "zero": 0})
    with pytest.raises(ValueError, match="microbatch_grads"):
        tx.update(params, tx.init(params))


GSNR_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, varjax
from jax.sharding import Mesh, PartitionSpec as P

assert len(jax.devices()) == 8
mesh = Mesh(jax.devices(), ("data",))
rng = np.random.default_rng(3)
samples = {"w": jnp.asarray(rng.normal(size=(8, 4, 6)) + 0.5, jnp.float32),
           "b": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)}
params = {"w": jnp.zeros((4, 6)), "b": jnp.zeros(6)}
vmap_tx, shard_tx = varjax.gradient_snr_monitor(), varjax.gradient_snr_monitor("data")
_, expected = vmap_tx.update(params, vmap_tx.init(params), microbatch_grads=samples)

def per_device(local):
    local = jax.tree.map(lambda x: x[0], local)  # this device's sample
    _, state = shard_tx.update(local, shard_tx.init(params))
    return state

state = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P()))(samples)
for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
    # a psum against a vmap'd mean: another reduction order; signal cancels (see above)
    scale = np.max(np.abs(np.asarray(b)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=64 * 2**-23 * scale)
print("gsnr sharded ok")
"""


def test_gsnr_across_devices_equals_microbatch_path(tmp_path) -> None:
    """On 8 host devices, ``axis_name`` statistics (collectives inside ``shard_map``)
    equal the vmap path's on the same 8 samples."""
    assert "gsnr sharded ok" in run_on_host_devices(GSNR_SHARDED_SCRIPT, tmp_path)
