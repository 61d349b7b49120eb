"""Ready optimizers assembled from the families' building blocks.

Each is ``optax.chain(block, add_decayed_weights(weight_decay, mask),
scale_by_learning_rate(learning_rate))``: decoupled weight decay as in AdamW
(``weight_decay=0`` by default, which makes it a no-op), and ``learning_rate``
and ``weight_decay`` accept a float or an ``optax.Schedule``. The whole chain
is wrapped in ``varjax._base.trainable_leaves_only``: integer and boolean
parameter leaves get a zero update of their own dtype and no state, and the
weight decay accepts ``params=None`` when ``weight_decay`` is zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from varjax import multi_ema, rectification, variance_reduction
from varjax._base import (
    ScalarOrSchedule,
    check_adam_hyperparameters,
    check_integer,
    check_interval,
    check_same_structure,
    trainable_leaves_only,
    without_params_if_no_decay,
)
from varjax.quantization import quantize_state
from varjax.roles import RoleOverride

__all__ = [
    "adam_4bit",
    "adam_8bit",
    "adam_atan2",
    "adamp",
    "adamw_4bit",
    "adamw_8bit",
    "ademamix",
    "ademamix_4bit",
    "ademamix_8bit",
    "adopt",
    "cautious_adamw",
    "diffgrad",
    "grams",
    "igt",
    "lion_4bit",
    "lion_8bit",
    "mars_adamw",
    "mars_lion",
    "mars_shampoo",
    "qhm",
    "radam",
    "simplified_ademamix",
]

MaskOrFn = Any | Callable[[optax.Params], Any] | None


def _with_decay_and_rate(
    block: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    """``block``, then decoupled weight decay, then the (negative) learning rate."""
    check_interval("learning_rate", learning_rate, 0.0)
    check_interval("weight_decay", weight_decay, 0.0)
    return trainable_leaves_only(
        optax.chain(
            block,
            without_params_if_no_decay(optax.add_decayed_weights(weight_decay, mask), weight_decay),
            optax.scale_by_learning_rate(learning_rate),
        )
    )


def radam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    threshold: float = 5.0,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Rectified Adam (Liu et al., 2020); see [`varjax.scale_by_radam`][].

    Same defaults and threshold convention (``rho_t >= 5``) as ``optax.radam``,
    and equal to it when ``weight_decay=0`` (up to Optax's float32 error in ``r_t``,
    see [`varjax.scale_by_radam`][]).

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      eps_root: added to ``nu_hat`` inside the square root, >= 0.
      threshold: ``rho_t`` from which the rectified adaptive step is used, >= 4
        (5 as Optax and the official code; 4 is the paper's rule).
      nesterov: use Nesterov momentum (as Optax does).
      amsgrad: use the running maximum of the bias-corrected second moment (AMSGrad).
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 0: none).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all), as in
        ``optax.add_decayed_weights``.
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, varjax
      >>> params = {"w": jnp.ones(3)}
      >>> tx = varjax.radam(1e-2)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
    """
    block = rectification.scale_by_radam(
        b1, b2, eps, eps_root, threshold, nesterov=nesterov, amsgrad=amsgrad, mu_dtype=mu_dtype
    )
    return _with_decay_and_rate(block, learning_rate, weight_decay, mask)


def adopt(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.9999,
    eps: float = 1e-6,
    *,
    clip_exponent: float | None = 0.25,
    nesterov: bool = False,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """ADOPT (Taniguchi et al., 2024); see [`varjax.scale_by_adopt`][].

    Equal to ``optax.contrib.adopt`` when ``weight_decay=0``, up to Optax's
    float32 rounding of ``1 - b2`` (about 1e-4 relative drift over 60 steps).

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: momentum decay, in [0, 1).
      b2: second-moment decay, in [0, 1) (0.9999 as the paper).
      eps: lower bound of ``sqrt(v)``, >= 0 (1e-6 as the paper).
      clip_exponent: the normalised gradient is clipped to ``t **
        clip_exponent``, >= 0; ``None`` for no clip.
      nesterov: use Nesterov momentum (as Optax does).
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 0: none).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all), as in
        ``optax.add_decayed_weights``.
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.adopt(1e-3, weight_decay=1e-2)
      >>> params = {"w": jnp.ones(3)}
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
      >>> [round(float(u), 9) for u in updates["w"]]  # ADOPT's first step is 0: decay only
      [-1e-05, -1e-05, -1e-05]
    """
    block = rectification.scale_by_adopt(
        b1, b2, eps, clip_exponent=clip_exponent, nesterov=nesterov, mu_dtype=mu_dtype
    )
    return _with_decay_and_rate(block, learning_rate, weight_decay, mask)


def grams(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    amsgrad: bool = False,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Grams (Cao et al., 2024); see [`varjax.scale_by_grams`][].

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      amsgrad: use the running maximum of the bias-corrected second moment (AMSGrad).
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 0: none).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all), as in
        ``optax.add_decayed_weights``.
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.grams(1e-3)
      >>> params = {"w": jnp.zeros(2)}
      >>> updates, state = tx.update({"w": jnp.asarray([1.0, -2.0])}, tx.init(params), params)
      >>> updates["w"]  # Adam's first step, with the sign of the gradient
      Array([-0.001,  0.001], dtype=float32)
    """
    block = rectification.scale_by_grams(b1, b2, eps, amsgrad=amsgrad, mu_dtype=mu_dtype)
    return _with_decay_and_rate(block, learning_rate, weight_decay, mask)


def diffgrad(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    amsgrad: bool = False,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """diffGrad (Dubey et al., 2019); see [`varjax.scale_by_diffgrad`][].

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      amsgrad: use the running maximum of the bias-corrected second moment (AMSGrad).
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 0: none).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all), as in
        ``optax.add_decayed_weights``.
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.diffgrad(1e-3)
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    block = rectification.scale_by_diffgrad(b1, b2, eps, amsgrad=amsgrad, mu_dtype=mu_dtype)
    return _with_decay_and_rate(block, learning_rate, weight_decay, mask)


