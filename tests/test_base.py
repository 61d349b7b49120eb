"""The shared pieces in varjax._base: validation, tree checks, schedules, moments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from varjax import _base


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"value": 1.0, "low": 0.0, "high": 1.0, "high_closed": False},
            r"b1 must be in \[0.0, 1.0\)",
        ),
        ({"value": 0.0, "low": 0.0, "low_closed": False}, r"b1 must be in \(0.0, inf\]"),
        ({"value": float("nan"), "low": 0.0}, "b1 must be in"),
        ({"value": jnp.asarray(-1.0), "low": 0.0}, "got Array"),
    ],
)
def test_check_interval_rejects(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        _base.check_interval("b1", **kwargs)


def test_check_interval_accepts_bounds_schedules_and_tracers() -> None:
    _base.check_interval("b1", 0.0, 0.0, 1.0)
    _base.check_interval("b1", 1.0, 0.0, 1.0)
    _base.check_interval("learning_rate", optax.constant_schedule(-1.0), 0.0)
    jax.jit(lambda x: _base.check_interval("b1", x, 0.0, 1.0) or x)(jnp.asarray(5.0))


def test_check_same_structure_names_both_structures() -> None:
    state = {"a": jnp.ones(2), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"gradients have structure .*'c'.* has structure .*'b'"):
        _base.check_same_structure({"a": jnp.ones(2), "c": jnp.ones(3)}, state, "optimizer state")
    with pytest.raises(
        ValueError, match=r"\['b'\] has shape \(4,\), the optimizer state has shape \(3,\)"
    ):
        _base.check_same_structure({"a": jnp.ones(2), "b": jnp.ones(4)}, state, "optimizer state")


def test_check_same_structure_names_the_missing_or_extra_leaf() -> None:
    state = {"a": jnp.ones(2), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"it has no leaf \['b'\]"):
        _base.check_same_structure({"a": jnp.ones(2)}, state, "optimizer state")
    with pytest.raises(ValueError, match=r"a leaf \['c'\] that the optimizer state does not"):
        _base.check_same_structure({**state, "c": jnp.ones(1)}, state, "optimizer state")
    # a MaskedNode (a leaf without state) stands for a leaf of any shape
    masked = {"a": optax.MaskedNode(), "b": jnp.ones(3)}
    _base.check_same_structure({"a": jnp.ones(7), "b": jnp.ones(3)}, masked, "optimizer state")
    with pytest.raises(ValueError, match=r"\['b'\] has shape"):
        _base.check_same_structure({"a": jnp.ones(7), "b": jnp.ones(2)}, masked, "state")
    _base.check_same_structure(state, {"a": 0.0, "b": 0.0}, "state", shapes=False)


@pytest.mark.parametrize("value", [2.5, True, np.bool_(False), "3", None, jnp.ones(2), 0])
def test_check_integer_rejects(value) -> None:
    with pytest.raises(ValueError, match=r"window must be an integer >= 1"):
        _base.check_integer("window", value, 1)


def test_check_integer_accepts_integers_and_skips_tracers() -> None:
    for value in (3, np.int64(3), np.uint8(3), 3.0, jnp.asarray(3)):
        assert _base.check_integer("window", value, 1, 5) == 3
    assert _base.check_integer("window", None, 1, allow_none=True) is None
    assert jax.jit(lambda n: _base.check_integer("steps", n, 1) * 2)(jnp.asarray(4)) == 8


def test_clip_to_norm_global_tensor_and_non_finite() -> None:
    tree = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([0.0, 0.5], jnp.bfloat16)}
    clipped = _base.clip_to_norm(tree, 1.0, "global")
    norm = float(np.sqrt(25.25))
    np.testing.assert_allclose(clipped["a"], np.asarray([3.0, 4.0]) / norm, rtol=1e-6)
    assert clipped["b"].dtype == jnp.bfloat16
    per_leaf = _base.clip_to_norm(tree, 1.0, "tensor")
    np.testing.assert_allclose(per_leaf["a"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(np.float32(per_leaf["b"]), [0.0, 0.5])  # below 1: kept
    bad = {"a": jnp.asarray([jnp.nan, 1.0])}
    assert np.isnan(_base.clip_to_norm(bad, 1.0)["a"][0])
    np.testing.assert_array_equal(_base.clip_to_norm(bad, 1.0, non_finite="zero")["a"], [0, 0])
    assert _base.clip_to_norm(tree, None) is tree


def test_adam_direction_eps_root_and_nesterov_match_optax() -> None:
    params = {"w": jnp.linspace(-1.0, 1.0, 5)}
    grads = [{"w": jnp.linspace(0.5, -2.0, 5) * (k + 1)} for k in range(3)]
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        tx = optax.scale_by_adam(b1=0.8, b2=0.9, eps=1e-3, eps_root=0.5, nesterov=True)
        state, ours = _base.init_adaptive_state(params), None
        theirs_state = tx.init(params)
        for g in grads:
            g = jax.tree.map(lambda x: x.astype(jnp.float64), g)
            state, _, nu_hat = _base.adaptive_step(g, state, 0.8, 0.9)
            mu_hat = _base.nesterov_momentum(state.mu, g, 0.8, state.count)
            ours = _base.adam_direction(mu_hat, nu_hat, 1e-3, 0.5)
            theirs, theirs_state = tx.update(g, theirs_state)
            np.testing.assert_allclose(ours["w"], theirs["w"], rtol=1e-12)


def test_resolve_schedule_and_constant() -> None:
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    assert float(_base.resolve(schedule, jnp.asarray(5))) == pytest.approx(0.5)
    assert _base.resolve(0.3, jnp.asarray(5)) == 0.3


def test_moments_match_their_formulas_and_keep_dtype() -> None:
    g = {"x": jnp.asarray([1.0, -2.0]), "h": jnp.asarray([3.0], jnp.bfloat16)}
    m = {"x": jnp.asarray([0.5, 0.5]), "h": jnp.asarray([1.0], jnp.bfloat16)}
    new = _base.ema(g, m, 0.9)
    np.testing.assert_allclose(new["x"], [0.9 * 0.5 + 0.1 * 1.0, 0.9 * 0.5 - 0.1 * 2.0], rtol=1e-6)
    squared = _base.ema_squared(g, m, 0.9)
    np.testing.assert_allclose(squared["x"], [0.45 + 0.1, 0.45 + 0.4], rtol=1e-6)
    assert new["h"].dtype == squared["h"].dtype == jnp.bfloat16
    # 1 - 0.999 ** 1 would round to 0 in bfloat16; the correction is computed in float32
    corrected = _base.bias_correct(m, 0.999, jnp.asarray(1))
    np.testing.assert_allclose(np.float32(corrected["h"]), [1000.0], rtol=1e-2)
    assert corrected["h"].dtype == jnp.bfloat16


def test_adaptive_step_amsgrad_keeps_running_max() -> None:
    params = {"x": jnp.zeros(2)}
    state = _base.init_adaptive_state(params, amsgrad=True)
    state, _, first = _base.adaptive_step({"x": jnp.asarray([4.0, 0.0])}, state, 0.9, 0.999)
    state, _, second = _base.adaptive_step({"x": jnp.asarray([0.0, 1.0])}, state, 0.9, 0.999)
    np.testing.assert_allclose(first["x"], [16.0, 0.0], rtol=1e-4)  # 0.999 in float32
    assert second["x"][0] == first["x"][0]  # the max holds although nu_hat fell
    assert 0.0 < second["x"][1] < 1.0
    assert int(state.count) == 2


def test_store_after_returns_the_values_whatever_the_later_trees_hold() -> None:
    values = {"w": jnp.arange(3.0)}
    later = {"w": jnp.asarray([jnp.nan, jnp.inf, 1.0], jnp.bfloat16)}
    stored = _base.store_after(values, jnp.asarray(5, jnp.int32), later, later)
    np.testing.assert_array_equal(stored["w"], values["w"])
    assert stored["w"].dtype == values["w"].dtype
