"""Implicit gradient transport (Arnold et al., 2019)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    PyTree,
    cast_like,
    check_interval,
    check_same_structure,
    trainable_leaves_only,
    zero_count,
)
from varjax.roles import Role

# --------------------------------------------------------------------------
# IGT
# --------------------------------------------------------------------------


@roles.declare(count=Role.COUNT, true_params=Role.PARAMETERS, inner_state=Role.NESTED)
class IGTState(NamedTuple):
    """State of [`implicit_gradient_transport`][varjax.implicit_gradient_transport]: the true
    parameters ``theta_t``."""

    count: jax.Array
    true_params: PyTree
    inner_state: optax.OptState


def anytime_average(count: jax.Array) -> jax.Array:
    """IGT's anytime-average decay ``gamma_t = t / (t + 1)`` at the 0-based step ``t``."""
    t = jnp.asarray(count, jnp.float32)
    return t / (t + 1)


def implicit_gradient_transport(
    inner: optax.GradientTransformation, gamma: float | None = None
) -> optax.GradientTransformationExtraArgs:
    """Implicit gradient transport (Arnold et al., 2019, "Reducing the variance in
    online optimization by transporting past gradients") around a full optimizer.

    ``inner`` maps the gradient to the step on the *true* parameters ``theta``
    (learning rate included) and should average gradients with decay ``gamma``,
    as ``igt`` does. The parameters the caller holds, where gradients are taken,
    are the extrapolated point
    ``theta_t + gamma / (1 - gamma) * (theta_t - theta_{t-1})``, so that old
    gradients in the average are transported to the current iterate. With
    ``gamma=None`` the decay is the anytime average ``t / (t + 1)`` (extrapolation
    by ``t``); a float gives Heavyball-IGT. Read ``theta`` for evaluation with
    [`igt_eval_params`][varjax.igt_eval_params], as with ``optax.contrib.schedule_free``.

    Args:
      inner: the full optimizer for the true parameters, learning rate
        included, that averages gradients with decay ``gamma``; extra
        arguments of ``update`` are forwarded to it.
      gamma: the decay, in [0, 1), that sets the extrapolation
        ``gamma / (1 - gamma)``; ``None`` (default): the anytime average
        ``t / (t + 1)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``params`` (the extrapolated point the caller holds).

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> gamma = 0.9
      >>> inner = optax.chain(varjax.multi_ema((gamma,), (1.0,), (False,)),
      ...                     optax.scale_by_learning_rate(0.1))
      >>> tx = varjax.implicit_gradient_transport(inner, gamma)
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)
      >>> theta = varjax.igt_eval_params(state)
    """
    if gamma is not None:
        check_interval("gamma", gamma, 0.0, 1.0, high_closed=False)
    inner = optax.with_extra_args_support(inner)

    def extrapolation(count: jax.Array) -> jax.Array:
        if gamma is None:
            return jnp.asarray(count, jnp.float32)  # t / (t+1) / (1 / (t+1))
        return jnp.asarray(gamma / (1 - gamma), jnp.float32)

    def init_fn(params: PyTree) -> IGTState:
        # a copy, not the caller's buffers: a train step may donate params and state together
        true_params = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
        return IGTState(zero_count(), true_params, inner.init(params))

    def update_fn(
        updates: PyTree, state: IGTState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, IGTState]:
        if params is None:
            raise ValueError("implicit_gradient_transport needs params in update()")
        check_same_structure(updates, state.true_params, "optimizer state")
        step, inner_state = inner.update(
            updates, state.inner_state, state.true_params, **extra_args
        )
        theta = state.true_params
        new_theta = optax.apply_updates(theta, step)
        count = optax.safe_increment(state.count)
        s = extrapolation(count)
        query = jax.tree.map(
            lambda new, old: new + (s * (new.astype(jnp.float32) - old)).astype(new.dtype),
            new_theta,
            theta,
        )
        out = jax.tree.map(lambda q, p: (q - p).astype(p.dtype), query, params)
        return out, IGTState(count, cast_like(new_theta, theta), inner_state)

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def igt_eval_params(state: optax.OptState) -> PyTree:
    """The true parameters ``theta_t`` kept by
    [`implicit_gradient_transport`][varjax.implicit_gradient_transport] in ``state`` (found anywhere
    inside chains, ``inject_hyperparams`` or other wrappers).

    Args:
      state: an optimizer state holding exactly one
        [`IGTState`][varjax.variance_reduction.IGTState], e.g. ``igt(...).init(params)`` after some
        updates, or the pure state of a ``flax.nnx.Optimizer``
        (``nnx.as_pure(optimizer.opt_state)``).

    Returns:
      The true parameters, a pytree like the parameters.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.igt(0.1)
      >>> params = {"w": jnp.ones(2)}
      >>> updates, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> varjax.igt_eval_params(state)["w"]  # theta = 1 - 0.1 g
      Array([0.9, 0.9], dtype=float32)
    """
    found = [
        leaf
        for leaf in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, IGTState))
        if isinstance(leaf, IGTState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one IGT state in the optimizer state, found {len(found)}")
    return found[0].true_params