def adam_atan2(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    a: float = 1.27,
    b: float = 1.0,
    *,
    amsgrad: bool = False,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Adam-atan2 (Everett et al., 2024); see [`varjax.scale_by_adam_atan2`][].

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      a: the output scale, > 0; the step is at most ``a * pi / 2`` per entry.
      b: the scale of ``sqrt(nu_hat)`` inside ``atan2``, > 0.
      amsgrad: use the running maximum of the bias-corrected second moment (AMSGrad).
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 0: none).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all), as in
        ``optax.add_decayed_weights``.
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.adam_atan2(1e-3)
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    block = rectification.scale_by_adam_atan2(b1, b2, a, b, amsgrad=amsgrad, mu_dtype=mu_dtype)
    return _with_decay_and_rate(block, learning_rate, weight_decay, mask)


def adamp(
    learning_rate: ScalarOrSchedule,
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
) -> optax.GradientTransformationExtraArgs:
    """AdamP (Heo et al., 2021); see [`varjax.scale_by_adamp`][].

    The weight decay lives in the block (scale-invariant weights get
    ``wd_ratio`` of it), so it is a float here rather than a schedule.

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      weight_decay: decoupled weight decay, a float >= 0 (0: none); scale-invariant
        weights get ``wd_ratio`` times it.
      delta: the cosine threshold of the scale-invariance test, >= 0 (0.1 as the paper).
      wd_ratio: the factor on ``weight_decay`` for projected weights, >= 0.
      nesterov: use Nesterov momentum in the step (the paper's option).
      amsgrad: use the running maximum of the bias-corrected second moment (AMSGrad).
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.adamp(1e-3, weight_decay=1e-2)
      >>> params = {"kernel": jnp.ones((4, 3))}
      >>> updates, state = tx.update(params, tx.init(params), params)
    """
    check_interval("learning_rate", learning_rate, 0.0)
    block = rectification.scale_by_adamp(
        b1,
        b2,
        eps,
        weight_decay=weight_decay,
        delta=delta,
        wd_ratio=wd_ratio,
        nesterov=nesterov,
        amsgrad=amsgrad,
        mu_dtype=mu_dtype,
    )
    return trainable_leaves_only(optax.chain(block, optax.scale_by_learning_rate(learning_rate)))


