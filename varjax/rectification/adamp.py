"""AdamP (Heo et al., 2021): Adam's step projected for scale-invariant weights."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from varjax._base import (
    AdaptiveState,
    PyTree,
    adam_direction,
    adaptive_step,
    cast_like,
    check_adam_hyperparameters,
    check_interval,
    init_adaptive_state,
    nesterov_momentum,
    trainable_leaves_only,
)

# --------------------------------------------------------------------------
# AdamP
# --------------------------------------------------------------------------


def _project_if_scale_invariant(
    param: jax.Array, grad: jax.Array, step: jax.Array, delta: Any, eps: Any
) -> tuple[jax.Array, jax.Array]:
    """AdamP's projection: remove the radial part of ``step`` where ``param`` looks scale-invariant.

    Scale-invariance is detected per output channel (the last axis) first, then
    for the whole weight: the largest ``|cosine(grad, param)|`` must be below
    ``delta / sqrt(d)``, ``d`` the size of the vectors compared. The projection
    ``step - p_hat <p_hat, step>`` with ``p_hat = param / (|param| + eps)`` is
    ``step - param * <param, step> / (|param| + eps)^2``, per channel or for the
    whole weight. All it needs are four per-channel sums (the whole weight's are
    their totals), so it costs one reduction pass and one elementwise pass.
    The channel sums pass through an optimization barrier: without it XLA
    rewrites each total as a second full reduction over the inputs, which reads
    them all again (on an H200 at 251M parameters, 5.76 ms a step against 4.63).
    Returns the (maybe) projected step and whether a projection happened.
    """
    axes = tuple(range(param.ndim - 1))
    g_dot_p, g_sq, p_sq, p_dot_u = jax.lax.optimization_barrier(
        tuple(
            jnp.sum(a * b, axis=axes)
            for a, b in ((grad, param), (grad, grad), (param, param), (param, step))
        )
    )

    def cosine(dot, a_sq, b_sq):
        return jnp.abs(dot) / (jnp.maximum(jnp.sqrt(a_sq), eps) * jnp.maximum(jnp.sqrt(b_sq), eps))

    rows = param.size // param.shape[-1]
    by_channel = jnp.max(cosine(g_dot_p, g_sq, p_sq)) < delta / jnp.sqrt(rows)
    by_layer = cosine(jnp.sum(g_dot_p), jnp.sum(g_sq), jnp.sum(p_sq)) < delta / jnp.sqrt(param.size)
    channel_coef = p_dot_u / (jnp.sqrt(p_sq) + eps) ** 2
    layer_coef = jnp.sum(p_dot_u) / (jnp.sqrt(jnp.sum(p_sq)) + eps) ** 2
    coef = jnp.where(by_channel, channel_coef, jnp.where(by_layer, layer_coef, 0.0))
    return step - param * coef.astype(step.dtype), by_channel | by_layer


def scale_by_adamp(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.0,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
    amsgrad: bool = False,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Rescale updates by AdamP (Heo et al., 2021, "AdamP: Slowing Down the
    Slowdown for Momentum Optimizers on Scale-invariant Weights").

    Adam's step, with its radial component removed for weights that look
    scale-invariant (see ``_project_if_scale_invariant``); those weights
    also get ``wd_ratio`` times the decoupled weight decay. Because the decay
    depends on the projection, it is part of this block (output:
    ``step + weight_decay * ratio * param``); chain the learning rate after it.
    Needs ``params``.

    *Conventions.* Weights with two or more axes are checked; the *last* axis
    is the output channel (Flax's ``(..., in, out)`` kernels), where PyTorch
    code uses the first. The denominator is ``sqrt(nu_hat) + eps`` as in the
    paper; pytorch-optimizer adds ``eps`` before the bias correction.

    Args:
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, and to the norms of the projection test, >= 0.
      weight_decay: decoupled weight decay added to the step, >= 0 (0: none);
        scale-invariant weights get ``wd_ratio`` times it.
      delta: the cosine threshold of the scale-invariance test, >= 0: a weight
        is projected when its cosine with the gradient is below
        ``delta / sqrt(d)`` (0.1 as in the paper).
      wd_ratio: the factor on ``weight_decay`` for projected weights, >= 0.
      nesterov: use Nesterov momentum in the step (the paper's option), in
        Optax's convention (``varjax._base.nesterov_momentum``): with
        ``delta=0`` and no weight decay this is ``optax.scale_by_adam(nesterov=True)``.
        The official AdamP code divides both terms of the Nesterov momentum by
        ``1 - b1^t``; Optax (and Dozat's NAdam) divide the momentum term by
        ``1 - b1^(t+1)``, a difference that fades as ``b1^t`` does (at the first
        step with ``b1=0.9`` the official momentum is 1.9 times the gradient
        where Optax's is 1.47).
      amsgrad: use the running maximum of ``nu_hat`` (AMSGrad).
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.scale_by_adamp(weight_decay=1e-2),
      ...                  optax.scale_by_learning_rate(1e-3))
      >>> params = {"kernel": jnp.ones((4, 3))}
      >>> updates, _ = tx.update(params, tx.init(params), params)
    """
    check_adam_hyperparameters(b1, b2, eps)
    check_interval("weight_decay", weight_decay, 0.0)
    check_interval("delta", delta, 0.0)
    check_interval("wd_ratio", wd_ratio, 0.0)

    def init_fn(params: PyTree) -> AdaptiveState:
        return init_adaptive_state(params, amsgrad=amsgrad, mu_dtype=mu_dtype)

    def update_fn(
        updates: PyTree, state: AdaptiveState, params: PyTree | None = None
    ) -> tuple[PyTree, AdaptiveState]:
        if params is None:
            raise ValueError(
                "scale_by_adamp needs params in update(): its projection tests the weights"
            )
        state, mu_hat, nu_hat = adaptive_step(updates, state, b1, b2)
        if nesterov:
            mu_hat = nesterov_momentum(state.mu, updates, b1, state.count)
        steps = adam_direction(mu_hat, nu_hat, eps)

        def leaf(step: jax.Array, grad: jax.Array, param: jax.Array) -> jax.Array:
            if param.ndim < 2:
                return step + weight_decay * param
            step, projected = _project_if_scale_invariant(param, grad, step, delta, eps)
            return step + weight_decay * jnp.where(projected, wd_ratio, 1.0) * param

        out = jax.tree.map(leaf, steps, updates, params)
        return cast_like(out, updates), state

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))
