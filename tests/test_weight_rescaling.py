"""Weight rescaling (Owen et al., 2025, arXiv 2503.17500): LIR and TVR.

- ``target_variance_rescaling``: against ``ReferenceTVR`` below, a float64 NumPy
  reference written from the algorithm of the official code
  (github.com/bluorion-com/weight_rescaling, a callback run after
  ``optimizer.step()``), over 126 steps of random updates on a tree with a
  matrix, a 3-D array, a vector and a bfloat16 matrix; then the threshold, the
  masks, jit, a Flax NNX model trained through ``optax.chain`` and bad arguments.
- ``layer_index_rescaling``: the sample standard deviation of its draws, alone
  and as the ``kernel_init`` of ``flax.nnx.Linear``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tolerances import EPS32, assert_close, assert_close_normwise, scale_of

from varjax.weight_rescaling import layer_index_rescaling, lir_std, target_variance_rescaling

TARGET = 0.02
# The float32 leaves after 126 steps against the float64 reference. Each step rounds
# param + update (up to u max|w|, u = EPS32 / 2); each of the 18 rescalings adds the
# rounding of a 384- or 120-element mean and standard deviation, of four element-wise
# operations and of the update's difference (a few EPS32 of max|w|), and shrinks the
# deviations' earlier errors by 1.2x or more. As a random walk of ~200 such roundings:
# sqrt(200) / 2 ~ 7 EPS32 of the largest weight, and likewise norm-wise. 16 EPS32 for
# both is 4x (element) and 5x (norm-wise) what XLA:CPU gives with AVX-512, AVX2,
# 128-bit-vector or SSE4.2 code (at most 4.1 and 3.2 EPS32); rescaling with the
# population standard deviation (ddof=0) is 624 EPS32 off (test_tolerances.py).
TVR_ULPS = 16
TVR_RTOL = 16 * EPS32


# --------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------


class ReferenceTVR:
    """Target Variance Rescaling in float64, written from the official code's
    algorithm (bluorion-com/weight_rescaling): after the optimizer's step number
    ``step`` (counted from 1), when ``step % step_interval == 0``, every selected
    weight ``w`` with ``std(w, ddof=1) / target_std > ratio_threshold`` becomes
    ``(w - mean(w)) / std(w) * target_std + mean(w)``. It acts on the weights the
    step landed on and returns them (the official callback edits them in place).
    """

    def __init__(self, target_std, step_interval, ratio_threshold, selected):
        self.target_std = target_std
        self.step_interval = step_interval
        self.ratio_threshold = ratio_threshold
        self.selected = selected
        self.step_count = 0

    def after_step(self, weights: list[np.ndarray]) -> tuple[list[np.ndarray], list[bool]]:
        """The weights after the callback, and which of them it rescaled."""
        self.step_count += 1
        out, rescaled = [], []
        for w, chosen in zip(weights, self.selected, strict=True):
            w = np.asarray(w, np.float64)
            hit = False
            if chosen and self.step_count % self.step_interval == 0:
                mean, std = w.mean(), w.std(ddof=1)
                if std / self.target_std > self.ratio_threshold:
                    w = (w - mean) / std * self.target_std + mean
                    hit = True
            out.append(w)
            rescaled.append(hit)
        return out, rescaled


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float64 values to bfloat16 and back: how a bfloat16 leaf stores them."""
    return np.asarray(x).astype(jnp.bfloat16).astype(np.float64)


# --------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------