def cautious_adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    """Cautious AdamW (Liang et al., 2024): [`varjax.cautious`][] around ``optax.scale_by_adam``.

    The weight decay is added after the mask, as in the paper's C-AdamW, and
    defaults to Optax's ``adamw`` value.

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 1e-4, as ``optax.adamw``).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all), as in
        ``optax.add_decayed_weights``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.cautious_adamw(1e-3)
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    check_adam_hyperparameters(b1, b2, eps)
    block = rectification.cautious(optax.scale_by_adam(b1, b2, eps))
    return _with_decay_and_rate(block, learning_rate, weight_decay, mask)


def ademamix(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    alpha: float = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    alpha_warmup_steps: int | None = None,
    b3_warmup_steps: int | None = None,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """AdEMAMix (Pagliardini et al., 2024); see [`varjax.scale_by_ademamix`][].

    With ``alpha_warmup_steps`` / ``b3_warmup_steps`` set, ``alpha`` and ``b3``
    follow the paper's warm-ups ([`varjax.ademamix_alpha_schedule`][],
    [`varjax.ademamix_beta3_schedule`][]); the paper sets both to the total
    number of training steps. Without them this equals
    ``optax.contrib.ademamix`` (whose defaults it shares, ``weight_decay=0``
    included; the paper trains with decoupled weight decay 0.1).

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: decay of the fast EMA (bias-corrected), in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      b3: decay of the slow EMA, in [0, 1) (0.9999 as the paper); with
        ``b3_warmup_steps``, the value the warm-up ends at, above ``b1``.
      alpha: weight of the slow EMA, >= 0 (the paper uses 4 to 10); with
        ``alpha_warmup_steps``, the value the warm-up ends at.
      eps: added to ``sqrt(nu_hat)``, >= 0.
      eps_root: added to ``nu_hat`` inside the square root, >= 0.
      alpha_warmup_steps: warm ``alpha`` up linearly from 0 over this many steps
        ([`varjax.ademamix_alpha_schedule`][]), >= 1; ``None``: constant.
      b3_warmup_steps: warm ``b3`` up from ``b1`` over this many steps
        ([`varjax.ademamix_beta3_schedule`][]), >= 1; ``None``: constant.
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 0, as Optax; the paper trains with 0.1).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all), as in
        ``optax.add_decayed_weights``.
      mu_dtype: dtype of the first moment; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import varjax
      >>> tx = varjax.ademamix(1e-3, alpha=8.0, alpha_warmup_steps=10_000, b3_warmup_steps=10_000)
    """
    alpha_warmup_steps = check_integer("alpha_warmup_steps", alpha_warmup_steps, 1, allow_none=True)
    b3_warmup_steps = check_integer("b3_warmup_steps", b3_warmup_steps, 1, allow_none=True)
    if alpha_warmup_steps is not None:
        alpha = multi_ema.ademamix_alpha_schedule(alpha, alpha_warmup_steps)
    if b3_warmup_steps is not None:
        b3 = multi_ema.ademamix_beta3_schedule(b3, b3_warmup_steps, b1=b1)
    block = multi_ema.scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype=mu_dtype)
    return _with_decay_and_rate(block, learning_rate, weight_decay, mask)


def simplified_ademamix(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.99,
    b2: float = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    """Simplified AdEMAMix (Morwani et al., 2025); see [`varjax.scale_by_simplified_ademamix`][].

    Equal to ``optax.contrib.simplified_ademamix``, whose defaults it shares.
    Its momentum sums gradients (about ``1 / (1 - b1)`` times larger than an EMA),
    so it wants a learning rate that much smaller than Adam's.

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: decay of the momentum that sums gradients, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      alpha: weight of the current gradient added to the momentum, >= 0, or a schedule.
      eps: added to ``sqrt(nu_hat)``, >= 0.
      eps_root: added to ``nu_hat`` inside the square root, >= 0.
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 0: none).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all), as in
        ``optax.add_decayed_weights``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.simplified_ademamix(1e-4, alpha=2.0)
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    block = multi_ema.scale_by_simplified_ademamix(b1, b2, alpha, eps, eps_root)
    return _with_decay_and_rate(block, learning_rate, weight_decay, mask)


def _mars(
    *,
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    gamma: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule,
    exact: bool,
    optimize_1d: bool,
    learning_rate_1d: ScalarOrSchedule | None,
    b1_1d: float,
    b2_1d: float,
    weight_decay_1d: ScalarOrSchedule,
    max_norm: float | None,
    norm_scope: str,
    amsgrad: bool,
    preconditioner: str,
) -> optax.GradientTransformationExtraArgs:
    """The body of ``mars_adamw``, ``mars_lion`` and ``mars_shampoo``, which pass it
    their arguments and their ``preconditioner`` (and ``amsgrad=False`` but for AdamW):
    the MARS step on matrices, AdamW on the other leaves unless ``optimize_1d``."""
    block = variance_reduction.scale_by_mars(
        b1,
        b2,
        eps,
        gamma,
        preconditioner=preconditioner,
        exact=exact,
        max_norm=max_norm,
        norm_scope=norm_scope,
        amsgrad=amsgrad,
    )
    mars = _with_decay_and_rate(block, learning_rate, weight_decay)
    if optimize_1d:
        return mars
    check_interval("b1_1d", b1_1d, 0.0, 1.0, high_closed=False)
    check_interval("b2_1d", b2_1d, 0.0, 1.0, high_closed=False)
    check_interval("weight_decay_1d", weight_decay_1d, 0.0)  # named here, not as weight_decay
    if learning_rate_1d is not None:
        check_interval("learning_rate_1d", learning_rate_1d, 0.0)
    rate_1d = learning_rate if learning_rate_1d is None else learning_rate_1d
    adamw_1d = _with_decay_and_rate(
        optax.scale_by_adam(b1_1d, b2_1d, eps), rate_1d, weight_decay_1d
    )

    def labels(params: optax.Params) -> Any:
        return jax.tree.map(lambda p: "mars" if jnp.ndim(p) == 2 else "adamw_1d", params)

    partition = optax.partition(
        {"mars": mars, "adamw_1d": adamw_1d}, labels, mask_compatible_extra_args=True
    )

    def update_fn(
        updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, Any]:
        # each group's first moment holds its leaves and a MaskedNode for the other
        # group's: together they name every leaf the gradients must have
        groups = state.inner_states
        moments = (groups["mars"].inner_state[0][1].mu, groups["adamw_1d"].inner_state[0].mu)
        for group_moment in moments:
            check_same_structure(updates, group_moment, "optimizer state")
        return partition.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(partition.init, update_fn)


