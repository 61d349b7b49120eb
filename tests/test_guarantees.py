"""The guarantees the README makes for every optimizer, checked for every battery case.

The cases are the battery's (``test_battery.CASES``), so a case added there is
checked here too. For each case:

1. a gradient tree that does not match the state (a missing leaf, an extra
   leaf, a leaf of another shape) raises varjax's ``ValueError``, which names
   the leaf;
2. integer and boolean parameter leaves get zero updates of their own dtype and
   no optimizer state, and the floating leaves the updates they get without
   them;
3. ``update(grads, state, None)`` works where no weight decay or
   parameter-dependent step is configured (as Optax's), and raises a
   ``ValueError`` that asks for ``params`` elsewhere.

And for every public factory: an integer argument (an int annotation or an int
default) must be an integer: ``2.5`` or ``True`` raise ``ValueError`` naming it.
A new factory with an integer argument must join :data:`INTEGER_ARGS`.

Exemptions are tables with a reason each, and a test checks that they name
existing cases: an Optax transform that meets the gradients first
(:data:`MISMATCH_SEEN_FIRST_BY_OPTAX`), cases that end in an Optax transform,
where only the values of integer leaves are guaranteed (:data:`OPTAX_OUTERMOST`),
cases that need ``params`` (:data:`NEEDS_PARAMS`).

Everything runs eagerly on trees of a few elements (jitting each case's update
took three times as long): these are checks of structure and dtype, not of
numerics. About 24 s of CPU on one core, 4 of them pytest's and JAX's start-up;
nearly all the rest is XLA compiling the eager operations of 51 cases.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_battery import CASES, Case, random_grads

import varjax
from varjax import _base

CASE_PARAMS = [pytest.param(case, id=case.name) for case in CASES]


def _params() -> dict:
    return {"a": jnp.linspace(-1.0, 1.0, 3), "b": jnp.full((2, 2), 0.5)}


@functools.cache
def _first_updates(case: Case) -> dict:
    """The case's first updates on :func:`_params`, computed once."""
    tx, state, grads = _state_and_grads(case)
    return tx.update(grads, state, _params())[0]


@functools.cache
def _state_and_grads(case: Case) -> tuple[optax.GradientTransformation, Any, dict]:
    """A case's transform, its state on :func:`_params` and a gradient, built once."""
    tx = case.build()
    params = _params()
    return tx, tx.init(params), random_grads()(params, 0)


# --------------------------------------------------------------------------
# 1. Mismatched trees
# --------------------------------------------------------------------------

# Cases whose first transform to see the gradients keeps nothing shaped like them,
# so an Optax transform after it meets the bad tree first and raises its own error.
MISMATCH_SEEN_FIRST_BY_OPTAX = {
    "adamw_then_tvr": "optax.adamw comes first",
    "gsnr_then_adam": "scale_by_gsnr is stateless: optax.adam is the first with state",
}
# gradient_snr_monitor keeps one scalar per leaf: it sees a missing or extra leaf,
# not a leaf of another shape
SHAPE_SEEN_FIRST_BY_OPTAX = {"monitors_then_adam"}


def _mismatch_params(case: Case, kind: str) -> pytest.param:
    marks = ()
    if case.name in MISMATCH_SEEN_FIRST_BY_OPTAX or (
        kind == "shape" and case.name in SHAPE_SEEN_FIRST_BY_OPTAX
    ):
        marks = pytest.mark.skip(reason="an Optax transform sees the gradients first")
    return pytest.param(case, kind, id=f"{case.name}-{kind}", marks=marks)


MISMATCHES = {
    # kind: (gradients, the leaf the message must name)
    "missing": (lambda p: {"a": p["a"]}, "['b']"),
    "extra": (lambda p: {**p, "c": jnp.ones(2)}, "['c']"),
    "shape": (lambda p: {"a": jnp.ones(4), "b": p["b"]}, "['a']"),
}