def test_tvr_matches_reference_over_many_steps() -> None:
    rng = np.random.default_rng(0)
    shapes = {"matrix": (24, 16), "cube": (4, 6, 5), "vector": (16,), "half": (16, 8)}
    dtypes = {"matrix": jnp.float32, "cube": jnp.float32, "vector": jnp.float32}
    dtypes["half"] = jnp.bfloat16
    names = sorted(shapes)  # the order of the dict's leaves
    half = names.index("half")
    start = [rng.normal(0.0, TARGET, shapes[k]) for k in names]
    start[half] = bf16_round(start[half])
    params = {k: jnp.asarray(w, dtypes[k]) for k, w in zip(names, start, strict=True)}
    every, steps = 7, 126
    tx = target_variance_rescaling(TARGET, every=every, ratio_threshold=1.2)
    update = jax.jit(tx.update)
    state = tx.init(params)
    reference = ReferenceTVR(TARGET, every, 1.2, [len(shapes[k]) >= 2 for k in names])
    ref_weights = start
    hits, misses = dict.fromkeys(names, 0), 0
    for step in range(1, steps + 1):
        if step % every == 1:  # a new noise level and drift of the mean for each interval
            scale = rng.uniform(0.05, 0.6) * TARGET
            drift = rng.normal(0.0, 0.3) * scale
        grads = {k: jnp.asarray(rng.normal(drift, scale, shapes[k]), dtypes[k]) for k in names}
        out, state = update(grads, state, params)
        assert all(out[k].dtype == params[k].dtype for k in names)
        params = optax.apply_updates(params, out)

        landed = [
            w + np.asarray(grads[k], np.float64) for w, k in zip(ref_weights, names, strict=True)
        ]
        landed[half] = bf16_round(landed[half])  # the bfloat16 leaf stores its sum rounded
        ref_weights, rescaled = reference.after_step(landed)
        ref_weights[half] = bf16_round(ref_weights[half])

        if step % every:  # not a rescaling step: the updates pass through bit for bit
            for k in names:
                np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(grads[k]))
        for k, w, before, hit in zip(names, ref_weights, landed, rescaled, strict=True):
            ours = np.asarray(params[k], np.float64)
            if k == "half":  # from the same bfloat16 weights: a rounding or two apart
                ulp = 2**-7 * max(np.abs(ours).max(), np.abs(before).max())
                np.testing.assert_allclose(ours, w, rtol=0, atol=ulp, err_msg=f"{k} {step}")
            else:  # float32: see TVR_ULPS
                largest = max(scale_of(w), scale_of(before))
                assert_close(ours, w, rtol=0, ulps=TVR_ULPS, scale=largest, err_msg=f"{k} {step}")
                assert_close_normwise(ours, w, rtol=TVR_RTOL, err_msg=f"{k} {step}")
            if hit:  # the standard deviation jumped to the target
                hits[k] += 1
                tolerance = 1e-2 if k == "half" else 1e-5
                np.testing.assert_allclose(ours.std(ddof=1), TARGET, rtol=tolerance)
            elif not step % every and k != "vector":  # a rescaling step under the threshold
                misses += 1
                np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(grads[k]))
        np.testing.assert_array_equal(np.asarray(out["vector"]), np.asarray(grads["vector"]))
        # Rounding to bfloat16 flips a last bit now and then, and a flipped weight follows
        # its own path: the reference restarts each step from our bfloat16 weights.
        ref_weights[half] = np.asarray(params["half"], np.float64)
    assert int(state.count) == steps
    assert hits["vector"] == 0
    for k in ("matrix", "cube", "half"):
        assert 4 <= hits[k] < steps // every, hits  # rescaled on some steps, not on all
    assert misses >= 3


# --------------------------------------------------------------------------
# Threshold, step and masks
# --------------------------------------------------------------------------


def one_step(tx, params, grads):
    updates, state = tx.update(grads, tx.init(params), params)
    return updates, optax.apply_updates(params, updates), state


def weights_with(std: float, mean: float, shape=(32, 24), seed: int = 0) -> jax.Array:
    z = np.random.default_rng(seed).normal(size=shape)
    z = (z - z.mean()) / z.std(ddof=1)
    return jnp.asarray(z * std + mean, jnp.float32)


def test_above_threshold_rescales_to_target_and_keeps_mean() -> None:
    params = {"w": jnp.zeros((32, 24), jnp.float32)}
    grads = {"w": weights_with(3.0 * TARGET, 0.5)}  # lands on weights with std 3 * target
    _, new, _ = one_step(target_variance_rescaling(TARGET, every=1), params, grads)
    w, landed = np.asarray(new["w"], np.float64), np.asarray(grads["w"], np.float64)
    np.testing.assert_allclose(w.std(ddof=1), TARGET, rtol=1e-5)
    np.testing.assert_allclose(w.mean(), landed.mean(), rtol=0, atol=1e-6)
    expected = (landed - landed.mean()) / 3.0 + landed.mean()  # the same shape, shrunk
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-6)