def mars_adamw(
    learning_rate: ScalarOrSchedule = 3e-3,
    b1: float = 0.95,
    b2: float = 0.99,
    eps: float = 1e-8,
    gamma: ScalarOrSchedule = 0.025,
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    exact: bool = False,
    optimize_1d: bool = False,
    learning_rate_1d: ScalarOrSchedule | None = None,
    b1_1d: float = 0.9,
    b2_1d: float = 0.95,
    weight_decay_1d: ScalarOrSchedule = 0.1,
    max_norm: float | None = 1.0,
    norm_scope: str = "tensor",
    amsgrad: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """MARS-AdamW (Yuan et al., 2024): the variance-reduced gradient fed to AdamW.

    See [`scale_by_mars`][varjax.scale_by_mars] for the step. Matrices (``ndim == 2``)
    take the MARS step; other leaves (biases, norms, scalars, and convolution
    kernels) take plain AdamW with ``b1_1d``, ``b2_1d``, ``learning_rate_1d``
    (``None``: the same as ``learning_rate``) and ``weight_decay_1d``, as the official
    code does with ``optimize_1d=False``; ``optimize_1d=True`` gives every leaf the
    MARS step. (pytorch-optimizer's ``MARS`` sends every leaf with ``ndim >= 2`` to
    MARS.) Defaults are the official ones: ``b1=0.95, b2=0.99, gamma=0.025,
    weight_decay=0``, and ``b1_1d=0.9, b2_1d=0.95, weight_decay_1d=0.1``; the
    official ``lr_1d=3e-3`` equals the default learning rate. Weight decay is
    decoupled and scaled by the learning rate, as in the official code. With
    ``exact=True`` pass ``previous_grads`` to ``update`` (see
    [`mars_value_and_grad`][varjax.mars_value_and_grad]).
    [`mars_lion`][varjax.mars_lion] and [`mars_shampoo`][varjax.mars_shampoo] take
    the same arguments (but ``amsgrad``) with another step on the matrices.

    Args:
      learning_rate: the step size of the MARS leaves (and of the others unless
        ``learning_rate_1d`` is set), a float >= 0 or an ``optax.Schedule``
        (3e-3 as the official code).
      b1: decay of the momentum of the corrected gradient, in [0, 1); it also
        sets the correction's scale ``gamma * b1 / (1 - b1)``.
      b2: decay of the second moment of ``c_t``, in [0, 1).
      eps: added to the denominator ``sqrt(v_hat)``, >= 0 (also for the AdamW
        step of the other leaves).
      gamma: the weight of the gradient correction, >= 0, or a schedule
        (0: no correction).
      weight_decay: decoupled weight decay of the MARS leaves, scaled by the
        learning rate; a float >= 0 or a schedule (default 0: none).
      exact: the exact form: ``update`` takes ``previous_grads``, the gradient
        at the previous parameters on the current batch. ``False`` (default):
        the approximate form, with the previous step's gradient kept in the state.
      optimize_1d: give every leaf the MARS step; ``False`` (default): matrices
        only, the other leaves take AdamW.
      learning_rate_1d: the step size of the other leaves, a float >= 0 or a
        schedule; ``None`` (default): ``learning_rate``.
      b1_1d: decay of the first moment of the other leaves' AdamW, in [0, 1).
      b2_1d: decay of the second moment of the other leaves' AdamW, in [0, 1).
      weight_decay_1d: decoupled weight decay of the other leaves, a float >= 0
        or a schedule (0.1 as the official code).
      max_norm: ``c_t`` is rescaled to this norm where its norm exceeds
        it, > 0; ``None``: no clip.
      norm_scope: ``"tensor"`` (default, the official code): one norm per leaf;
        ``"global"``: one norm over the tree.
      amsgrad: use the running maximum of the bias-corrected second moment
        (AMSGrad) in the MARS step.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes
      ``previous_grads`` when ``exact=True``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = varjax.mars_adamw(3e-3)
      >>> params = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
      >>> grads = {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}
      >>> updates, state = tx.update(grads, tx.init(params), params)
    """
    return _mars(**locals(), preconditioner="adamw")


def mars_lion(
    learning_rate: ScalarOrSchedule = 3e-3,
    b1: float = 0.95,
    b2: float = 0.99,
    eps: float = 1e-8,
    gamma: ScalarOrSchedule = 0.025,
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    exact: bool = False,
    optimize_1d: bool = False,
    learning_rate_1d: ScalarOrSchedule | None = None,
    b1_1d: float = 0.9,
    b2_1d: float = 0.95,
    weight_decay_1d: ScalarOrSchedule = 0.1,
    max_norm: float | None = 1.0,
    norm_scope: str = "tensor",
) -> optax.GradientTransformationExtraArgs:
    """MARS-Lion (Yuan et al., 2024): ``sign`` of the EMA of the corrected gradient.

    [`mars_adamw`][varjax.mars_adamw] with Lion's sign step on the matrices: the
    same split of the leaves, defaults and ``exact`` form. The official
    hyper-parameters were tuned for MARS-AdamW: tune the learning rate (sign steps
    are larger; Lion's rule of thumb is 3-10x smaller).

    Args:
      learning_rate: the step size of the MARS leaves, and of the others unless
        ``learning_rate_1d`` is set; a float >= 0 or a schedule.
      b1: decay of the momentum of the corrected gradient, in [0, 1).
      b2: unused: the sign step has no second moment (the other leaves'
        AdamW takes ``b2_1d``).
      eps: only for the AdamW step of the other leaves, >= 0.
      gamma: the weight of the gradient correction, >= 0, or a schedule.
      weight_decay: decoupled weight decay of the MARS leaves (default 0).
      exact: ``update`` takes ``previous_grads`` (the exact form).
      optimize_1d: give every leaf the sign step.
      learning_rate_1d: the step size of the other leaves (``None``: ``learning_rate``).
      b1_1d: decay of the first moment of the other leaves' AdamW.
      b2_1d: decay of the second moment of the other leaves' AdamW.
      weight_decay_1d: decoupled weight decay of the other leaves (0.1).
      max_norm: the clip of the corrected gradient's norm (``None``: none).
      norm_scope: ``"tensor"`` or ``"global"``, as in ``mars_adamw``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.mars_lion(3e-4)
      >>> state = tx.init({"kernel": jnp.ones((4, 3))})
    """
    return _mars(**locals(), preconditioner="lion", amsgrad=False)


def mars_shampoo(
    learning_rate: ScalarOrSchedule = 3e-3,
    b1: float = 0.95,
    b2: float = 0.99,
    eps: float = 1e-8,
    gamma: ScalarOrSchedule = 0.025,
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    exact: bool = False,
    optimize_1d: bool = False,
    learning_rate_1d: ScalarOrSchedule | None = None,
    b1_1d: float = 0.9,
    b2_1d: float = 0.95,
    weight_decay_1d: ScalarOrSchedule = 0.1,
    max_norm: float | None = 1.0,
    norm_scope: str = "tensor",
) -> optax.GradientTransformationExtraArgs:
    """MARS-Shampoo (Yuan et al., 2024): the momentum orthogonalised by Newton-Schulz.

    [`mars_adamw`][varjax.mars_adamw] with another step on the matrices: ``U V^T``
    of the momentum (five quintic Newton-Schulz iterations in float32, the
    official coefficients; the official code iterates in bfloat16), scaled by
    ``sqrt(max(1, rows / cols))``. Tune the learning rate: the official values
    were tuned for MARS-AdamW.

    Args:
      learning_rate: the step size, for every leaf unless ``learning_rate_1d``
        is set (a float >= 0 or a schedule).
      b1: decay of the momentum that is orthogonalised, in [0, 1).
      b2: Adam's second-moment decay, for the leaves other than matrices that
        ``optimize_1d=True`` gives this step; the matrices' step does not use it.
      eps: the Newton-Schulz normalisation's ``eps``, and AdamW's, >= 0.
      gamma: how much of the gradient correction is added, >= 0 (or a schedule).
      weight_decay: the matrices' decoupled weight decay (default 0).
      exact: the exact form, with ``previous_grads`` passed to ``update``.
      optimize_1d: give every leaf the orthogonalised step.
      learning_rate_1d: the other leaves' step size (``None``: ``learning_rate``).
      b1_1d: the other leaves' first-moment decay.
      b2_1d: the other leaves' second-moment decay.
      weight_decay_1d: the other leaves' decoupled weight decay (0.1).
      max_norm: the corrected gradient is clipped to this norm (``None``: never).
      norm_scope: one norm per leaf (``"tensor"``) or over the tree (``"global"``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.mars_shampoo(1e-2)
      >>> state = tx.init({"kernel": jnp.ones((4, 3))})
    """
    return _mars(**locals(), preconditioner="shampoo", amsgrad=False)


def qhm(
    learning_rate: ScalarOrSchedule,
    b: float = 0.999,
    nu: float = 0.7,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    """Quasi-hyperbolic momentum SGD (Ma & Yarats, 2019): ``-lr ((1 - nu) g + nu m)``.

    See [`varjax.scale_by_qhm`][]; ``weight_decay`` is decoupled (AdamW-style).

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b: decay of the momentum (an EMA), in [0, 1].
      nu: weight of the momentum against the raw gradient, in [0, 1] (0: SGD).
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 0: none).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all), as in
        ``optax.add_decayed_weights``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.qhm(0.1)
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    return _with_decay_and_rate(
        variance_reduction.scale_by_qhm(b, nu), learning_rate, weight_decay, mask
    )


def igt(
    learning_rate: ScalarOrSchedule, gamma: float | None = None
) -> optax.GradientTransformationExtraArgs:
    """SGD with implicit gradient transport (Arnold et al., 2019).

    ``v_t = gamma_t v_{t-1} + (1 - gamma_t) g(theta_t + gamma_t / (1 - gamma_t)
    (theta_t - theta_{t-1}))`` and ``theta_{t+1} = theta_t - lr v_t``; the caller's
    parameters are the extrapolated point and [`varjax.igt_eval_params`][]
    gives ``theta``. ``gamma=None`` is the anytime average ``t / (t + 1)``
    (the paper's IGT, whose transport is exact on quadratics: on Rosenbrock it
    stalls near loss 0.3 where ``gamma=0.9`` converges); a float is Heavyball-IGT.

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      gamma: the momentum decay, in [0, 1); ``None`` (default): the anytime
        average ``t / (t + 1)``, the paper's IGT.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.igt(0.1, gamma=0.9)
      >>> params = {"w": jnp.ones(3)}
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
      >>> theta = varjax.igt_eval_params(state)
    """
    check_interval("learning_rate", learning_rate, 0.0)
    if gamma is not None:
        check_interval("gamma", gamma, 0.0, 1.0, high_closed=False)
    decay = variance_reduction.anytime_average if gamma is None else gamma
    inner = optax.chain(
        multi_ema.multi_ema((decay,), (1.0,), (False,)),
        optax.scale_by_learning_rate(learning_rate),
    )
    return trainable_leaves_only(variance_reduction.implicit_gradient_transport(inner, gamma))


def _adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    """AdamW: ``optax.scale_by_adam``, decoupled weight decay, the learning rate.

    The full-precision alias of [`varjax.adamw_8bit`][] and the other quantized Adams.

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 1e-4).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all).
    """
    check_adam_hyperparameters(b1, b2, eps)
    return _with_decay_and_rate(_checked_adam(b1, b2, eps), learning_rate, weight_decay, mask)


def _checked_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """``optax.scale_by_adam``, with the gradient tree checked against its first moment
    (a ``ValueError`` naming the leaf, where Optax's tree map would fail on its own)."""
    adam = optax.scale_by_adam(b1, b2, eps)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        check_same_structure(updates, state.mu, "optimizer state")
        return adam.update(updates, state, params)

    return optax.GradientTransformation(adam.init, update_fn)


def _lion(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: ScalarOrSchedule = 1e-3,
    *,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    """Lion (Chen et al., 2023): ``optax.scale_by_lion``, weight decay, the learning rate.

    The full-precision alias of [`varjax.lion_8bit`][] and [`varjax.lion_4bit`][].

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: Lion's interpolation between momentum and gradient for the step, in [0, 1].
      b2: decay of Lion's momentum, in [0, 1].
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 1e-3).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all).
    """
    check_interval("b1", b1, 0.0, 1.0)
    check_interval("b2", b2, 0.0, 1.0)
    block = optax.scale_by_lion(b1, b2)
    return _with_decay_and_rate(block, learning_rate, weight_decay, mask)


_QUANTIZATION_OPTIONS = ("block_size", "min_size", "stochastic_rounding", "roles")


def _quantized(
    full: Callable[..., optax.GradientTransformation],
    bits: int,
    arguments: Mapping[str, Any],
    **fixed: Any,
) -> optax.GradientTransformationExtraArgs:
    """The one builder of the quantized aliases: the full-precision alias ``full``,
    called with ``arguments`` (a quantized alias's own, less its quantization options)
    and ``fixed``, inside ``quantize_state`` at ``bits``: one wrapper around the whole
    chain, weight decay and learning rate included."""
    arguments = dict(arguments)
    options = {name: arguments.pop(name) for name in _QUANTIZATION_OPTIONS}
    return quantize_state(full(**arguments, **fixed), bits=bits, **options)


def adam_8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int | None = None,
    min_size: int | None = None,
    stochastic_rounding: bool = False,
    roles: RoleOverride = None,
) -> optax.GradientTransformationExtraArgs:
    """Adam with 8-bit state (Dettmers et al., 2022), as bitsandbytes' ``Adam8bit``.

    Its state is kept block-wise quantized by [`quantize_state`][varjax.quantize_state]
    at 8 bits (bitsandbytes' dynamic maps): about 2.04 bytes per parameter for the
    two moments instead of 8. The quantizer holds the whole optimizer, learning rate
    included, so a step with a non-finite gradient (or one that overflows the state)
    is skipped whole: zero updates, the state and any learning-rate schedule
    unchanged, and ``state.skipped`` counts it. Inside ``optax.inject_hyperparams``
    the learning rate and betas can be injected; an explicit ``block_size`` or
    ``min_size`` must then be named in ``static_args``.

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      block_size: entries per quantization block along the last axis, an
        int >= 1 (each block keeps one float32 absmax); ``None``: 256 at 8 bits,
        128 at 4 bits.
      min_size: leaves of the state with fewer elements stay in float32, an
        int >= 0; ``None``: 4096.
      stochastic_rounding: round each entry stochastically (unbiased) between
        its two nearest codes; ``False`` (default): to the nearest code, as
        bitsandbytes.
      roles: overrides the declared role of chosen state leaves, as in
        [`quantize_state`][varjax.quantize_state]: ``{"embed": Role.EXACT}`` keeps
        the state of every parameter whose path names ``embed`` in float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`QuantizedState`][varjax.quantization.QuantizedState].

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.adam_8bit(1e-3)
      >>> state = tx.init({"w": jnp.zeros((128, 64))})
    """
    return _quantized(_adamw, 8, locals(), weight_decay=0.0, mask=None)


def adam_4bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int | None = None,
    min_size: int | None = None,
    stochastic_rounding: bool = False,
    roles: RoleOverride = None,
) -> optax.GradientTransformationExtraArgs:
    """Adam with 4-bit state (Li et al., 2023, "Memory Efficient Optimizers with 4-bit States").

    [`adam_8bit`][varjax.adam_8bit] with the maps of Li et al. (2023) at 4 bits:
    about 1.06 bytes per parameter for the two moments. The same quantizer around
    the whole optimizer (non-finite steps skipped whole; ``block_size`` or
    ``min_size`` in ``static_args`` of ``optax.inject_hyperparams``).

    Args:
      learning_rate: the step size (a float >= 0 or a schedule).
      b1: the first moment's decay, in [0, 1).
      b2: the second moment's decay, in [0, 1).
      eps: added to the root of the second moment, >= 0.
      block_size: entries per block of 4-bit codes (``None``: 128).
      min_size: smaller state leaves stay in float32 (``None``: 4096).
      stochastic_rounding: round to one of the two nearest codes at random.
      roles: role overrides for chosen state leaves.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a quantized state).

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> state = varjax.adam_4bit(1e-3).init({"w": jnp.zeros((128, 64))})
      >>> state.skipped
      Array(0, dtype=int32)
    """
    return _quantized(_adamw, 4, locals(), weight_decay=0.0, mask=None)