@pytest.mark.parametrize(
    ("case", "kind"), [_mismatch_params(case, kind) for case in CASES for kind in MISMATCHES]
)
def test_mismatched_tree_raises_naming_the_leaf(case: Case, kind: str) -> None:
    """The battery checks that some error comes; here it must be varjax's, naming
    the leaf, for a missing and an extra leaf as well as a wrong shape."""
    tx, state, _ = _state_and_grads(case)
    make_grads, leaf = MISMATCHES[kind]
    grads = make_grads(_params())
    with pytest.raises(ValueError, match="the gradient tree does not match") as error:
        tx.update(grads, state, grads)
    assert leaf in str(error.value)


def test_mismatch_exemptions_name_cases() -> None:
    names = {case.name for case in CASES}
    assert set(MISMATCH_SEEN_FIRST_BY_OPTAX) | SHAPE_SEEN_FIRST_BY_OPTAX <= names
    assert set(OPTAX_FAILS_ON_BOOLEANS) <= names


# --------------------------------------------------------------------------
# 2. Integer and boolean parameter leaves
# --------------------------------------------------------------------------

# Cases that end in an Optax transform (the battery's ``with_rate``, ``optax.adam``
# after a filter) or hand the parameters to one first: Optax multiplies an integer
# leaf by a float and keeps state for it, so there only the values are guaranteed
# (the leaf does not move, the floating leaves are not disturbed).
OPTAX_OUTERMOST = {
    "scale_by_radam",
    "scale_by_adopt",
    "scale_by_grams",
    "scale_by_diffgrad",
    "scale_by_adamp",
    "scale_by_adam_atan2",
    "rectify_adam",
    "rectify_diffgrad_sgd",
    "scale_by_ademamix",
    "second_moment_multi_ema",
    "rectify_ademamix",
    "cautious_ademamix",
    "grokfast_ema_then_adam",
    "grokfast_ma_then_adam",
    "cautious_lion",
    "scale_by_mars",
    "mars_correction_then_lion",
    "mars_correction_then_ademamix",
    "scale_by_qhm",
    "storm_then_adam",
    "quantized_mars_then_rate",
    "autoclip_then_adam",
    "gsnr_then_adam",
    "quantile_clipping_then_adam",
    "adamw_then_tvr",
    "monitors_then_adam",
    "multi_momentum",
}


def _with_frozen_leaves(params: dict) -> dict:
    return {**params, "step": jnp.asarray(3, jnp.int32), "flag": jnp.asarray([True, False])}


def _run(tx: optax.GradientTransformation, params: dict, steps: int) -> tuple[dict, list]:
    """Params after ``steps`` eager steps (zero gradients for the integer and boolean
    leaves, as a user passes them), and the updates of each step."""
    state = tx.init(params)
    floats = {k: v for k, v in params.items() if jnp.issubdtype(v.dtype, jnp.inexact)}
    history = []
    for i in range(steps):
        grads = {**jax.tree.map(jnp.zeros_like, params), **random_grads(i)(floats, i)}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(updates)
    return params, history


def _frozen_params(case: Case) -> pytest.param:
    marks = ()
    if case.name in OPTAX_FAILS_ON_BOOLEANS:
        marks = pytest.mark.skip(reason=OPTAX_FAILS_ON_BOOLEANS[case.name])
    return pytest.param(case, id=case.name, marks=marks)


# Optax transforms that fail on a boolean leaf (the case never reaches varjax's part)
OPTAX_FAILS_ON_BOOLEANS = {"mars_correction_then_lion": "optax.lion subtracts the leaves"}


