"""varjax.quantization.leafwise: an elementwise update split into per-leaf programs, and
the chunked first pass of quantize_state built on it (the CPU path).

The split is checked against the update it came from: each group, run on blocks of
rows of its leaf, gives what the whole update gives. Both compute the same float32
operations in the same order per element, but XLA may fuse or contract them
differently (a multiply-add as one FMA), so values agree to a few float32 ulps of
their magnitude, not bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import varjax
from varjax import alias
from varjax.quantization import QuantizedArray, leafwise, quantize_state, wrapper

# Both sides round each operation once; a fused multiply-add on one side skips one
# rounding, so each intermediate differs by at most an ulp of itself. Through Adam's
# m_hat / (sqrt(v_hat) + eps) a relative ulp in m passes as one ulp and one in v as
# half an ulp, and the chains here have at most a few such steps: 8 ulps of the largest
# magnitude bounds it, while a wrong formula (a missed bias correction, b1 for b2)
# moves values by percents.
ULPS = 8 * np.finfo(np.float32).eps


def params_tree():
    keys = jax.random.split(jax.random.key(0), 4)
    return {
        "w": jax.random.normal(keys[0], (10, 33)),
        "stack": jax.random.normal(keys[1], (3, 5, 17)),
        "b": jax.random.normal(keys[2], (33,)),
        "s": jax.random.normal(keys[3], ()),
    }


def traced_split(inner, grads, state, params):
    closed, _ = leafwise.trace(lambda g, s, p: inner.update(g, s, p), grads, state, params)
    return leafwise.split(closed)


ELEMENTWISE = {
    "adamw": lambda: alias._adamw(1e-2, weight_decay=0.1),
    "optax.adamw": lambda: optax.adamw(1e-2),
    "lion": lambda: alias._lion(1e-3),
    "ademamix": lambda: varjax.ademamix(1e-2),
    "radam": lambda: varjax.radam(1e-2),
    "optax.sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "optax.adabelief": lambda: optax.adabelief(1e-2),
}
NOT_ELEMENTWISE = {
    "clip_by_global_norm": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    "adafactor": lambda: optax.adafactor(1e-2),
    "mars_adamw": lambda: varjax.mars_adamw(1e-2),
    "add_noise": lambda: optax.add_noise(0.1, 0.5, 0),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_groups_on_row_blocks_give_the_whole_update(name) -> None:
    inner = ELEMENTWISE[name]()
    params = params_tree()
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)
    state = inner.init(params)
    state = jax.tree.map(lambda x: x + 0.25 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    found = traced_split(inner, grads, state, params)
    assert found is not None
    flat = jax.tree.leaves((grads, state, params))
    expected = jax.tree.leaves(inner.update(grads, state, params))
    scalars = leafwise.evaluate_scalars(found, flat)
    shapes = {g.shape for g in found.groups}
    assert {(10, 33), (3, 5, 17), (33,)} <= shapes  # one group (at least) per leaf shape
    covered = set()
    for group in found.groups:
        if len(group.shape) < 2:
            out = leafwise.evaluate_group(
                found, group, scalars, {i: flat[i] for i in group.inputs}, group.shape
            )
        else:  # rows 0-1, then 2 to the end, as a flat 2-D view
            width = group.shape[-1]
            parts: dict[int, list] = {}
            for rows in (slice(0, 2), slice(2, None)):
                inputs = {i: flat[i].reshape(-1, width)[rows] for i in group.inputs}
                shape = next(iter(inputs.values())).shape
                for j, v in leafwise.evaluate_group(found, group, scalars, inputs, shape).items():
                    parts.setdefault(j, []).append(v)
            out = {j: jnp.concatenate(v).reshape(group.shape) for j, v in parts.items()}
        for j, value in out.items():
            scale = float(jnp.max(jnp.abs(expected[j]))) or 1.0
            np.testing.assert_allclose(value, expected[j], rtol=0, atol=ULPS * scale)
            covered.add(j)
    # every non-scalar output is some group's
    assert covered == {j for j, x in enumerate(expected) if jnp.ndim(x)}


@pytest.mark.parametrize("name", sorted(NOT_ELEMENTWISE))
def test_a_reduction_or_a_random_draw_is_not_split(name) -> None:
    inner = NOT_ELEMENTWISE[name]()
    params = {"w": jnp.ones((8, 16)), "b": jnp.ones(16)}
    state = inner.init(params)
    assert traced_split(inner, params, state, params) is None


def test_leaves_mixed_elementwise_share_one_group() -> None:
    """An update that adds one leaf's gradient to another's (same shape) is elementwise,
    but not per leaf: both leaves land in one group, which reads both gradients."""

    def update(grads, state, params=None):
        del params
        return {"a": grads["a"] + grads["b"], "b": 2.0 * grads["b"]}, state

    inner = optax.GradientTransformation(lambda p: optax.EmptyState(), update)
    grads = {"a": jnp.ones((4, 8)), "b": jnp.full((4, 8), 3.0)}
    found = traced_split(inner, grads, optax.EmptyState(), None)
    assert found is not None
    assert len(found.groups) == 1 and sorted(found.groups[0].inputs) == [0, 1]


def test_shapes_of_two_leaves_cannot_mix() -> None:
    def update(grads, state, params=None):
        del params
        return {"a": grads["a"] + grads["b"][0], "b": grads["b"]}, state

    inner = optax.GradientTransformation(lambda p: optax.EmptyState(), update)
    grads = {"a": jnp.ones(8), "b": jnp.ones((4, 8))}
    assert traced_split(inner, grads, optax.EmptyState(), None) is None


def quantized(state):
    is_q = lambda x: isinstance(x, QuantizedArray)  # noqa: E731
    return [x for x in jax.tree.leaves(state, is_leaf=is_q) if is_q(x)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: varjax.adamw_8bit(1e-2, weight_decay=0.1),
        lambda: varjax.adamw_4bit(1e-2),
        lambda: varjax.ademamix_8bit(1e-2),
        lambda: varjax.lion_8bit(1e-3),
        lambda: quantize_state(optax.sgd(1e-2, momentum=0.9), min_size=0),
    ],
    ids=["adamw_8bit", "adamw_4bit", "ademamix_8bit", "lion_8bit", "sgd_momentum"],
)
def test_chunked_first_pass_stores_the_same_state(make, monkeypatch) -> None:
    """Chunks of two rows (odd row counts: the last chunk overlaps the one before),
    against the whole-leaf update: identical codes, absmax and parameters within a few
    ulps (see the module docstring), and the same steps skipped for a NaN."""
    monkeypatch.setattr(wrapper, "_CHUNK_ELEMENTS", 2 * 300)
    params = {
        "w": jax.random.normal(jax.random.key(0), (13, 300)),
        "t": jax.random.normal(jax.random.key(1), (3, 5, 260)),
        "v": jax.random.normal(jax.random.key(2), (5000,)),
        "b": jnp.zeros(300),
    }
    tx = make()
    results = []
    for chunked in (False, True):
        monkeypatch.setattr(wrapper, "_CHUNKED", chunked)
        jax.clear_caches()
        update = jax.jit(lambda p, s, g: tx.update(g, s, p))  # a new trace per setting
        p, state = params, tx.init(params)
        for i in range(4):
            key = jax.random.key(10 + i)
            grads = jax.tree.map(lambda x, key=key: jax.random.normal(key, x.shape), params)
            if i == 2:
                grads["w"] = grads["w"].at[3, 7].set(jnp.nan)
            updates, state = update(p, state, grads)
            p = optax.apply_updates(p, updates)
        results.append((p, state))
    (params_a, state_a), (params_b, state_b) = results
    assert int(state_a.skipped) == int(state_b.skipped) == 1
    qa, qb = quantized(state_a), quantized(state_b)
    assert len(qa) == len(qb) > 0
    for a, b in zip(qa, qb, strict=True):
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_allclose(a.absmax, b.absmax, rtol=ULPS, atol=0)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        scale = float(jnp.max(jnp.abs(a))) or 1.0
        np.testing.assert_allclose(a, b, rtol=0, atol=ULPS * scale)


def test_the_chunked_pass_runs_where_it_can(monkeypatch) -> None:
    """On CPU quantize_state takes the chunked first pass for an elementwise inner
    transform (and keeps the whole-leaf path for adafactor)."""
    calls = []
    original = wrapper._chunked_first_pass

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(wrapper, "_chunked_first_pass", spy)
    monkeypatch.setattr(wrapper, "_CHUNKED", True)
    params = {"w": jnp.ones((64, 128))}
    for tx in (varjax.adamw_8bit(1e-3), quantize_state(optax.adafactor(1e-3), min_size=0)):
        jax.eval_shape(tx.update, params, jax.eval_shape(tx.init, params), params)
    assert calls == [True, False]