def adamw_8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    *,
    mask: MaskOrFn = None,
    block_size: int | None = None,
    min_size: int | None = None,
    stochastic_rounding: bool = False,
    roles: RoleOverride = None,
) -> optax.GradientTransformationExtraArgs:
    """AdamW with 8-bit state; ``weight_decay=1e-4`` as ``optax.adamw`` (bitsandbytes'
    ``AdamW8bit`` defaults to 1e-2).

    [`adam_8bit`][varjax.adam_8bit] with decoupled weight decay, inside the same
    quantizer: the weight decay is skipped with the rest of a non-finite step, and
    can be injected by ``optax.inject_hyperparams`` with the learning rate and betas.

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: decay of the first-moment EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 1e-4).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all).
      block_size: as in [`adam_8bit`][varjax.adam_8bit] (``None``: 256).
      min_size: state leaves with fewer elements stay in float32 (``None``: 4096).
      stochastic_rounding: round stochastically (unbiased) rather than to the
        nearest code.
      roles: overrides the declared role of chosen state leaves (see
        [`quantize_state`][varjax.quantize_state]).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`QuantizedState`][varjax.quantization.QuantizedState].

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.inject_hyperparams(varjax.adamw_8bit)(learning_rate=1e-3)
      >>> state = tx.init({"w": jnp.zeros((128, 64))})
    """
    return _quantized(_adamw, 8, locals())


