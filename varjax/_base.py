"""Shared pieces of every varjax transform: validation, schedules, moments.

Each formula used by more than one method lives here once: the exponential
moving averages of the gradient and of its square, Adam's bias correction, the
AMSGrad running maximum, and the checks that turn bad hyper-parameters and
mismatched trees into clear errors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax.roles import Role

Array = jax.Array
PyTree = Any
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]

__all__ = [
    "AdaptiveState",
    "abs_squared",
    "adam_direction",
    "adaptive_step",
    "bias_correct",
    "cast_like",
    "check_adam_hyperparameters",
    "check_interval",
    "check_same_structure",
    "ema",
    "ema_squared",
    "init_adaptive_state",
    "one_minus_power",
    "resolve",
    "scalar_float",
    "store_after",
    "zero_count",
]


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _concrete_float(value: Any) -> float | None:
    """The value as a Python float, or None where it is a schedule or traced.

    `optax.inject_hyperparams` hands hyper-parameters to the factory as arrays,
    sometimes inside `jit`; those are checked when they are concrete and
    skipped when they are tracers.
    """
    if callable(value) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check_interval(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_closed: bool = True,
    high_closed: bool = True,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in the interval.

    Schedules (callables) and traced values are not checked here.

    >>> check_interval("b1", 0.9, 0.0, 1.0, high_closed=False)
    >>> check_interval("b1", 1.0, 0.0, 1.0, high_closed=False)
    Traceback (most recent call last):
    ...
    ValueError: b1 must be in [0.0, 1.0), got 1.0
    """
    number = _concrete_float(value)
    if number is None:
        return
    above = number >= low if low_closed else number > low
    below = number <= high if high_closed else number < high
    if not (above and below and not math.isnan(number)):
        left = "[" if low_closed else "("
        right = "]" if high_closed else ")"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")


def check_same_structure(updates: PyTree, reference: PyTree, what: str) -> None:
    """Raise ``ValueError`` unless ``updates`` has the tree structure and shapes of ``reference``.

    Runs at trace time only (structures and shapes are static), so it costs
    nothing inside `jit`.
    """
    got, want = jax.tree.structure(updates), jax.tree.structure(reference)
    if got != want:
        raise ValueError(
            f"the gradient tree does not match the {what}: gradients have structure {got}, "
            f"the {what} has structure {want}"
        )
    for path_and_leaf, ref in zip(
        jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(reference), strict=True
    ):
        path, leaf = path_and_leaf
        if jnp.shape(leaf) != jnp.shape(ref):
            raise ValueError(
                f"the gradient tree does not match the {what}: the leaf at "
                f"{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}, "
                f"the {what} has shape {jnp.shape(ref)}"
            )


# --------------------------------------------------------------------------
# Schedules and dtypes
# --------------------------------------------------------------------------


def resolve(value: ScalarOrSchedule, count: Array) -> Array | float:
    """The value of a scalar-or-schedule hyper-parameter at step ``count``."""
    return value(count) if callable(value) else value


def cast_like(tree: PyTree, reference: PyTree) -> PyTree:
    """Cast every leaf of ``tree`` to the dtype of the matching leaf of ``reference``."""
    return jax.tree.map(lambda x, ref: jnp.asarray(x).astype(jnp.result_type(ref)), tree, reference)


# --------------------------------------------------------------------------
# Moments
# --------------------------------------------------------------------------


def ema(updates: PyTree, moments: PyTree, decay: Any) -> PyTree:
    """``decay * m + (1 - decay) * g`` leaf by leaf, kept in each moment's dtype."""
    return jax.tree.map(
        lambda g, m: ((1 - decay) * g + decay * m).astype(m.dtype), updates, moments
    )


def abs_squared(g: Array) -> Array:
    """``|g|^2`` element-wise, real for complex ``g``."""
    return jnp.square(g) if jnp.isrealobj(g) else jnp.square(jnp.abs(g))


def ema_squared(updates: PyTree, moments: PyTree, decay: Any) -> PyTree:
    """``decay * v + (1 - decay) * |g|^2`` leaf by leaf, kept in each moment's dtype."""
    return jax.tree.map(
        lambda g, v: ((1 - decay) * abs_squared(g) + decay * v).astype(v.dtype),
        updates,
        moments,
    )


def scalar_float(value: Any) -> Array:
    """A scalar in JAX's default float: float32, or float64 under ``jax_enable_x64``."""
    return jnp.asarray(value, jnp.result_type(float))


def signal_to_noise(signal: Array, variance: Array) -> Array:
    """``signal / variance`` where the variance is positive; ``inf`` where it is
    zero and the signal positive, 0 where both vanish (no NaN, no warning).

    >>> signal_to_noise(jnp.asarray([4.0, 1.0, 0.0]), jnp.asarray([2.0, 0.0, 0.0])).tolist()
    [2.0, inf, 0.0]
    """
    noisy = variance > 0
    ratio = jnp.where(noisy, signal / jnp.where(noisy, variance, 1.0), 0.0)
    return jnp.where(~noisy & (signal > 0), jnp.inf, ratio)