def test_bfloat16_params_with_float32_updates() -> None:
    params = {"w": jnp.zeros((32, 24), jnp.bfloat16)}
    grads = {"w": weights_with(3.0 * TARGET, 0.5)}
    updates, new, _ = one_step(target_variance_rescaling(TARGET, every=1), params, grads)
    assert updates["w"].dtype == jnp.float32 and new["w"].dtype == jnp.bfloat16
    w = np.asarray(new["w"], np.float64)
    np.testing.assert_allclose(w.std(ddof=1), TARGET, rtol=1e-2)
    np.testing.assert_allclose(w.mean(), 0.5, rtol=0, atol=2e-3)


@pytest.mark.parametrize("std", [0.3 * TARGET, TARGET, 1.199 * TARGET])
def test_at_or_below_threshold_nothing_changes(std) -> None:
    params = {"w": weights_with(std, 0.1, seed=1)}
    grads = {"w": jnp.zeros_like(params["w"])}
    updates, _, _ = one_step(target_variance_rescaling(TARGET, every=1), params, grads)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(grads["w"]))


def test_one_sided_even_with_threshold_one() -> None:
    tx = target_variance_rescaling(TARGET, every=1, ratio_threshold=1.0)
    small = {"w": weights_with(0.5 * TARGET, 0.0)}  # never stretched up to the target
    updates, _, _ = one_step(tx, small, jax.tree.map(jnp.zeros_like, small))
    np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
    large = {"w": weights_with(1.01 * TARGET, 0.0)}
    _, new, _ = one_step(tx, large, jax.tree.map(jnp.zeros_like, large))
    np.testing.assert_allclose(float(np.std(np.asarray(new["w"]), ddof=1)), TARGET, rtol=1e-5)


def test_rescales_only_every_kth_step() -> None:
    tx = target_variance_rescaling(TARGET, every=3)
    params = {"w": weights_with(5.0 * TARGET, 0.0)}
    grads = {"w": jnp.zeros_like(params["w"])}
    state = tx.init(params)
    changed = []
    for _ in range(7):
        updates, state = tx.update(grads, state, params)
        changed.append(bool(np.any(np.asarray(updates["w"]) != 0.0)))
    assert changed == [False, False, True, False, False, True, False]
    assert int(state.count) == 7


def tree_with_vectors():
    return {
        "layer": {
            "w": weights_with(4 * TARGET, 0.0, seed=2),
            "b": weights_with(4 * TARGET, 0.0, (24,), 3),
        },
        "head": {"w": weights_with(4 * TARGET, 0.0, (24, 8), seed=4)},
    }


def rescaled_leaves(tx) -> dict[str, bool]:
    params = tree_with_vectors()
    updates, _, _ = one_step(tx, params, jax.tree.map(jnp.zeros_like, params))
    flat = jax.tree_util.tree_leaves_with_path(updates)
    return {jax.tree_util.keystr(path): bool(np.any(np.asarray(u) != 0)) for path, u in flat}


def test_default_mask_rescales_matrices_only() -> None:
    assert rescaled_leaves(target_variance_rescaling(TARGET, every=1)) == {
        "['head']['w']": True,
        "['layer']['b']": False,
        "['layer']['w']": True,
    }


def test_custom_masks() -> None:
    full = {"layer": {"w": False, "b": True}, "head": {"w": True}}
    prefix = {"layer": False, "head": True}  # a prefix of the params' tree, as in optax.masked
    vectors = lambda p: jax.tree.map(lambda x: x.ndim == 1, p)  # noqa: E731
    assert rescaled_leaves(target_variance_rescaling(TARGET, every=1, mask=full)) == {
        "['head']['w']": True,
        "['layer']['b']": True,
        "['layer']['w']": False,
    }
    assert rescaled_leaves(target_variance_rescaling(TARGET, every=1, mask=prefix)) == {
        "['head']['w']": True,
        "['layer']['b']": False,
        "['layer']['w']": False,
    }
    assert rescaled_leaves(target_variance_rescaling(TARGET, every=1, mask=vectors)) == {
        "['head']['w']": False,
        "['layer']['b']": True,
        "['layer']['w']": False,
    }