@pytest.mark.parametrize("case", [_frozen_params(case) for case in CASES])
def test_integer_and_boolean_leaves(case: Case) -> None:
    """Integer and boolean leaves do not move and leave the floating leaves' updates
    alone; where varjax's transform is the outermost one, their updates are zeros of
    their own dtype (not weakly typed) and the state holds nothing for them."""
    params = _with_frozen_leaves(_params())
    new_params, history = _run(case.build(), params, steps=2)
    assert new_params["step"].dtype == jnp.int32 and int(new_params["step"]) == 3
    assert new_params["flag"].dtype == jnp.bool_
    assert new_params["flag"].tolist() == [True, False]
    alone = _first_updates(case)
    # the same float32 arithmetic on the same floating elements (the frozen leaves'
    # gradients are zero); only a global reduction's order can change with the tree:
    # rtol 1e-6 is about 8 float32 ulps, atol covers entries that round near zero
    for name in alone:
        np.testing.assert_allclose(history[0][name], alone[name], rtol=1e-6, atol=1e-7)
    updates = history[-1]
    if case.name in OPTAX_OUTERMOST:
        return
    assert updates["step"].dtype == jnp.int32 and int(updates["step"]) == 0
    assert not updates["step"].weak_type
    assert updates["flag"].dtype == jnp.bool_ and not updates["flag"].any()
    tx = case.build()
    assert varjax.state_bytes(tx.init(params)) == varjax.state_bytes(tx.init(_params()))


def test_optax_outermost_names_cases() -> None:
    assert {case.name for case in CASES} >= OPTAX_OUTERMOST


def test_trainable_leaves_only_is_the_identity_on_float_trees() -> None:
    inner = optax.adam(0.1)
    tx = _base.trainable_leaves_only(inner)
    params = _params()
    state = tx.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(inner.init(params))
    grads = random_grads()(params, 0)
    got, _ = tx.update(grads, state, params)
    want, _ = inner.update(grads, inner.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, got, want)


# --------------------------------------------------------------------------
# 3. params=None
# --------------------------------------------------------------------------

# Cases that need the parameters: a weight decay is configured, or the step depends
# on the parameters.
NEEDS_PARAMS = {
    "adamp": "the projection tests the weights",
    "scale_by_adamp": "the projection tests the weights",
    "cautious_adamw": "weight_decay=1e-4 by default",
    "mars_adamw": "weight_decay_1d=0.1 on vectors by default",
    "mars_shampoo": "weight_decay_1d=0.1 on vectors by default",
    "igt_heavy_ball": "the extrapolation reads the parameters",
    "adamw_8bit": "weight_decay=1e-4 by default",
    "adamw_4bit": "weight_decay=1e-4 by default",
    "adamw_then_tvr": "optax.adamw and the rescaling read the weights",
    "mars_correction_then_lion": "optax.lion's weight_decay=1e-3 by default",
    "lion_8bit": "weight_decay=1e-3 by default, as optax.lion",
    "bf16_adamw": "weight_decay=1e-4 by default, and the rounding reads the weights",
}


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_params_none(case: Case) -> None:
    tx, state, grads = _state_and_grads(case)
    if case.name in NEEDS_PARAMS:
        with pytest.raises(ValueError, match=r"(?i)param"):
            tx.update(grads, state, None)
        return
    got, _ = tx.update(grads, state, None)
    jax.tree.map(np.testing.assert_array_equal, got, _first_updates(case))


def test_needs_params_names_cases() -> None:
    assert set(NEEDS_PARAMS) <= {case.name for case in CASES}


# --------------------------------------------------------------------------
# 4. Integer arguments
# --------------------------------------------------------------------------

