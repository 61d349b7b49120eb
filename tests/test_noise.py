"""Noise-aware clipping against float64 references written from the papers.

- ``autoclip``: against ``references.AutoClip`` (the paper's code: the norm is
  recorded first, then clipped to ``np.percentile`` of the history), with a
  window longer than the run (the paper's unbounded history) and shorter.
- ``scale_by_gsnr``: against ``references.vrgd_step`` (VRGD's Algorithm 1, with
  the paper's population variance) alone and in front of Adam (VR-Adam).
- ``agvm``: against ``references.AGVM`` (the official code's factor, EMA and
  schedule) around Adam.
- ``quantile_clipping``: against ``references.QuantileClipping``; each step is
  the minimiser of its proximal objective; the estimate finds the median of
  Cauchy noise (no mean) and the 0.9-quantile of normal noise.
- ``scale_by_gsnr`` and ``agvm`` with ``axis_name`` on 8 host devices equal the
  micro-batch path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import references as ref
from host_devices import run_on_host_devices
from test_rectification import (
    SHAPES,
    assert_sequences_close,
    gradient_sequence,
    initial_params,
    run_block,
)

import varjax
from varjax.noise import percentile_of_history

# AutoClip scales the whole gradient by one float32 factor, percentile / norm (a
# 49-element sum of squares, a sqrt, an interpolation, a division): an error of a
# few EPS32 relative to every element alike, so rtol 2e-6 (17 EPS32) is the bound
AUTOCLIP_TOLERANCE = {"rtol": 2e-6, "ulps": 0}


@pytest.mark.parametrize("percentile", [10.0, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("window", [1000, 7, 1])
def test_autoclip_matches_reference(percentile, window) -> None:
    grads, params = gradient_sequence(), initial_params()
    ours = run_block(varjax.autoclip(percentile, window), grads, params)
    reference = ref.AutoClip(percentile, None if window >= len(grads) else window)
    expected = [reference.step(g) for g in grads]
    assert_sequences_close(ours, expected, **AUTOCLIP_TOLERANCE)
    clipped = sum(
        not np.allclose(o[0], g[0], rtol=1e-9) for o, g in zip(expected, grads, strict=True)
    )
    if percentile < 100.0 and window > 1:
        assert clipped > 5  # the test exercises clipping, not only the pass-through


def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    norms = rng.exponential(size=50).astype(np.float32)
    for count in (1, 2, 7, 50, 80):
        kept = norms if count >= 50 else norms[:count]
        for p in (0.5, 10.0, 33.3, 50.0, 99.0, 100.0):
            ours = percentile_of_history(jnp.asarray(norms), jnp.asarray(count), p)
            np.testing.assert_allclose(float(ours), np.percentile(kept, p), rtol=4e-6)
    assert float(percentile_of_history(jnp.zeros(4), jnp.asarray(0), 50.0)) == np.inf


def test_autoclip_first_step_and_non_finite() -> None:
    tx = varjax.autoclip(10.0, window=4)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    big = {"w": jnp.full(3, 100.0)}
    updates, state = tx.update(big, state)  # the only norm is its own percentile: no clip
    np.testing.assert_array_equal(updates["w"], big["w"])
    bad = {"w": jnp.asarray([1.0, jnp.nan, 1.0])}
    updates, after = jax.jit(tx.update)(bad, state)
    assert np.isnan(updates["w"][1]) and int(after.count) == 1  # passed through, not recorded
    np.testing.assert_array_equal(after.norms, state.norms)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"percentile": 0.0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"percentile": float("nan")}, "percentile"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
    ],
)
def test_autoclip_bad_arguments(kwargs, arg) -> None:
    with pytest.raises(ValueError, match=arg):
        varjax.autoclip(**kwargs)


def test_autoclip_in_front_of_adam_keeps_dtypes() -> None:
    tx = optax.chain(varjax.autoclip(50.0), optax.adam(1e-3))
    params = {"a": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.ones(4)}
    state = tx.init(params)
    for i in range(3):
        grads = jax.tree.map(lambda p, i=i: (p * (i + 1)).astype(p.dtype), params)
        updates, state = tx.update(grads, state, params)
    assert updates["a"].dtype == jnp.bfloat16 and updates["b"].dtype == jnp.float32


# --------------------------------------------------------------------------
# GSNR scaling (VRGD) and AGVM
# --------------------------------------------------------------------------


def sample_sequence(steps: int = 60, n: int = 8, seed: int = 4) -> list[list[np.ndarray]]:
    """Per step, one ``(n, *shape)`` stack per layer of SHAPES: per-element means of
    varying size plus unit noise, so the GSNR spans several decades."""
    rng = np.random.default_rng(seed)
    offsets = [rng.normal(size=s) * 10.0 ** rng.uniform(-2, 1, size=s) for s in SHAPES]
    return [
        [
            (o + rng.normal(size=(n, *s))).astype(np.float32).astype(np.float64)
            for o, s in zip(offsets, SHAPES, strict=True)
        ]
        for _ in range(steps)
    ]


def run_with_samples(tx, sequence, params) -> list[list[np.ndarray]]:
    """Outputs of ``tx`` fed the mean of each step's samples and the samples."""
    params = [jnp.asarray(p, jnp.float32) for p in params]
    state, update = tx.init(params), jax.jit(tx.update)
    outputs = []
    for stacks in sequence:
        samples = [jnp.asarray(s, jnp.float32) for s in stacks]
        mean = [s.mean(0) for s in samples]
        out, state = update(mean, state, params, microbatch_grads=samples)
        outputs.append([np.asarray(o, np.float64) for o in out])
    return outputs