# --------------------------------------------------------------------------
# jit and a model
# --------------------------------------------------------------------------


def test_jit_matches_eager() -> None:
    tx = target_variance_rescaling(TARGET, every=2, ratio_threshold=1.1)
    rng = np.random.default_rng(5)
    params = tree_with_vectors()
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * TARGET, p.dtype), params)
        for _ in range(6)
    ]
    results = []
    for update in (tx.update, jax.jit(tx.update)):
        p, state, outs = params, tx.init(params), []
        for g in grads:
            u, state = update(g, state, p)
            p = optax.apply_updates(p, u)
            outs.append(u)
        results.append(outs)
    for eager, jitted in zip(*results, strict=True):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), eager, jitted
        )


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(8, 32, kernel_init=layer_index_rescaling(1), rngs=rngs)
        self.out = nnx.Linear(32, 1, kernel_init=layer_index_rescaling(2), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def test_in_an_optax_chain_with_a_flax_model() -> None:
    every = 10
    model = MLP(nnx.Rngs(0))
    tx = optax.chain(optax.adamw(1e-2), target_variance_rescaling(TARGET, every=every))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (64, 8))
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2]

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean(jnp.square(model(x) - y))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses, stds = [], []
    for _ in range(4 * every):
        losses.append(float(train_step(model, optimizer, x, y)))
        stds.append(float(jnp.std(model.hidden.kernel.value, ddof=1)))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
    for step in range(every, 4 * every + 1, every):
        assert stds[step - 2] > 1.2 * TARGET  # grown past the threshold by the step before
        np.testing.assert_allclose(stds[step - 1], TARGET, rtol=1e-4)  # and pulled back


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"target_std": 0.0}, "target_std"),
        ({"target_std": -0.01}, "target_std"),
        ({"every": 0}, "every"),
        ({"every": 2.5}, "every"),
        ({"ratio_threshold": 0.9}, "ratio_threshold"),
        ({"ratio_threshold": float("nan")}, "ratio_threshold"),
    ],
)
def test_tvr_bad_arguments(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        target_variance_rescaling(**kwargs)


def test_tvr_needs_params() -> None:
    tx = target_variance_rescaling()
    grads = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(grads))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"layer_index": 0}, "layer_index"),
        ({"layer_index": -1}, "layer_index"),
        ({"layer_index": 1.5}, "layer_index"),
        ({"layer_index": 1, "base_std": 0.0}, "base_std"),
        ({"layer_index": 1, "base_std": -0.02}, "base_std"),
        ({"layer_index": 1, "scale_factor": 0.0}, "scale_factor"),
    ],
)
def test_lir_bad_arguments(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        layer_index_rescaling(**kwargs)


# --------------------------------------------------------------------------
# Layer Index Rescaling
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "scale"), [(1, 1.0), (4, 1.0), (16, 1.0), (4, 2.0)])
def test_lir_sample_std(layer, scale) -> None:
    expected = 0.02 / np.sqrt(layer * scale)
    assert lir_std(layer, 0.02, scale) == pytest.approx(expected, rel=1e-12)
    w = np.asarray(layer_index_rescaling(layer, 0.02, scale)(jax.random.key(layer), (1024, 512)))
    assert w.dtype == np.float32
    np.testing.assert_allclose(w.std(), expected, rtol=0.02)
    assert abs(w.mean()) < 0.01 * expected


def test_lir_as_flax_kernel_init() -> None:
    layer = nnx.Linear(512, 512, kernel_init=layer_index_rescaling(4, 0.006), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(float(jnp.std(layer.kernel.value)), 0.003, rtol=0.02)
    np.testing.assert_array_equal(np.asarray(layer.bias.value), 0.0)
