"""ADOPT (Taniguchi et al., 2024): the second moment taken one step late."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    PyTree,
    abs_squared,
    cast_like,
    check_adam_hyperparameters,
    check_interval,
    check_same_structure,
    ema,
    ema_squared,
    scalar_float,
    trainable_leaves_only,
    zero_count,
)
from varjax.roles import Role

# --------------------------------------------------------------------------
# ADOPT
# --------------------------------------------------------------------------


@roles.declare(count=Role.COUNT, mu=Role.SIGNED, nu=Role.NON_NEGATIVE)
class ScaleByAdoptState(NamedTuple):
    """State of [`scale_by_adopt`][varjax.scale_by_adopt]."""

    count: jax.Array
    mu: PyTree
    nu: PyTree


def scale_by_adopt(
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    *,
    clip_exponent: float | None = 0.25,
    nesterov: bool = False,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Rescale updates by ADOPT (Taniguchi et al., 2024, "ADOPT: Modified Adam
    Can Converge with Any beta2 with the Optimal Rate").

    The gradient is normalised by the second moment *of the previous step*,
    clipped, and only then averaged into the momentum:
    ``m_t = b1 m_{t-1} + (1 - b1) clip(g_t / max(sqrt(v_{t-1}), eps), c_t)``,
    ``v_t = b2 v_{t-1} + (1 - b2) g_t^2``, update ``m_t``. The first step only
    initialises ``v_0 = g_0^2`` and returns a zero update. The same method as
    ``optax.contrib.scale_by_adopt``; it matches Optax run in float64 (in
    float32 Optax rounds ``1 - b2`` from a traced ``b2``).

    *Clip convention.* ``c_t = t ** clip_exponent`` with ``t`` the number of
    steps before this one, so the first real update uses ``c_1 = 1`` (the
    paper's Algorithm 2 and Optax). The official code and pytorch-optimizer
    evaluate their ``clip_lambda`` at ``t + 1``. The clip is given by its
    exponent rather than a function so that it stays a number under
    ``optax.inject_hyperparams``.

    Args:
      b1: momentum decay, in [0, 1).
      b2: second-moment decay, in [0, 1).
      eps: lower bound of ``sqrt(v)``, >= 0.
      clip_exponent: the clip value is ``t ** clip_exponent``; ``None`` for no clip.
      nesterov: use Nesterov momentum (as Optax does).
      mu_dtype: dtype of the momentum; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.scale_by_adopt()
      >>> updates, state = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
      >>> updates["w"]  # the first step only measures the gradient
      Array([0., 0.], dtype=float32)
    """
    check_adam_hyperparameters(b1, b2, eps)
    check_interval("clip_exponent", clip_exponent, 0.0)

    def init_fn(params: PyTree) -> ScaleByAdoptState:
        return ScaleByAdoptState(
            count=zero_count(),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(
        updates: PyTree, state: ScaleByAdoptState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByAdoptState]:
        del params
        check_same_structure(updates, state.mu, "optimizer state")
        first = state.count == 0

        def normalise(g: jax.Array, v: jax.Array) -> jax.Array:
            n = g / jnp.maximum(jnp.sqrt(v), eps)
            if clip_exponent is not None:
                c = scalar_float(state.count) ** clip_exponent
                n = jnp.clip(n, -c, c)
            return jnp.where(first, jnp.zeros_like(n), n)

        normalised = jax.tree.map(normalise, updates, state.nu)
        mu = optax.tree.where(first, state.mu, ema(normalised, state.mu, b1))
        # b2 stays a Python float (1 - b2 in float32 from a traced b2 = 0.9999 is off
        # by ~6e-4 relative); the first step takes v_0 = g_0^2.
        nu = jax.tree.map(
            lambda g, v: jnp.where(first, abs_squared(g).astype(v.dtype), v),
            updates,
            ema_squared(updates, state.nu, b2),
        )
        out = ema(normalised, mu, b1) if nesterov else mu
        new_state = ScaleByAdoptState(count=optax.safe_increment(state.count), mu=mu, nu=nu)
        return cast_like(out, updates), new_state

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))