def one_minus_power(decay: Any, count: Array) -> Array:
    """``1 - decay**count`` without cancellation, as ``-expm1(count * log(decay))``.

    With ``decay`` a Python float its logarithm is taken on the host in float64;
    ``1 - 0.999**1`` computed directly in float32 is off by about 1e-5 relative.
    """
    t = scalar_float(count)
    if isinstance(decay, (int, float)):
        if decay == 0:
            return jnp.ones_like(t)
        return -jnp.expm1(t * math.log(decay))
    return -jnp.expm1(t * jnp.log(scalar_float(decay)))


def bias_correct(moments: PyTree, decay: Any, count: Array) -> PyTree:
    """Adam's bias correction ``m / (1 - decay**count)``.

    The correction is computed in float32 or wider by :func:`one_minus_power`
    (in bfloat16 it would round to zero for small counts) and the division happens
    in each moment's dtype.
    """
    correction = one_minus_power(decay, count)
    return jax.tree.map(lambda m: m / correction.astype(m.dtype), moments)


def store_after(values: PyTree, count: Array, *later: PyTree) -> PyTree:
    """``values`` (a gradient to keep in the state), computed after the trees ``later``.

    A transform that keeps the previous gradient reads it to build the new
    moments and replaces it by the current one. When the train step donates
    the state, the replacement goes into the old gradient's buffer, and XLA
    (on CPU, jax 0.10) first copies the old gradient to a fresh buffer, whose
    page faults cost more than the step itself: MARS-AdamW took 2.6x
    ``optax.adamw`` instead of 1.5x at 18.5M parameters. Each stored leaf is
    therefore a select between the gradient and the matching leaves of
    ``later`` (the new moments) on ``count >= 0``: always the gradient, since
    counts never go negative, but XLA cannot fold it, so the moments (which read
    the old gradient) are computed first and the store is written in place.
    """

    def select(value: Array, *deps: Array) -> Array:
        dependency = functools.reduce(jnp.add, [d.astype(value.dtype) for d in deps])
        return jnp.where(count >= 0, value, dependency)

    return jax.tree.map(select, values, *later)


def zero_count() -> Array:
    """A fresh step counter: an int32 scalar, as in Optax."""
    return jnp.zeros([], jnp.int32)


@roles.declare(count=Role.COUNT, mu=Role.SIGNED, nu=Role.NON_NEGATIVE, nu_max=Role.NON_NEGATIVE)
class AdaptiveState(NamedTuple):
    """State of an Adam-like block: step count and the gradient's moments.

    ``nu_max`` is the AMSGrad running maximum of the bias-corrected second
    moment, or ``None`` when the max correction is off.
    """

    count: Array
    mu: PyTree
    nu: PyTree
    nu_max: PyTree | None


def init_adaptive_state(
    params: PyTree, *, amsgrad: bool = False, mu_dtype: Any = None
) -> AdaptiveState:
    """Zero moments shaped like ``params`` (``mu`` in ``mu_dtype`` when given)."""
    return AdaptiveState(
        count=zero_count(),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
        nu_max=optax.tree.zeros_like(params) if amsgrad else None,
    )


def adaptive_step(
    updates: PyTree, state: AdaptiveState, b1: Any, b2: Any
) -> tuple[AdaptiveState, PyTree, PyTree]:
    """One Adam moment step: the new state plus bias-corrected ``mu_hat`` and ``nu_hat``.

    When ``state.nu_max`` is present, ``nu_hat`` is the running maximum of the
    bias-corrected second moment: the AMSGrad correction (Reddi et al., 2018,
    "On the Convergence of Adam and Beyond"), taken after bias correction as
    Optax's ``scale_by_amsgrad`` does.
    """
    check_same_structure(updates, state.mu, "optimizer state")
    count = optax.safe_increment(state.count)
    mu = ema(updates, state.mu, b1)
    nu = ema_squared(updates, state.nu, b2)
    mu_hat = bias_correct(mu, b1, count)
    nu_hat = bias_correct(nu, b2, count)
    nu_max = state.nu_max
    if nu_max is not None:
        nu_max = jax.tree.map(jnp.maximum, nu_max, nu_hat)
        nu_hat = nu_max
    return AdaptiveState(count=count, mu=mu, nu=nu, nu_max=nu_max), mu_hat, nu_hat


def adam_direction(mu_hat: PyTree, nu_hat: PyTree, eps: Any) -> PyTree:
    """Adam's step ``mu_hat / (sqrt(nu_hat) + eps)`` leaf by leaf."""
    return jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)


def check_adam_hyperparameters(b1: Any, b2: Any, eps: Any) -> None:
    """Validate the hyper-parameters every Adam-like block shares."""
    check_interval("b1", b1, 0.0, 1.0, high_closed=False)
    check_interval("b2", b2, 0.0, 1.0, high_closed=False)
    check_interval("eps", eps, 0.0)