# VRGD: 8-sample means and variances (mean(g^2) - g^2 cancels where the signal is
# large), a layer mean of r and a clip: rtol 2e-5, and 8 EPS32 of the largest step
GSNR_TOLERANCE = {"rtol": 2e-5, "ulps": 8}


@pytest.mark.parametrize("min_scale", [0.1, 0.5])
def test_gsnr_scaling_matches_vrgd(min_scale) -> None:
    sequence = sample_sequence()
    ours = run_with_samples(varjax.scale_by_gsnr(min_scale), sequence, initial_params())
    expected = [ref.vrgd_step(stacks, min_scale) for stacks in sequence]
    assert_sequences_close(ours, expected, **GSNR_TOLERANCE)
    factors = np.concatenate(
        [(e / s.mean(0)).ravel() for e, s in zip(expected[0][:2], sequence[0][:2], strict=True)]
    )
    # both bounds and the inside of the interval are exercised
    assert np.any(np.isclose(factors, 1.0)) and np.any(np.isclose(factors, min_scale))
    assert np.any((factors > min_scale + 1e-3) & (factors < 1 - 1e-3))


def test_vr_adam_is_adam_on_scaled_gradients() -> None:
    sequence = sample_sequence(steps=30)
    params = initial_params()
    ours = run_with_samples(optax.chain(varjax.scale_by_gsnr(), optax.adam(1e-2)), sequence, params)
    scaled = [ref.vrgd_step(stacks) for stacks in sequence]
    adam = run_block(optax.adam(1e-2), scaled, params)
    assert_sequences_close(ours, adam, rtol=1e-5, ulps=8)