def adamw_4bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    *,
    mask: MaskOrFn = None,
    block_size: int | None = None,
    min_size: int | None = None,
    stochastic_rounding: bool = False,
    roles: RoleOverride = None,
) -> optax.GradientTransformationExtraArgs:
    """AdamW with 4-bit state (Li et al., 2023). ``weight_decay=1e-4`` as ``optax.adamw``.

    [`adamw_8bit`][varjax.adamw_8bit] at 4 bits, with the maps of
    [`adam_4bit`][varjax.adam_4bit].

    Args:
      learning_rate: the step size (a float >= 0 or a schedule).
      b1: the first moment's decay, in [0, 1).
      b2: the second moment's decay, in [0, 1).
      eps: added to the root of the second moment, >= 0.
      weight_decay: decoupled, scaled by the learning rate (a float or a schedule).
      mask: the leaves that decay (``None``: all).
      block_size: entries per block of 4-bit codes (``None``: 128).
      min_size: smaller state leaves stay in float32 (``None``: 4096).
      stochastic_rounding: round to one of the two nearest codes at random.
      roles: role overrides for chosen state leaves.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a quantized state).

    Examples:
      >>> import varjax
      >>> tx = varjax.adamw_4bit(1e-3, weight_decay=1e-2, block_size=64)
    """
    return _quantized(_adamw, 4, locals())


