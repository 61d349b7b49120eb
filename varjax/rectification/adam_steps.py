"""Grams, diffGrad and Adam-atan2: Adam with another step from its two moments."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    AdaptiveState,
    PyTree,
    adam_direction,
    adaptive_step,
    cast_like,
    check_adam_hyperparameters,
    check_interval,
    init_adaptive_state,
    trainable_leaves_only,
)
from varjax.roles import Role

# --------------------------------------------------------------------------
# Grams, diffGrad, Adam-atan2: Adam with a different step from (mu_hat, nu_hat)
# --------------------------------------------------------------------------


def scale_by_grams(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    amsgrad: bool = False,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Rescale updates by Grams (Cao et al., 2024, "Grams: Gradient Descent with
    Adaptive Momentum Scaling").

    The magnitude of Adam's step with the sign of the current gradient:
    ``sign(g_t) * |mu_hat / (sqrt(nu_hat) + eps)|``.

    *Defaults.* ``eps=1e-8`` as in Adam and the paper; pytorch-optimizer's
    ``Grams`` uses ``eps=1e-6``.

    Args:
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      amsgrad: use the running maximum of ``nu_hat`` (AMSGrad).
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.scale_by_grams()
      >>> updates, _ = tx.update({"w": jnp.array([1.0, -2.0])}, tx.init({"w": jnp.zeros(2)}))
    """
    check_adam_hyperparameters(b1, b2, eps)

    def init_fn(params: PyTree) -> AdaptiveState:
        return init_adaptive_state(params, amsgrad=amsgrad, mu_dtype=mu_dtype)

    def update_fn(
        updates: PyTree, state: AdaptiveState, params: PyTree | None = None
    ) -> tuple[PyTree, AdaptiveState]:
        del params
        state, mu_hat, nu_hat = adaptive_step(updates, state, b1, b2)
        out = jax.tree.map(
            lambda d, g: jnp.sign(g) * jnp.abs(d), adam_direction(mu_hat, nu_hat, eps), updates
        )
        return cast_like(out, updates), state

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))


@roles.declare(adaptive=Role.NESTED, prev_grad=Role.EXACT)
class ScaleByDiffGradState(NamedTuple):
    """State of [`scale_by_diffgrad`][varjax.scale_by_diffgrad]: Adam's moments and the previous
    gradient."""

    adaptive: AdaptiveState
    prev_grad: PyTree


def scale_by_diffgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    amsgrad: bool = False,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Rescale updates by diffGrad (Dubey et al., 2019, "diffGrad: An Optimization
    Method for Convolutional Neural Networks").

    Adam's step with the first moment damped by the friction coefficient
    ``xi_t = sigmoid(|g_{t-1} - g_t|)``: ``xi_t * mu_hat / (sqrt(nu_hat) + eps)``,
    with ``g_0 = 0``. pytorch-optimizer's ``DiffGrad`` adds ``eps`` to ``sqrt(nu)``
    before the bias correction.

    Args:
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      amsgrad: use the running maximum of ``nu_hat`` (AMSGrad).
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformation``; its state also holds the previous
      gradient.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.scale_by_diffgrad()
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
    """
    check_adam_hyperparameters(b1, b2, eps)

    def init_fn(params: PyTree) -> ScaleByDiffGradState:
        return ScaleByDiffGradState(
            adaptive=init_adaptive_state(params, amsgrad=amsgrad, mu_dtype=mu_dtype),
            prev_grad=optax.tree.zeros_like(params),
        )

    def update_fn(
        updates: PyTree, state: ScaleByDiffGradState, params: PyTree | None = None
    ) -> tuple[PyTree, ScaleByDiffGradState]:
        del params
        adaptive, mu_hat, nu_hat = adaptive_step(updates, state.adaptive, b1, b2)
        out = jax.tree.map(
            lambda d, g, prev: jax.nn.sigmoid(jnp.abs(prev - g)) * d,
            adam_direction(mu_hat, nu_hat, eps),
            updates,
            state.prev_grad,
        )
        prev_grad = cast_like(updates, state.prev_grad)
        return cast_like(out, updates), ScaleByDiffGradState(adaptive, prev_grad)

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))


def scale_by_adam_atan2(
    b1: float = 0.9,
    b2: float = 0.999,
    a: float = 1.27,
    b: float = 1.0,
    *,
    amsgrad: bool = False,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Rescale updates by Adam-atan2 (Everett et al., 2024, "Scaling Exponents
    Across Parameterizations and Optimizers", section on eps).

    Replaces Adam's ``mu_hat / (sqrt(nu_hat) + eps)`` by
    ``a * atan2(mu_hat, b * sqrt(nu_hat))``: bounded by ``a * pi / 2``,
    scale-invariant in the gradient, and free of ``eps``.

    *Defaults.* ``a=1.27, b=1`` as in the widely used reference implementation
    (adam-atan2-pytorch), so that the step matches Adam's size where
    ``|mu_hat| ~ sqrt(nu_hat)``; the paper's plain form is ``a=b=1``. That
    implementation's default ``b2`` is 0.99; here it is Adam's 0.999.

    Args:
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      a: the output scale, > 0; the step is at most ``a * pi / 2`` per entry.
      b: the scale of ``sqrt(nu_hat)`` inside ``atan2``, > 0 (``eps`` has no
        counterpart: ``atan2`` is finite at zero).
      amsgrad: use the running maximum of ``nu_hat`` (AMSGrad).
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.scale_by_adam_atan2()
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
    """
    check_adam_hyperparameters(b1, b2, 0.0)
    check_interval("a", a, 0.0, low_closed=False)
    check_interval("b", b, 0.0, low_closed=False)

    def init_fn(params: PyTree) -> AdaptiveState:
        return init_adaptive_state(params, amsgrad=amsgrad, mu_dtype=mu_dtype)

    def update_fn(
        updates: PyTree, state: AdaptiveState, params: PyTree | None = None
    ) -> tuple[PyTree, AdaptiveState]:
        del params
        state, mu_hat, nu_hat = adaptive_step(updates, state, b1, b2)
        out = jax.tree.map(lambda m, v: a * jnp.arctan2(m, b * jnp.sqrt(v)), mu_hat, nu_hat)
        return cast_like(out, updates), state

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))