def test_gsnr_scaling_edge_cases() -> None:
    tx = varjax.scale_by_gsnr(0.2)
    params = {"w": jnp.zeros(3), "zero": jnp.zeros(2), "half": jnp.zeros(2, jnp.bfloat16)}
    samples = {
        "w": jnp.asarray([[1.0, 0.0, 1.0], [1.0, 0.0, -1.0]]),  # no variance, neither, noise
        "zero": jnp.zeros((2, 2)),
        "half": jnp.asarray([[1.0, 2.0], [1.0, -2.0]], jnp.bfloat16),
    }
    mean = jax.tree.map(lambda s: s.mean(0), samples)
    out, _ = jax.jit(tx.update)(mean, tx.init(params), microbatch_grads=samples)
    # r = (inf, 0, 0): the signal-only element keeps its step, the rest is zero anyway
    np.testing.assert_array_equal(out["w"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(out["zero"], [0.0, 0.0])
    assert out["half"].dtype == jnp.bfloat16 and float(out["half"][0]) == 1.0
    with pytest.raises(ValueError, match="microbatch_grads"):
        tx.update(mean, tx.init(params))
    with pytest.raises(ValueError, match=">= 2 samples"):
        tx.update(mean, tx.init(params), microbatch_grads=jax.tree.map(lambda s: s[:1], samples))


@pytest.mark.parametrize("bad", [0.0, 1.5, float("nan")])
def test_gsnr_scaling_bad_min_scale(bad) -> None:
    with pytest.raises(ValueError, match="min_scale"):
        varjax.scale_by_gsnr(bad)


def test_agvm_matches_reference() -> None:
    """Two groups with different noise: the noisier head's factor drops below 1."""
    rng = np.random.default_rng(5)
    groups, steps, n = ["backbone", "head", "backbone"], 60, 4
    noise = [0.3, 3.0, 0.3]
    sequence = [
        [
            (1.0 + scale * rng.normal(size=(n, *shape))).astype(np.float32).astype(np.float64)
            for shape, scale in zip(SHAPES, noise, strict=True)
        ]
        for _ in range(steps)
    ]
    tx = varjax.agvm(
        optax.scale_by_adam(), groups, "backbone", momentum=0.8, interval=3, start_step=5
    )
    ours = run_with_samples(tx, sequence, initial_params())
    reference = ref.AGVM(ref.Adam(), groups, "backbone", momentum=0.8, interval=3, start=5)
    expected = [reference.step(stacks) for stacks in sequence]
    assert_sequences_close(ours, expected, rtol=2e-5, ulps=8)
    assert reference.factors["backbone"] == 1.0
    assert reference.factors["head"] < 0.8  # the noisier head gets a smaller rate


@pytest.mark.parametrize("bad", [1e30, float("nan")])
def test_agvm_keeps_its_factors_through_a_non_finite_measurement(bad) -> None:
    """Samples scaled by 1e30 overflow the dot product and squared norms (inf / inf =
    NaN), and a NaN sample is NaN: either way the factors keep their values, where the
    EMA would stay NaN."""
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    labels = {"a": "vector", "b": "matrix"}
    tx = varjax.agvm(optax.scale_by_adam(), labels, "vector", interval=1)
    b = jnp.asarray([[[1.0, 0.2], [0.3, 1.0]], [[0.2, 1.0], [1.0, 0.1]]])
    samples = {"a": jnp.ones((2, 3)), "b": b}
    grads = jax.tree.map(lambda s: s.mean(0), samples)
    _, state = tx.update(grads, tx.init(params), params, microbatch_grads=samples)
    before = {k: float(v) for k, v in state.factors.items()}
    assert before["matrix"] < 1.0
    broken = {**samples, "b": samples["b"] * bad}
    updates, state = jax.jit(tx.update)(
        jax.tree.map(lambda s: s.mean(0), broken), state, params, microbatch_grads=broken
    )
    assert {k: float(v) for k, v in state.factors.items()} == before
    assert bool(jnp.all(jnp.isfinite(updates["a"])))
    if bad == 1e30:  # Adam's step of a finite gradient stays finite, as in optax.adam
        assert bool(jnp.all(jnp.isfinite(updates["b"])))
    _, state = tx.update(grads, state, params, microbatch_grads=samples)
    assert float(state.factors["matrix"]) < before["matrix"]


def test_agvm_schedule_labels_function_and_errors() -> None:
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    labels = lambda p: jax.tree.map(lambda x: "matrix" if x.ndim == 2 else "vector", p)  # noqa: E731
    tx = varjax.agvm(optax.sgd(1.0), labels, "vector", interval=2, start_step=1)
    state = tx.init(params)
    samples = {"a": jnp.ones((2, 3)), "b": jnp.asarray([[[1.0, 0], [0, 1]], [[0, 1.0], [1, 0]]])}
    grads = jax.tree.map(lambda s: s.mean(0), samples)
    history = []
    for _ in range(4):
        _, state = tx.update(grads, state, params, microbatch_grads=samples)
        history.append(float(state.factors["matrix"]))
    # measured at steps 1 and 3 (counting from 0) only: cos 0, so the factor moves to sqrt(0.5)
    first = 0.97 + 0.03 * math.sqrt(0.5)
    np.testing.assert_allclose(
        history, [1.0, first, first, 0.97 * first + 0.03 * math.sqrt(0.5)], rtol=1e-6
    )
    assert float(state.factors["vector"]) == 1.0
    with pytest.raises(ValueError, match="anchor"):
        varjax.agvm(optax.sgd(1.0), labels, "head").init(params)
    for kwargs, arg in [
        ({"momentum": 1.0}, "momentum"),
        ({"interval": 0}, "interval"),
        ({"start_step": -1}, "start_step"),
        ({"min_ratio": 0.0}, "min_ratio"),
        ({"max_ratio": 0.1}, "max_ratio"),
    ]:
        with pytest.raises(ValueError, match=arg):
            varjax.agvm(optax.sgd(1.0), labels, "vector", **kwargs)


SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, optax, varjax
from jax.sharding import Mesh, PartitionSpec as P

assert len(jax.devices()) == 8
mesh = Mesh(jax.devices(), ("data",))
rng = np.random.default_rng(6)
samples = {"w": jnp.asarray(rng.normal(size=(8, 4, 6)) + 0.5, jnp.float32),
           "b": jnp.asarray(rng.normal(size=(8, 6)) * 3, jnp.float32)}
params = {"w": jnp.zeros((4, 6)), "b": jnp.zeros(6)}
mean = jax.tree.map(lambda s: s.mean(0), samples)
labels = {"w": "w", "b": "b"}
makers = {
    "gsnr": lambda axis: varjax.scale_by_gsnr(axis_name=axis),
    "agvm": lambda axis: varjax.agvm(optax.adam(0.1), labels, "w", interval=1, axis_name=axis),
}
for name, make in makers.items():
    local_tx, sharded_tx = make(None), make("data")
    expected = local_tx.update(mean, local_tx.init(params), params, microbatch_grads=samples)

    def per_device(local):
        local = jax.tree.map(lambda x: x[0], local)  # this device's sample
        return sharded_tx.update(local, sharded_tx.init(params), params)

    got = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P()))(samples)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        # psum against a micro-batch mean: another reduction order, errors of the array's scale
        atol = 16 * 2**-23 * np.max(np.abs(np.asarray(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=atol)
    print(name, "sharded ok")
"""


def test_gsnr_scaling_and_agvm_across_devices_equal_microbatch_path(tmp_path) -> None:
    """On 8 host devices, ``axis_name`` (collectives inside ``shard_map``) gives the
    updates and state of the micro-batch path on the same 8 samples."""
    stdout = run_on_host_devices(SHARDED_SCRIPT, tmp_path)
    assert "gsnr sharded ok" in stdout and "agvm sharded ok" in stdout


# --------------------------------------------------------------------------
# Quantile (median) clipping
# --------------------------------------------------------------------------

QUANTILE_CASES = [("global", 0.5), ("tensor", 0.5), ("element", 0.5), ("element", 0.8)]


@pytest.mark.parametrize(("scope", "quantile"), QUANTILE_CASES)
def test_quantile_clipping_matches_reference(scope, quantile) -> None:
    grads = gradient_sequence()
    ours = run_block(varjax.quantile_clipping(0.5, scope, quantile), grads, initial_params())
    reference = ref.QuantileClipping(0.5, scope, quantile)
    expected = [reference.step(g) for g in grads]
    assert_sequences_close(ours, expected, rtol=2e-5, ulps=8)
    clipped = sum(  # steps where the estimate did not jump all the way to g
        not all(np.allclose(m, g) for m, g in zip(estimate, step, strict=True))
        for estimate, step in zip(expected, grads, strict=True)
    )
    assert clipped > 10


def _objective(x, m, g, tau, scope, p) -> float:
    """The proximal objective ``tau * phi(x - g) + |x - m|^2 / 2`` (lists of arrays)."""
    distance = sum(float(np.sum((a - b) ** 2)) for a, b in zip(x, m, strict=True)) / 2
    residuals = [a - b for a, b in zip(x, g, strict=True)]
    if scope == "global":
        phi = math.sqrt(sum(float(np.sum(r * r)) for r in residuals))
    elif scope == "tensor":
        phi = sum(float(np.linalg.norm(r)) for r in residuals)
    else:  # pinball loss of g - x, twice, so that p = 0.5 is |g - x|
        phi = sum(float(np.sum(2 * np.maximum(p * -r, (p - 1) * -r))) for r in residuals)
    return tau * phi + distance


@pytest.mark.parametrize(("scope", "quantile"), QUANTILE_CASES)
def test_quantile_clipping_step_minimises_the_proximal_objective(scope, quantile) -> None:
    """The closed forms are checked against the objective they come from: no
    perturbation of the new estimate lowers it."""
    rng = np.random.default_rng(7)
    tau = 0.7
    tx = varjax.quantile_clipping(tau, scope, quantile)
    params = [jnp.zeros(s) for s in SHAPES]
    state = tx.init(params)
    for _ in range(5):
        old = [np.asarray(m, np.float64) for m in state.estimate]
        g = [rng.standard_cauchy(size=s) for s in SHAPES]
        out, state = tx.update([jnp.asarray(x, jnp.float32) for x in g], state)
        new = [np.asarray(m, np.float64) for m in out]
        best = _objective(new, old, g, tau, scope, quantile)
        for _ in range(50):
            nudged = [x + rng.normal(scale=1e-2, size=np.shape(x)) for x in new]
            assert best <= _objective(nudged, old, g, tau, scope, quantile) + 1e-5


@pytest.mark.parametrize(
    ("scope", "quantile", "noise", "expected_offset"),
    [
        ("element", 0.5, "cauchy", 0.0),
        ("global", 0.5, "cauchy", 0.0),
        ("element", 0.9, "normal", 1.2815516),  # the standard normal's 0.9-quantile
    ],
)
def test_quantile_clipping_finds_the_quantile(scope, quantile, noise, expected_offset) -> None:
    """Gradients ``mu + noise``: the estimate (averaged over the last 2000 of 6000
    steps) lands on ``mu + quantile of the noise``; Cauchy noise has no mean."""
    dim, steps = 16, 6000
    mu = jnp.linspace(-2.0, 2.0, dim)
    tx = varjax.quantile_clipping(0.02, scope, quantile)
    draw = jax.random.cauchy if noise == "cauchy" else jax.random.normal

    def step(state, key):
        out, state = tx.update({"w": mu + draw(key, (dim,))}, state)
        return state, out["w"]

    keys = jax.random.split(jax.random.key(8), steps)
    _, path = jax.jit(lambda s: jax.lax.scan(step, s, keys))(tx.init({"w": mu}))
    estimate = np.asarray(path[-2000:]).mean(0)
    np.testing.assert_allclose(estimate, np.asarray(mu) + expected_offset, atol=0.15)


def test_quantile_clipping_first_step_is_clipping_and_non_finite_is_skipped() -> None:
    g = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([0.0, 12.0])}
    clipped, _ = optax.clip_by_global_norm(2.0).update(g, None)
    first, _ = varjax.quantile_clipping(2.0).update(g, varjax.quantile_clipping(2.0).init(g))
    for name in g:
        np.testing.assert_allclose(first[name], clipped[name], rtol=1e-6)
    element, _ = varjax.quantile_clipping(2.0, "element").update(
        g, varjax.quantile_clipping(2.0, "element").init(g)
    )
    np.testing.assert_array_equal(element["b"], [0.0, 2.0])
    bad = {"a": jnp.asarray([1.0, jnp.nan]), "b": jnp.asarray([1.0, 1.0])}
    for scope, unchanged in [("global", ("a", "b")), ("tensor", ("a",)), ("element", ())]:
        tx = varjax.quantile_clipping(2.0, scope)
        state = tx.init(g)
        _, state = tx.update(g, state)
        _, after = jax.jit(tx.update)(bad, state)
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(after.estimate))
        for name in unchanged:
            np.testing.assert_array_equal(after.estimate[name], state.estimate[name])
        if scope == "element":  # only the NaN element keeps its estimate
            assert float(after.estimate["a"][1]) == float(state.estimate["a"][1])
            assert float(after.estimate["a"][0]) != float(state.estimate["a"][0])


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": -1.0}, "threshold"),
        ({"scope": "layer"}, "scope"),
        ({"quantile": 1.0}, "quantile"),
        ({"quantile": 0.9}, "quantile"),  # quantiles other than the median are per element
    ],
)
def test_quantile_clipping_bad_arguments(kwargs, arg) -> None:
    with pytest.raises(ValueError, match=arg):
        varjax.quantile_clipping(**kwargs)


def _microbatch_readers() -> dict:
    labels = {"b": "head", "w": "backbone"}
    return {
        "gradient_snr_monitor": varjax.gradient_snr_monitor(),
        "scale_by_gsnr": varjax.scale_by_gsnr(),
        "agvm": varjax.agvm(optax.sgd(0.1), labels, anchor="backbone"),
    }


@pytest.mark.parametrize("name", sorted(_microbatch_readers()))
def test_microbatch_grads_must_be_stacked(name) -> None:
    """Unstacked gradients gave a monitor reading of {'b': 1.1e13, 'w': inf}: every
    reader of micro-batch gradients checks the stacked shape at trace time."""
    tx = _microbatch_readers()[name]
    params = {"b": jnp.zeros(2), "w": jnp.zeros((3, 2))}
    grads = {"b": jnp.ones(2), "w": jnp.ones((3, 2))}
    update = jax.jit(lambda samples: tx.update(grads, tx.init(params), params, **samples))
    stacked = jax.tree.map(lambda g: jnp.stack([g, 2.0 * g, 3.0 * g]), grads)
    update({"microbatch_grads": stacked})  # (n, *shape) with one n = 3: accepted
    bad = {
        "unstacked": grads,  # leading axes 2 and 3 would pass a bare "n >= 2" test
        "one sample": jax.tree.map(lambda s: s[:1], stacked),
        "n differs": {"b": stacked["b"], "w": stacked["w"][:2]},
        "mean taken": {"b": stacked["b"], "w": stacked["w"].mean(0)},
        "wrong tree": {"w": stacked["w"]},
    }
    messages = {
        "unstacked": r"\['b'\] has shape \(2,\) for a gradient of shape \(2,\)",
        "one sample": ">= 2 samples",
        "n differs": r"\['w'\] has shape \(2, 3, 2\), but an earlier leaf has n = 3",
        "mean taken": r"\['w'\] has shape \(3, 2\) for a gradient of shape \(3, 2\)",
        "wrong tree": "tree structure",
    }
    for case, samples in bad.items():
        with pytest.raises(ValueError, match=f"^{name}: microbatch_grads must hold") as error:
            update({"microbatch_grads": samples})
        assert error.match(messages[case]), case


def test_small_batch_grads_must_match_the_updates() -> None:
    tx = varjax.gradient_noise_scale(8, 32)
    params = {"b": jnp.zeros(2), "w": jnp.zeros((3, 2))}
    stacked = jax.tree.map(lambda p: jnp.ones((4, *p.shape)), params)
    with pytest.raises(ValueError, match=r"small_batch_grads must be one gradient.*\['b'\]"):
        tx.update(params, tx.init(params), small_batch_grads=stacked)
    tx.update(params, tx.init(params), small_batch_grads=params)
