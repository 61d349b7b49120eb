"""RAdam's rectification (Liu et al., 2020): the term, the block and the wrapper."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    AdaptiveState,
    PyTree,
    adam_direction,
    adaptive_step,
    bias_correct,
    cast_like,
    check_adam_hyperparameters,
    check_interval,
    check_same_structure,
    ema,
    init_adaptive_state,
    nesterov_momentum,
    scalar_float,
    trainable_leaves_only,
    zero_count,
)
from varjax.roles import Role

# --------------------------------------------------------------------------
# RAdam
# --------------------------------------------------------------------------


def _coth_minus_inverse(y: Any) -> jax.Array:
    """``coth(y) - 1/y`` without cancellation (a Taylor series below 0.5)."""
    y = scalar_float(y)
    y2 = y * y
    series = y / 3 - y * y2 / 45 + 2 * y * y2**2 / 945 - y * y2**3 / 4725 + 2 * y * y2**4 / 93555
    small = y < 0.5
    safe = jnp.where(small, 1.0, y)
    return jnp.where(small, series, 1 / jnp.tanh(safe) - 1 / safe)


def rectification(count: jax.Array, b2: Any, threshold: Any) -> tuple[jax.Array, jax.Array]:
    """RAdam's rectification term ``r_t`` and whether it applies at step ``count``.

    From Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and
    Beyond" (Algorithm 2): with ``rho_inf = 2 / (1 - b2) - 1`` and
    ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``, the adaptive step is used,
    multiplied by ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf /
    ((rho_inf - 4)(rho_inf - 2) rho_t))``, when ``rho_t >= threshold``.

    Args:
      count: the step number, 1 on the first step.
      b2: decay of the second-moment EMA of the rectified transform.
      threshold: smallest ``rho_t`` at which the adaptive step is used.

    Returns:
      ``(r_t, rectified)``: scalars (float32, or float64 under ``jax_enable_x64``);
      ``r_t`` is 0 where not rectified.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> [bool(varjax.rectification(jnp.asarray(t), 0.999, 5.0)[1]) for t in (5, 6)]
      [False, True]
      >>> round(float(varjax.rectification(jnp.asarray(1000), 0.999, 5.0)[0]), 4)  # rho_t 836
      0.6453
    """
    t = scalar_float(count)
    if isinstance(b2, (int, float)):  # host float64: exact rho_inf and log(b2)
        rho_inf = 2.0 / (1.0 - b2) - 1.0
        lam = -math.log(b2) if b2 > 0 else math.inf
    else:
        b2 = scalar_float(b2)
        rho_inf = 2.0 / (1.0 - b2) - 1.0
        lam = -jnp.log(b2)
    # With b2 = exp(-lam): rho_t = rho_inf - 2 t / expm1(lam t). For lam t < 1 the
    # two terms nearly cancel in float32; there rho_inf = coth(lam / 2) and
    # 2 t / expm1(lam t) = t (coth(lam t / 2) - 1), and writing coth(y) = 1/y + f(y)
    # the 2 / lam parts cancel exactly: rho_t = t + f(lam / 2) - t f(lam t / 2).
    x = lam * t
    early = x < 1.0
    rho_early = t + _coth_minus_inverse(lam / 2) - t * _coth_minus_inverse(jnp.minimum(x, 1.0) / 2)
    rho_late = rho_inf - 2.0 * t / jnp.expm1(jnp.maximum(x, 1.0))
    rho = jnp.where(early, rho_early, rho_late)
    rectified = rho >= threshold
    safe_rho = jnp.where(rectified, rho, rho_inf)
    numerator = (safe_rho - 4.0) * (safe_rho - 2.0) * rho_inf
    r = jnp.sqrt(numerator / ((rho_inf - 4.0) * (rho_inf - 2.0) * safe_rho))
    return jnp.where(rectified, r, 0.0), rectified


def _check_threshold(threshold: Any) -> None:
    check_interval("threshold", threshold, 4.0)


def scale_by_radam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """Rescale updates by Rectified Adam (Liu et al., 2020).

    While the variance of the adaptive learning rate is intractable
    (``rho_t < threshold``, the first few steps) the update is the
    bias-corrected momentum; afterwards it is Adam's step times ``r_t``
    (see [`rectification`][varjax.rectification.rectification]). The same method and arguments as
    ``optax.scale_by_radam``; it matches Optax run in float64, while
    Optax's float32 ``r_t`` is off by up to ~1% in the first rectified steps.

    *Threshold convention.* The paper computes the adaptive step when
    ``rho_t > 4``; its official code and Optax use ``rho_t >= 5`` (``threshold=5``,
    the default here). ``threshold=4`` gives the paper's condition up to the
    single step at which ``rho_t`` is exactly 4 (where ``r_t = 0``).

    *Peers.* pytorch-optimizer's ``RAdam`` adds ``eps`` to ``sqrt(nu)`` before the
    bias correction and, by default (``degenerated_to_sgd=False``), skips the
    update below the threshold; ``degenerated_to_sgd=True`` is this fallback.
    For the skip, use ``rectify(optax.scale_by_adam(), fallback="skip")``.

    Args:
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      eps_root: added to ``nu_hat`` inside the square root, >= 0.
      threshold: ``rho_t`` from which the adaptive step is used, >= 4.
      nesterov: use Nesterov momentum (as Optax does).
      amsgrad: use the running maximum of ``nu_hat`` (AMSGrad).
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.scale_by_radam(), optax.scale_by_learning_rate(1e-3))
      >>> params = {"w": jnp.ones(3)}
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params))
    """
    check_adam_hyperparameters(b1, b2, eps)
    check_interval("eps_root", eps_root, 0.0)
    _check_threshold(threshold)

    def init_fn(params: PyTree) -> AdaptiveState:
        return init_adaptive_state(params, amsgrad=amsgrad, mu_dtype=mu_dtype)

    def update_fn(
        updates: PyTree, state: AdaptiveState, params: PyTree | None = None
    ) -> tuple[PyTree, AdaptiveState]:
        del params
        new_state, mu_hat, nu_hat = adaptive_step(updates, state, b1, b2)
        if nesterov:
            mu_hat = nesterov_momentum(new_state.mu, updates, b1, new_state.count)
        r, rectified = rectification(new_state.count, b2, threshold)
        scaled = jax.tree.map(lambda m: r.astype(m.dtype) * m, mu_hat)  # (r m) / d, as before
        out = jax.tree.map(
            lambda d, m: jnp.where(rectified, d, m),
            adam_direction(scaled, nu_hat, eps, eps_root),
            mu_hat,
        )
        return cast_like(out, updates), new_state

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))


@roles.declare(count=Role.COUNT, inner_state=Role.NESTED, mu=Role.SIGNED)
class RectifyState(NamedTuple):
    """State of [`rectify`][varjax.rectify]: step count, inner state, fallback momentum (or
    None)."""

    count: jax.Array
    inner_state: optax.OptState
    mu: PyTree | None


Fallback = Literal["momentum", "sgd", "skip"]


def rectify(
    inner: optax.GradientTransformation,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    threshold: float = 5.0,
    fallback: Fallback = "momentum",
) -> optax.GradientTransformationExtraArgs:
    """RAdam's rectification around any adaptive transform.

    The inner transform runs (and updates its state) every step. Once ``rho_t >= threshold`` its
    update is multiplied by ``r_t`` ([`rectification`][varjax.rectification.rectification]); before
    that the fallback is used instead:

    * ``"momentum"`` (RAdam's choice): the bias-corrected EMA of the gradient
      with decay ``b1``, kept in this wrapper's state;
    * ``"sgd"``: the raw gradient;
    * ``"skip"``: a zero update (pytorch-optimizer's ``degenerated_to_sgd=False``).

    ``b2`` must be the decay of the inner transform's second-moment EMA: the
    rectification term measures the variance of *that* estimate. With
    ``inner=optax.scale_by_adam(b1, b2)`` and ``fallback="momentum"`` this is
    RAdam ([`scale_by_radam`][varjax.scale_by_radam] is the same method without the duplicated
    first moment).

    Args:
      inner: the adaptive transform, before the learning rate.
      b1: decay of the fallback momentum, in [0, 1).
      b2: decay of the inner second moment, in [0, 1).
      threshold: ``rho_t`` from which the inner update is used, >= 4.
      fallback: ``"momentum"``, ``"sgd"`` or ``"skip"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` that forwards extra args to
      ``inner``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(
      ...     varjax.rectify(varjax.scale_by_diffgrad(b2=0.999), b2=0.999),
      ...     optax.scale_by_learning_rate(1e-3))
      >>> state = tx.init({"w": jnp.ones(3)})
    """
    check_interval("b1", b1, 0.0, 1.0, high_closed=False)
    check_interval("b2", b2, 0.0, 1.0, high_closed=False)
    _check_threshold(threshold)
    if fallback not in ("momentum", "sgd", "skip"):
        raise ValueError(f"fallback must be 'momentum', 'sgd' or 'skip', got {fallback!r}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> RectifyState:
        mu = optax.tree.zeros_like(params) if fallback == "momentum" else None
        return RectifyState(count=zero_count(), inner_state=inner.init(params), mu=mu)

    def update_fn(
        updates: PyTree, state: RectifyState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, RectifyState]:
        count = optax.safe_increment(state.count)
        mu = state.mu
        if fallback == "momentum":  # before the inner transform, which may be Optax's
            check_same_structure(updates, mu, "rectify fallback momentum")
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        if fallback == "momentum":
            mu = ema(updates, mu, b1)
            not_rectified = bias_correct(mu, b1, count)
        elif fallback == "sgd":
            not_rectified = updates
        else:
            not_rectified = optax.tree.zeros_like(updates)
        r, rectified = rectification(count, b2, threshold)
        out = jax.tree.map(
            lambda u, f: jnp.where(rectified, r.astype(u.dtype) * u, f.astype(u.dtype)),
            inner_updates,
            not_rectified,
        )
        inner_state = cast_like(inner_state, state.inner_state)
        return cast_like(out, updates), RectifyState(count=count, inner_state=inner_state, mu=mu)

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))