def lion_8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: ScalarOrSchedule = 1e-3,
    *,
    mask: MaskOrFn = None,
    block_size: int | None = None,
    min_size: int | None = None,
    stochastic_rounding: bool = False,
    roles: RoleOverride = None,
) -> optax.GradientTransformationExtraArgs:
    """Lion (Chen et al., 2023) with 8-bit momentum; ``weight_decay=1e-3`` as ``optax.lion``.

    ``optax.scale_by_lion``, decoupled weight decay and the learning rate, inside
    the quantizer of [`adam_8bit`][varjax.adam_8bit]: one moment, about 1.02 bytes
    per parameter instead of 4.

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule`` of the step count.
      b1: Lion's interpolation between momentum and gradient for the step, in [0, 1].
      b2: decay of Lion's momentum, in [0, 1].
      weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``; a
        float >= 0 or a schedule (default 1e-3).
      mask: which leaves decay: a pytree of booleans like the parameters, or a
        function of the parameters returning one (``None``: all).
      block_size: entries per quantization block of the momentum (``None``: 256).
      min_size: a momentum leaf with fewer elements stays in float32 (``None``: 4096).
      stochastic_rounding: round the momentum stochastically (unbiased).
      roles: overrides the declared role of chosen state leaves, as in
        [`quantize_state`][varjax.quantize_state].

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`QuantizedState`][varjax.quantization.QuantizedState].

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.lion_8bit(1e-4)
      >>> state = tx.init({"w": jnp.zeros((128, 64))})
    """
    return _quantized(_lion, 8, locals())


