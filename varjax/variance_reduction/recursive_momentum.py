"""STORM's recursive momentum (Cutkosky & Orabona, 2019)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    PyTree,
    ScalarOrSchedule,
    cast_like,
    check_interval,
    check_same_structure,
    resolve,
    store_after,
    trainable_leaves_only,
    zero_count,
)
from varjax.roles import Role
from varjax.variance_reduction._common import previous_gradients

# --------------------------------------------------------------------------
# STORM
# --------------------------------------------------------------------------


@roles.declare(count=Role.COUNT, direction=Role.SIGNED, previous_grads=Role.EXACT)
class StormState(NamedTuple):
    """State of [`scale_by_storm`][varjax.scale_by_storm].

    ``direction`` is ``d_{t-1}``; ``previous_grads`` the stored gradient of the
    approximate form (``None`` in the exact form).
    """

    count: jax.Array
    direction: PyTree
    previous_grads: PyTree | None


@roles.declare(
    count=Role.COUNT,
    direction=Role.SIGNED,
    previous_grads=Role.EXACT,
    squared_norms=Role.EXACT,
    step_size=Role.EXACT,
)
class AdaptiveStormState(NamedTuple):
    """State of [`storm`][varjax.storm]: [`StormState`][varjax.variance_reduction.StormState]'s
    fields and the adaptive step's running ``sum G_i^2`` (``squared_norms``) and ``eta_{t-1}``
    (``step_size``)."""

    count: jax.Array
    direction: PyTree
    previous_grads: PyTree | None
    squared_norms: jax.Array
    step_size: jax.Array


def _storm(
    correction_weight: Callable[[StormState], jax.Array], exact: bool, who: str
) -> tuple[Callable, Callable]:
    """STORM's recursion ``d_t = g_t + (1 - a_t)(d_{t-1} - g_prev)``, ``d_1 = g_1``."""

    def init_fn(params: PyTree) -> StormState:
        return StormState(  # distinct buffers: a train step may donate the state
            count=zero_count(),
            direction=optax.tree.zeros_like(params),
            previous_grads=None if exact else optax.tree.zeros_like(params),
        )

    def direction_fn(
        updates: PyTree, state: StormState | AdaptiveStormState, extra_args: dict
    ) -> PyTree:
        check_same_structure(updates, state.direction, "optimizer state")
        previous = previous_gradients(exact, extra_args, state.previous_grads, updates, who)
        keep = jnp.where(state.count == 0, 0.0, 1.0 - correction_weight(state))
        return jax.tree.map(
            lambda g, d, p: g + keep.astype(g.dtype) * (d.astype(g.dtype) - p.astype(g.dtype)),
            updates,
            state.direction,
            previous,
        )

    return init_fn, direction_fn


def _stored_gradient(
    updates: PyTree, state: StormState | AdaptiveStormState, direction: PyTree, exact: bool
) -> PyTree | None:
    """The approximate form's next ``g_prev``, written after ``d_t`` (``store_after``)."""
    if exact:
        return None
    return store_after(cast_like(updates, state.previous_grads), state.count, direction)


