"""Ready optimizers assembled from the families' building blocks.

Each is ``optax.chain(block, add_decayed_weights(weight_decay, mask),
scale_by_learning_rate(learning_rate))``: decoupled weight decay as in AdamW
(``weight_decay=0`` by default, which makes it a no-op), and ``learning_rate``
and ``weight_decay`` accept a float or an ``optax.Schedule``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from varjax import multi_ema, rectification
from varjax._base import ScalarOrSchedule, check_adam_hyperparameters, check_interval

__all__ = [
    "adam_atan2",
    "adamp",
    "ademamix",
    "adopt",
    "cautious_adamw",
    "diffgrad",
    "grams",
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
    return optax.chain(
        block,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
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
    """Rectified Adam (Liu et al., 2020); see :func:`varjax.scale_by_radam`.

    Same defaults and threshold convention (``rho_t >= 5``) as :func:`optax.radam`,
    and equal to it when ``weight_decay=0`` (up to Optax's float32 error in ``r_t``,
    see :func:`varjax.scale_by_radam`).

    Example:
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
    """ADOPT (Taniguchi et al., 2024); see :func:`varjax.scale_by_adopt`.

    Equal to :func:`optax.contrib.adopt` when ``weight_decay=0``, up to Optax's
    float32 rounding of ``1 - b2`` (about 1e-4 relative drift over 60 steps).
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
    """Grams (Cao et al., 2024); see :func:`varjax.scale_by_grams`."""
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
    """diffGrad (Dubey et al., 2019); see :func:`varjax.scale_by_diffgrad`."""
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
    """Adam-atan2 (Everett et al., 2024); see :func:`varjax.scale_by_adam_atan2`."""
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
    """AdamP (Heo et al., 2021); see :func:`varjax.scale_by_adamp`.

    The weight decay lives in the block (scale-invariant weights get
    ``wd_ratio`` of it), so it is a float here rather than a schedule.
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
    return optax.chain(block, optax.scale_by_learning_rate(learning_rate))


def cautious_adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    """Cautious AdamW (Liang et al., 2024): :func:`varjax.cautious` around ``optax.scale_by_adam``.

    The weight decay is added after the mask, as in the paper's C-AdamW, and
    defaults to Optax's ``adamw`` value.
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
    """AdEMAMix (Pagliardini et al., 2024); see :func:`varjax.scale_by_ademamix`.

    With ``alpha_warmup_steps`` / ``b3_warmup_steps`` set, ``alpha`` and ``b3``
    follow the paper's warm-ups (:func:`varjax.ademamix_alpha_schedule`,
    :func:`varjax.ademamix_beta3_schedule`); the paper sets both to the total
    number of training steps. Without them this equals
    :func:`optax.contrib.ademamix` (whose defaults it shares, ``weight_decay=0``
    included; the paper trains with decoupled weight decay 0.1).

    Example:
      >>> import varjax
      >>> tx = varjax.ademamix(1e-3, alpha=8.0, alpha_warmup_steps=10_000, b3_warmup_steps=10_000)
    """
    check_interval("alpha_warmup_steps", alpha_warmup_steps, 1.0)
    check_interval("b3_warmup_steps", b3_warmup_steps, 1.0)
    if alpha_warmup_steps is not None:
        alpha = multi_ema.ademamix_alpha_schedule(alpha, alpha_warmup_steps)
    if b3_warmup_steps is not None:
        b3 = multi_ema.ademamix_beta3_schedule(b1, b3, b3_warmup_steps)
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
    """Simplified AdEMAMix (Morwani et al., 2025); see :func:`varjax.scale_by_simplified_ademamix`.

    Equal to :func:`optax.contrib.simplified_ademamix`, whose defaults it shares.
    Its momentum sums gradients (about ``1 / (1 - b1)`` times larger than an EMA),
    so it wants a learning rate that much smaller than Adam's.
    """
    block = multi_ema.scale_by_simplified_ademamix(b1, b2, alpha, eps, eps_root)
    return _with_decay_and_rate(block, learning_rate, weight_decay, mask)