_GRADIENT = optax.scale_by_adam()
# every public factory with an integer argument, the arguments it needs besides
_REQUIRED: dict[str, dict[str, Any]] = {
    "agvm": dict(inner=_GRADIENT, labels=lambda p: jax.tree.map(lambda _: 0, p), anchor=0),
    "gradient_noise_scale": dict(small_batch_size=1, large_batch_size=4),
    "multi_momentum": dict(num_clusters=2),
    "layer_index_rescaling": dict(layer_index=1),
    "lir_std": dict(layer_index=1),
    "ademamix_alpha_schedule": dict(alpha=5.0, warmup_steps=10),
    "ademamix_beta3_schedule": dict(b3=0.999, warmup_steps=10),
    "low_precision_weights": dict(tx=_GRADIENT),
    "quantize_state": dict(inner=_GRADIENT),
    "newton_schulz": dict(m=jnp.eye(2)),
}
INTEGER_ARGS: dict[str, set[str]] = {
    "ademamix": {"alpha_warmup_steps", "b3_warmup_steps"},
    "ademamix_alpha_schedule": {"warmup_steps"},
    "ademamix_beta3_schedule": {"warmup_steps"},
    "agvm": {"interval", "start_step"},
    "autoclip": {"window"},
    "grokfast_ma": {"window"},
    "gradient_noise_scale": {"small_batch_size", "large_batch_size"},
    "multi_momentum": {"num_clusters"},
    "scale_by_mars": {"ns_steps"},
    "newton_schulz": {"steps"},
    "target_variance_rescaling": {"every"},
    "layer_index_rescaling": {"layer_index"},
    "lir_std": {"layer_index"},
    "stochastic_rounding": {"seed"},
    "low_precision_weights": {"seed"},
    "bf16_adamw": {"seed"},
    "bf16_adamw_8bit": {"seed", "block_size", "min_size"},
    "quantize_state": {"bits", "block_size", "min_size", "seed"},
    **{
        f"{name}_{bits}bit": {"block_size", "min_size"}
        for name in ("adam", "adamw", "lion")
        for bits in (4, 8)
    },
    **{
        f"ademamix_{bits}bit": {"block_size", "min_size", "alpha_warmup_steps", "b3_warmup_steps"}
        for bits in (4, 8)
    },
}

_MODULES = (
    "varjax",
    "varjax.alias",
    "varjax.rectification",
    "varjax.multi_ema",
    "varjax.variance_reduction",
    "varjax.noise",
    "varjax.diagnostics",
    "varjax.weight_rescaling",
    "varjax.precision",
)


def _public_functions() -> dict[str, Any]:
    found = {}
    for module in _MODULES:
        for name in sys.modules[module].__all__:
            value = getattr(sys.modules[module], name)
            if inspect.isfunction(value):
                found[name] = value
    return found


def _integer_parameters(function: Any) -> set[str]:
    """Parameters annotated ``int`` (``int | None`` included, ``tuple[int, ...]`` not)
    or with an ``int`` default."""
    names = set()
    for parameter in inspect.signature(function).parameters.values():
        annotation = re.sub(r"tuple\[[^\]]*\]", "", str(parameter.annotation))
        if re.search(r"\bint\b", annotation) or type(parameter.default) is int:
            names.add(parameter.name)
    return names


def test_every_integer_argument_is_in_the_table() -> None:
    found = {
        name: params
        for name, function in _public_functions().items()
        if (params := _integer_parameters(function))
    }
    assert found == INTEGER_ARGS


INTEGER_ARG_PARAMS = [
    pytest.param(name, arg, value, id=f"{name}-{arg}-{value}")
    for name, args in sorted(INTEGER_ARGS.items())
    for arg in sorted(args)
    for value in (2.5, True)
]


@pytest.mark.parametrize(("name", "arg", "value"), INTEGER_ARG_PARAMS)
def test_integer_argument_rejects_non_integers(name: str, arg: str, value: Any) -> None:
    function = _public_functions()[name]
    kwargs = dict(_REQUIRED.get(name, {}))
    if "learning_rate" in inspect.signature(function).parameters:
        kwargs.setdefault("learning_rate", 1e-3)
    kwargs[arg] = value
    with pytest.raises(ValueError, match=arg):
        function(**kwargs)


def test_integer_check_accepts_numpy_and_array_integers() -> None:
    assert _base.check_integer("window", np.int64(4), 1) == 4
    assert _base.check_integer("window", jnp.asarray(4), 1) == 4
    assert type(_base.check_integer("window", 1e4, 1)) is int
    tx = varjax.grokfast_ma(np.int32(3))
    assert tx.init({"w": jnp.zeros(2)}).window["w"].shape == (3, 2)