def lion_4bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: ScalarOrSchedule = 1e-3,
    *,
    mask: MaskOrFn = None,
    block_size: int | None = None,
    min_size: int | None = None,
    stochastic_rounding: bool = False,
    roles: RoleOverride = None,
) -> optax.GradientTransformationExtraArgs:
    """Lion with 4-bit momentum; ``weight_decay=1e-3`` as ``optax.lion``.

    [`lion_8bit`][varjax.lion_8bit] at 4 bits, with the maps of
    [`adam_4bit`][varjax.adam_4bit].

    Args:
      learning_rate: the step size (a float >= 0 or a schedule).
      b1: the weight of the momentum in the sign step, in [0, 1].
      b2: the momentum's decay, in [0, 1].
      weight_decay: decoupled, scaled by the learning rate (a float or a schedule).
      mask: the leaves that decay (``None``: all).
      block_size: entries per block of 4-bit codes (``None``: 128).
      min_size: smaller state leaves stay in float32 (``None``: 4096).
      stochastic_rounding: round to one of the two nearest codes at random.
      roles: role overrides for chosen state leaves.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a quantized state).

    Examples:
      >>> import varjax
      >>> tx = varjax.lion_4bit(1e-4, stochastic_rounding=True)
    """
    return _quantized(_lion, 4, locals())


def ademamix_8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    alpha: float = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    alpha_warmup_steps: int | None = None,
    b3_warmup_steps: int | None = None,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    mu_dtype: Any = None,
    block_size: int | None = None,
    min_size: int | None = None,
    stochastic_rounding: bool = False,
    roles: RoleOverride = None,
) -> optax.GradientTransformationExtraArgs:
    """AdEMAMix ([`ademamix`][varjax.ademamix]) with its three moments in 8 bits, as
    bitsandbytes' ``AdEMAMix8bit``.

    The whole of [`ademamix`][varjax.ademamix] inside the quantizer of
    [`adam_8bit`][varjax.adam_8bit]: about 3.05 bytes per parameter instead of 12.

    Args:
      learning_rate: the step size, a float >= 0 or an ``optax.Schedule``.
      b1: decay of the fast EMA, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      b3: decay of the slow EMA, in [0, 1) (with ``b3_warmup_steps``, where its
        warm-up ends).
      alpha: weight of the slow EMA, >= 0 (with ``alpha_warmup_steps``, where its
        warm-up ends).
      eps: added to the root of the second moment, >= 0.
      eps_root: added to the second moment inside the root, >= 0.
      alpha_warmup_steps: the steps of ``alpha``'s linear warm-up (``None``: none).
      b3_warmup_steps: the steps of ``b3``'s warm-up from ``b1`` (``None``: none).
      weight_decay: decoupled weight decay, a float >= 0 or a schedule (default 0).
      mask: which leaves decay (``None``: all).
      mu_dtype: dtype of the fast EMA before quantization (``None``: the
        parameters').
      block_size: entries per quantization block of each moment (``None``: 256).
      min_size: moment leaves with fewer elements stay in float32 (``None``: 4096).
      stochastic_rounding: round each moment stochastically (unbiased).
      roles: overrides the declared role of chosen state leaves, as in
        [`quantize_state`][varjax.quantize_state].

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`QuantizedState`][varjax.quantization.QuantizedState].

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.ademamix_8bit(1e-3, alpha_warmup_steps=1000, b3_warmup_steps=1000)
      >>> state = tx.init({"w": jnp.zeros((128, 64))})
    """
    return _quantized(ademamix, 8, locals())


def ademamix_4bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    alpha: float = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    alpha_warmup_steps: int | None = None,
    b3_warmup_steps: int | None = None,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    mu_dtype: Any = None,
    block_size: int | None = None,
    min_size: int | None = None,
    stochastic_rounding: bool = False,
    roles: RoleOverride = None,
) -> optax.GradientTransformationExtraArgs:
    """AdEMAMix ([`ademamix`][varjax.ademamix]) with its three moments in 4 bits.

    [`ademamix_8bit`][varjax.ademamix_8bit] at 4 bits, with the maps of
    [`adam_4bit`][varjax.adam_4bit].

    Args:
      learning_rate: the step size (a float >= 0 or a schedule).
      b1: the fast EMA's decay.
      b2: the second moment's decay.
      b3: the slow EMA's decay (or the end of its warm-up).
      alpha: the slow EMA's weight (or the end of its warm-up).
      eps: added to the root of the second moment.
      eps_root: added inside that root.
      alpha_warmup_steps: length of the warm-up of ``alpha``, or ``None``.
      b3_warmup_steps: length of the warm-up of ``b3``, or ``None``.
      weight_decay: decoupled, scaled by the learning rate (a float or a schedule).
      mask: the leaves that decay (``None``: all).
      mu_dtype: the fast EMA's dtype before quantization.
      block_size: entries per block of 4-bit codes (``None``: 128).
      min_size: smaller state leaves stay in float32 (``None``: 4096).
      stochastic_rounding: round to one of the two nearest codes at random.
      roles: role overrides for chosen state leaves.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a quantized state).

    Examples:
      >>> import varjax
      >>> tx = varjax.ademamix_4bit(1e-3, alpha=8.0)
    """
    return _quantized(ademamix, 4, locals())