def scale_by_storm(
    correction: ScalarOrSchedule = 0.1, *, exact: bool = True
) -> optax.GradientTransformationExtraArgs:
    """STORM's recursive momentum (Cutkosky & Orabona, 2019, "Momentum-Based
    Variance Reduction in Non-Convex SGD"), with a fixed or scheduled ``a``.

    ``d_t = g_t + (1 - a)(d_{t-1} - g_prev)`` with ``d_1 = g_1``, where ``g_prev``
    is ``grad f(x_{t-1}, xi_t)`` (``exact=True``, passed as ``previous_grads``)
    or the previous step's gradient (``exact=False``). The approximate form is
    exactly plain SGD: ``d_t - g_t = (1 - a)(d_{t-1} - g_{t-1}) = 0``. MARS
    avoids the collapse with ``gamma < 1`` and an EMA after the correction.
    ``correction`` is ``a``; a schedule is called with the 0-based step count.

    Args:
      correction: ``a``, the weight of the new gradient in the recursion, in
        [0, 1], or a schedule (1: SGD).
      exact: take ``g_prev`` from the extra argument ``previous_grads``
        (default); ``False``: the previous step's gradient, which makes STORM
        plain SGD.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.scale_by_storm(0.1), optax.scale_by_learning_rate(0.01))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> g = {"w": jnp.ones(3)}
      >>> updates, state = tx.update(g, state, params, previous_grads=g)
    """
    check_interval("correction", correction, 0.0, 1.0)
    init_fn, direction_fn = _storm(
        lambda s: jnp.asarray(resolve(correction, s.count)), exact, "scale_by_storm"
    )

    def update_fn(
        updates: PyTree, state: StormState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, StormState]:
        del params
        direction = direction_fn(updates, state, extra_args)
        new_state = state._replace(
            count=optax.safe_increment(state.count),
            direction=cast_like(direction, state.direction),
            previous_grads=_stored_gradient(updates, state, direction, exact),
        )
        return cast_like(direction, updates), new_state

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def storm(
    k: ScalarOrSchedule = 0.1, w: float = 0.1, c: float = 100.0, *, exact: bool = True
) -> optax.GradientTransformationExtraArgs:
    """STORM with the paper's adaptive step (Cutkosky & Orabona, 2019, Algorithm 1).

    ``eta_t = k / (w + sum_{i<=t} G_i^2)^(1/3)`` with ``G_i`` the global norm of
    the ``i``-th gradient, ``a_{t+1} = c eta_t^2`` and the update
    ``-eta_t d_t`` (the learning rate is built in: use ``k`` to scale it).
    ``a`` is capped at 1 (the paper assumes ``c eta^2 <= 1``). ``w=0.1`` and
    ``c=100`` are the paper's CIFAR-10 settings; tune ``k`` like a learning rate
    (it may be a schedule, called with the 0-based step count).

    Args:
      k: the step-size scale, > 0, or a schedule; tune it like a learning rate.
      w: the offset under the cube root, > 0 (0.1 as the paper's CIFAR-10 runs).
      c: sets ``a_{t+1} = c eta_t^2``, >= 0 (100 as the paper's runs).
      exact: take ``g_prev`` from the extra argument ``previous_grads``
        (default); ``False``: the previous step's gradient.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose updates include the
      step size and sign (apply them directly).

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.storm(k=0.1)
      >>> params = {"w": jnp.ones(3)}
      >>> g = {"w": jnp.ones(3)}
      >>> updates, state = tx.update(g, tx.init(params), params, previous_grads=g)
    """
    check_interval("k", k, 0.0, low_closed=False)
    check_interval("w", w, 0.0, low_closed=False)
    check_interval("c", c, 0.0)
    storm_init, direction_fn = _storm(
        lambda s: jnp.minimum(1.0, c * s.step_size**2), exact, "storm"
    )

    def init_fn(params: PyTree) -> AdaptiveStormState:
        return AdaptiveStormState(
            *storm_init(params),
            squared_norms=jnp.zeros([], jnp.float32),
            step_size=jnp.zeros([], jnp.float32),
        )

    def update_fn(
        updates: PyTree, state: AdaptiveStormState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, AdaptiveStormState]:
        del params
        direction = direction_fn(updates, state, extra_args)
        squared_norm = optax.global_norm(jax.tree.map(lambda g: g.astype(jnp.float32), updates))
        squared_norms = state.squared_norms + squared_norm**2
        step_size = resolve(k, state.count) / jnp.cbrt(w + squared_norms)
        new_state = AdaptiveStormState(
            count=optax.safe_increment(state.count),
            direction=cast_like(direction, state.direction),
            previous_grads=_stored_gradient(updates, state, direction, exact),
            squared_norms=squared_norms,
            step_size=step_size,
        )
        out = jax.tree.map(lambda d: -step_size.astype(d.dtype) * d, direction)
        return cast_like(out, updates), new_state

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))
