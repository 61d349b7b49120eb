"""Multi-EMA methods: several exponential moving averages of the gradient, combined.

* [`multi_ema`][varjax.multi_ema.multi_ema] - K EMAs of the gradient with their own decays, weights
  and bias-correction flags, summed; decays and weights may be schedules.
* [`scale_by_second_moment`][varjax.scale_by_second_moment] - divides any numerator transform (such
  as [`multi_ema`][varjax.multi_ema.multi_ema]) by the bias-corrected RMS of the *raw* gradient:
  Adam's denominator as a composable piece.
* [`scale_by_ademamix`][varjax.scale_by_ademamix] - AdEMAMix, the two instances above combined, with
  the paper's schedulers [`ademamix_alpha_schedule`][varjax.ademamix_alpha_schedule] and
  [`ademamix_beta3_schedule`][varjax.ademamix_beta3_schedule];
  [`scale_by_simplified_ademamix`][varjax.scale_by_simplified_ademamix].
* [`grokfast_ema`][varjax.grokfast_ema], [`grokfast_ma`][varjax.grokfast_ma] - Grokfast's filters
  that amplify the slow component of the gradient, to chain before any optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    AdaptiveState,
    PyTree,
    ScalarOrSchedule,
    adam_direction,
    bias_correct,
    cast_like,
    check_integer,
    check_interval,
    check_same_structure,
    ema,
    ema_squared,
    init_adaptive_state,
    resolve,
    trainable_leaves_only,
    zero_count,
)
from varjax.roles import Role

__all__ = [
    "GrokfastEMAState",
    "GrokfastMAState",
    "MultiEMAState",
    "SecondMomentState",
    "ademamix_alpha_schedule",
    "ademamix_beta3_schedule",
    "grokfast_ema",
    "grokfast_ma",
    "multi_ema",
    "scale_by_ademamix",
    "scale_by_second_moment",
    "scale_by_simplified_ademamix",
]


@roles.declare(count=Role.COUNT, emas=Role.SIGNED)
class MultiEMAState(NamedTuple):
    """State of [`multi_ema`][varjax.multi_ema.multi_ema]: the step count and one EMA tree per
    decay."""

    count: jax.Array
    emas: tuple[PyTree, ...]


def multi_ema(
    decays: Sequence[ScalarOrSchedule],
    weights: Sequence[ScalarOrSchedule],
    debias: Sequence[bool],
    *,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """A weighted sum of K exponential moving averages of the gradient.

    ``out = sum_k w_k * m_k`` with ``m_k = d_k m_k + (1 - d_k) g``, divided by
    ``1 - d_k^t`` where ``debias[k]`` is true. Decays and weights may be
    ``optax.Schedule``s; like Optax's, they are called with the number of
    earlier steps (0 on the first). A bias-corrected EMA with a scheduled decay
    is corrected with its current decay.

    AdEMAMix's numerator is ``multi_ema((b1, b3), (1, alpha), (True, False))``;
    chain it before a second-moment preconditioner with
    [`scale_by_second_moment`][varjax.scale_by_second_moment].

    Args:
      decays: the decay of each EMA, in [0, 1).
      weights: the weight of each EMA in the sum.
      debias: whether each EMA is bias-corrected.
      mu_dtype: dtype of the EMAs; ``None`` keeps the parameters' dtype.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.multi_ema(decays=(0.9, 0.99), weights=(1.0, 2.0), debias=(True, False))
      >>> out, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
      >>> print(out["w"].round(4))  # 1 (debiased fast EMA) + 2 * 0.01 (slow EMA)
      [1.02 1.02]
    """
    decays, weights, debias = tuple(decays), tuple(weights), tuple(debias)
    if not decays or not len(decays) == len(weights) == len(debias):
        raise ValueError(
            "decays, weights and debias must be non-empty and of one length, got "
            f"{len(decays)}, {len(weights)} and {len(debias)}"
        )
    for k, decay in enumerate(decays):
        check_interval(f"decays[{k}]", decay, 0.0, 1.0, high_closed=False)

    def init_fn(params: PyTree) -> MultiEMAState:
        emas = tuple(optax.tree.zeros_like(params, dtype=mu_dtype) for _ in decays)
        return MultiEMAState(count=zero_count(), emas=emas)

    def update_fn(
        updates: PyTree, state: MultiEMAState, params: PyTree | None = None
    ) -> tuple[PyTree, MultiEMAState]:
        del params
        check_same_structure(updates, state.emas[0], "optimizer state")
        count = optax.safe_increment(state.count)
        emas, terms = [], []
        for decay, weight, corrected, old in zip(decays, weights, debias, state.emas, strict=True):
            d, w = resolve(decay, state.count), resolve(weight, state.count)
            new = ema(updates, old, d)
            emas.append(new)
            value = bias_correct(new, d, count) if corrected else new
            terms.append(jax.tree.map(lambda m, w=w: w * m, value))
        out = jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *terms)
        return cast_like(out, updates), MultiEMAState(count=count, emas=tuple(emas))

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))


@roles.declare(count=Role.COUNT, numerator_state=Role.NESTED, nu=Role.NON_NEGATIVE)
class SecondMomentState(NamedTuple):
    """State of [`scale_by_second_moment`][varjax.scale_by_second_moment]."""

    count: jax.Array
    numerator_state: optax.OptState
    nu: PyTree


def scale_by_second_moment(
    numerator: optax.GradientTransformation,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Divide the output of ``numerator`` by Adam's denominator of the raw gradient.

    ``numerator(g) / (sqrt(nu_hat + eps_root) + eps)`` with
    ``nu = b2 nu + (1 - b2) g^2`` and ``nu_hat = nu / (1 - b2^t)``. The second
    moment is that of the gradient entering this transform, not of the
    numerator's output, which is what a multi-EMA numerator needs (chaining it
    before ``optax.scale_by_rms`` would measure the smoothed signal instead).
    ``scale_by_second_moment(multi_ema((b1,), (1.0,), (True,)))`` is Adam.

    Args:
      numerator: the transform whose output is divided, e.g.
        [`multi_ema`][varjax.multi_ema.multi_ema]; extra arguments of ``update`` are forwarded to
        it.
      b2: decay of the second-moment EMA of the raw gradient, in [0, 1).
      eps: added to ``sqrt(nu_hat + eps_root)``, >= 0.
      eps_root: added to ``nu_hat`` inside the square root, >= 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> fast_and_slow = varjax.multi_ema((0.9, 0.999), (1.0, 5.0), (True, False))
      >>> tx = optax.chain(varjax.scale_by_second_moment(fast_and_slow),
      ...                  optax.scale_by_learning_rate(1e-3))
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    check_interval("b2", b2, 0.0, 1.0, high_closed=False)
    check_interval("eps", eps, 0.0)
    check_interval("eps_root", eps_root, 0.0)
    numerator = optax.with_extra_args_support(numerator)

    def init_fn(params: PyTree) -> SecondMomentState:
        return SecondMomentState(
            count=zero_count(),
            numerator_state=numerator.init(params),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(
        updates: PyTree, state: SecondMomentState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, SecondMomentState]:
        check_same_structure(updates, state.nu, "optimizer state")
        count = optax.safe_increment(state.count)
        top, numerator_state = numerator.update(
            updates, state.numerator_state, params, **extra_args
        )
        nu = ema_squared(updates, state.nu, b2)
        nu_hat = bias_correct(nu, b2, count)
        out = adam_direction(top, nu_hat, eps, eps_root)
        numerator_state = cast_like(numerator_state, state.numerator_state)
        return cast_like(out, updates), SecondMomentState(count, numerator_state, nu)

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def scale_by_ademamix(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescale updates by AdEMAMix (Pagliardini et al., 2024, "The AdEMAMix
    Optimizer: Better, Faster, Older", Algorithm 1).

    ``(m1_hat + alpha * m2) / (sqrt(nu_hat) + eps)``: a fast, bias-corrected EMA
    ``m1`` (decay ``b1``), a slow EMA ``m2`` that is *not* bias-corrected (decay
    ``b3``), and Adam's second moment. Built as
    ``scale_by_second_moment(multi_ema((b1, b3), (1, alpha), (True, False)))``.
    Equal to ``optax.contrib.scale_by_ademamix`` for constant ``alpha`` and
    ``b3``.

    ``alpha`` and ``b3`` may be schedules: the paper warms both up over the whole run for stability,
    see [`ademamix_alpha_schedule`][varjax.ademamix_alpha_schedule] and
    [`ademamix_beta3_schedule`][varjax.ademamix_beta3_schedule] ([`varjax.ademamix`][] sets them up
    from ``alpha_warmup_steps`` and ``b3_warmup_steps``). Paper defaults: ``b3=0.9999``, ``alpha``
    in [4, 10] (5 for its language models, 8 for vision), warm-up over the whole run.

    Args:
      b1: decay of the fast, bias-corrected EMA, in [0, 1).
      b2: decay of the second-moment EMA, in [0, 1).
      b3: decay of the slow EMA, in [0, 1), or a schedule
        ([`ademamix_beta3_schedule`][varjax.ademamix_beta3_schedule]); the paper uses 0.9999.
      alpha: weight of the slow EMA, >= 0, or a schedule
        ([`ademamix_alpha_schedule`][varjax.ademamix_alpha_schedule]); the paper uses 4 to 10.
      eps: added to ``sqrt(nu_hat)``, >= 0.
      eps_root: added to ``nu_hat`` inside the square root, >= 0.
      mu_dtype: dtype of the two EMAs; ``None`` keeps the parameters' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.scale_by_ademamix(alpha=8.0), optax.scale_by_learning_rate(1e-3))
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    check_interval("b1", b1, 0.0, 1.0, high_closed=False)
    check_interval("b3", b3, 0.0, 1.0, high_closed=False)
    check_interval("alpha", alpha, 0.0)
    numerator = multi_ema((b1, b3), (1.0, alpha), (True, False), mu_dtype=mu_dtype)
    return scale_by_second_moment(numerator, b2, eps, eps_root)


def scale_by_simplified_ademamix(
    b1: float = 0.99,
    b2: float = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Rescale updates by simplified AdEMAMix (Morwani et al., 2025, "Connections
    between Schedule-Free Optimizers, AdEMAMix, and Accelerated SGD Variants").

    One momentum that *sums* gradients, ``m = b1 m + g``, plus ``alpha`` times the
    current gradient, over Adam's denominator: ``(m + alpha g) / (sqrt(nu_hat) + eps)``.
    The sum is the EMA scaled by ``1 / (1 - b1)``: the same update as
    ``scale_by_second_moment(multi_ema((b1, 0), (1 / (1 - b1), alpha), (False, False)), b2)``,
    but with one momentum and one count in the state (an
    ``varjax._base.AdaptiveState`` without ``nu_max``), as many bytes as Optax's.
    Equal to ``optax.contrib.scale_by_simplified_ademamix`` (same defaults).
    ``b1`` is a constant here; pytorch-optimizer's ``beta1_warmup`` is not offered.
    pytorch-optimizer's ``SimplifiedAdEMAMix`` differs twice: it keeps an EMA
    (``(1 - b1)`` times this sum, so its ``(lr, alpha)`` is this
    ``(lr (1 - b1), alpha / (1 - b1))``), and it divides by the second moment's
    bias correction twice, making its early steps larger by ``1 / (1 - b2^t)``
    (20x at the first step with ``b2=0.95``).

    Args:
      b1: decay of the momentum that sums gradients, in [0, 1) (0.99 as the
        paper and Optax).
      b2: decay of the second-moment EMA, in [0, 1).
      alpha: weight of the current gradient added to the momentum, >= 0, or a
        schedule (0: the momentum alone).
      eps: added to ``sqrt(nu_hat)``, >= 0.
      eps_root: added to ``nu_hat`` inside the square root, >= 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.scale_by_simplified_ademamix(alpha=2.0)
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    check_interval("b1", b1, 0.0, 1.0, high_closed=False)
    check_interval("b2", b2, 0.0, 1.0, high_closed=False)
    check_interval("alpha", alpha, 0.0)
    check_interval("eps", eps, 0.0)
    check_interval("eps_root", eps_root, 0.0)

    def init_fn(params: PyTree) -> AdaptiveState:
        return init_adaptive_state(params)

    def update_fn(
        updates: PyTree, state: AdaptiveState, params: PyTree | None = None
    ) -> tuple[PyTree, AdaptiveState]:
        del params
        check_same_structure(updates, state.mu, "optimizer state")
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: (g + b1 * m).astype(m.dtype), updates, state.mu)
        nu = ema_squared(updates, state.nu, b2)
        a = resolve(alpha, state.count)
        numerator = jax.tree.map(lambda m, g: m + a * g, mu, updates)
        out = adam_direction(numerator, bias_correct(nu, b2, count), eps, eps_root)
        return cast_like(out, updates), AdaptiveState(count=count, mu=mu, nu=nu, nu_max=None)

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def ademamix_alpha_schedule(alpha: float, warmup_steps: int) -> optax.Schedule:
    """The paper's linear warm-up of AdEMAMix's ``alpha``: ``min(t alpha / T, alpha)``.

    ``t`` is the 1-based step, as in the paper's code; the returned schedule takes Optax's 0-based
    count and evaluates the formula at ``count + 1``. Arguments come in the order of
    [`ademamix_beta3_schedule`][varjax.ademamix_beta3_schedule]: the final value, then the number of
    warm-up steps.

    Args:
      alpha: the final weight of the slow EMA, reached after
        ``warmup_steps``; >= 0 (the paper uses 4 to 10).
      warmup_steps: ``T``, the number of steps of the warm-up, >= 1 (the paper
        uses the whole run).

    Returns:
      An ``optax.Schedule`` to pass as ``alpha`` to [`scale_by_ademamix`][varjax.scale_by_ademamix].

    Examples:
      >>> import varjax
      >>> alpha = varjax.ademamix_alpha_schedule(8.0, warmup_steps=100)
      >>> [round(float(alpha(count)), 4) for count in (0, 49, 99, 500)]  # t = count + 1
      [0.08, 4.0, 8.0, 8.0]
    """
    check_interval("alpha", alpha, 0.0)
    warmup_steps = check_integer("warmup_steps", warmup_steps, 1)

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.result_type(float)) + 1
        return jnp.minimum(t * alpha / warmup_steps, alpha)

    return schedule


def ademamix_beta3_schedule(b3: float, warmup_steps: int, *, b1: float = 0.9) -> optax.Schedule:
    """The paper's warm-up of AdEMAMix's ``b3``, linear in the EMA's half-life.

    ``b3(t) = min(exp(ln(b1) ln(b3) / ((1 - t/T) ln(b3) + (t/T) ln(b1))), b3)``: the half-life
    ``ln(1/2) / ln(b)`` moves linearly from that of ``b1`` to that of ``b3`` over ``T`` steps. ``t``
    is the 1-based step, as for [`ademamix_alpha_schedule`][varjax.ademamix_alpha_schedule], whose
    argument order this shares (the final value, then the warm-up steps; the paper's code also puts
    the final value first). The starting decay ``b1`` is keyword-only: it must be below ``b3``, and
    a call with the two swapped raises ``ValueError``.

    Args:
      b3: the final decay of the slow EMA, reached after ``warmup_steps``; in
        (b1, 1) (the paper uses 0.9999).
      warmup_steps: ``T``, the number of steps of the warm-up, >= 1 (the paper
        uses the whole run).
      b1: the decay the warm-up starts from, in (0, b3); AdEMAMix's fast-EMA
        decay (default 0.9, as [`scale_by_ademamix`][varjax.scale_by_ademamix]).

    Returns:
      An ``optax.Schedule`` to pass as ``b3`` to [`scale_by_ademamix`][varjax.scale_by_ademamix].

    Examples:
      >>> import varjax
      >>> b3 = varjax.ademamix_beta3_schedule(0.9999, warmup_steps=100, b1=0.9)
      >>> [round(float(b3(count)), 4) for count in (0, 9, 49, 99)]  # half-life 6.6 to 6931 steps
      [0.9909, 0.999, 0.9998, 0.9999]
    """
    check_interval("b1", b1, 0.0, 1.0, low_closed=False, high_closed=False)
    check_interval("b3", b3, 0.0, 1.0, low_closed=False, high_closed=False)
    warmup_steps = check_integer("warmup_steps", warmup_steps, 1)
    if not b1 < b3:
        raise ValueError(
            f"ademamix_beta3_schedule warms b3 up from b1 to b3 and needs b1 < b3, got "
            f"b1={b1!r} and b3={b3!r} (are they swapped? The call is "
            "ademamix_beta3_schedule(b3, warmup_steps, b1=...))"
        )
    log_b1, log_b3 = math.log(b1), math.log(b3)

    def schedule(count: jax.Array) -> jax.Array:
        frac = (jnp.asarray(count, jnp.result_type(float)) + 1) / warmup_steps
        exponent = log_b1 * log_b3 / ((1 - frac) * log_b3 + frac * log_b1)
        return jnp.minimum(jnp.exp(exponent), b3)

    return schedule


@roles.declare(count=Role.COUNT, mu=Role.SIGNED)
class GrokfastEMAState(NamedTuple):
    """State of [`grokfast_ema`][varjax.grokfast_ema]: the step count and the gradient's EMA."""

    count: jax.Array
    mu: PyTree


def grokfast_ema(alpha: float = 0.98, lamb: float = 2.0) -> optax.GradientTransformation:
    """Grokfast's EMA filter (Lee et al., 2024, "Grokfast: Accelerated Grokking by
    Amplifying Slow Gradients", Algorithm 2): ``g + lamb * mu`` with
    ``mu = alpha mu + (1 - alpha) g``, ``mu`` starting at the first gradient.

    A gradient filter: chain it before any optimizer. Defaults are the paper's
    (``alpha=0.98, lamb=2.0``), also pytorch-optimizer's ``gradfilter_ema``.

    Args:
      alpha: decay of the gradient's EMA, in [0, 1) (0.98 as the paper).
      lamb: the factor on the EMA added to the gradient (2 as the paper; 0: no
        filter).

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.grokfast_ema(), optax.adamw(1e-3, weight_decay=1.0))
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    check_interval("alpha", alpha, 0.0, 1.0, high_closed=False)
    check_interval("lamb", lamb)

    def init_fn(params: PyTree) -> GrokfastEMAState:
        return GrokfastEMAState(count=zero_count(), mu=optax.tree.zeros_like(params))

    def update_fn(
        updates: PyTree, state: GrokfastEMAState, params: PyTree | None = None
    ) -> tuple[PyTree, GrokfastEMAState]:
        del params
        check_same_structure(updates, state.mu, "optimizer state")
        first_gradient = cast_like(updates, state.mu)
        mu = optax.tree.where(state.count == 0, first_gradient, ema(updates, state.mu, alpha))
        out = jax.tree.map(lambda g, m: g + lamb * m, updates, mu)
        return cast_like(out, updates), GrokfastEMAState(optax.safe_increment(state.count), mu)

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))


@roles.declare(count=Role.COUNT, window=Role.EXACT)
class GrokfastMAState(NamedTuple):
    """State of [`grokfast_ma`][varjax.grokfast_ma]: the step count and the last ``window``
    gradients."""

    count: jax.Array
    window: PyTree


def grokfast_ma(
    window: int = 100, lamb: float = 5.0, *, warmup: bool = True, reduce: str = "mean"
) -> optax.GradientTransformation:
    """Grokfast's windowed moving-average filter (Lee et al., 2024, Algorithm 1):
    ``g + lamb * mean(last window gradients)``.

    The window is a fixed-size ring buffer in the state (``window`` copies of
    the parameters: this filter's memory cost). With ``warmup`` (the paper's
    default) nothing is added until the window is full; ``reduce="sum"`` adds
    the sum instead of the mean, as pytorch-optimizer's ``filter_type="sum"``.
    Defaults are the paper's (``window=100, lamb=5.0``).

    Args:
      window: the number of past gradients averaged, an integer >= 1 (each
        costs one copy of the parameters in the state).
      lamb: the factor on the window's mean (or sum) added to the gradient (5
        as the paper).
      warmup: add nothing until the window is full (the paper's default).
      reduce: ``"mean"`` (default, the paper) or ``"sum"`` of the window.

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.grokfast_ma(window=10), optax.adam(1e-3))
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    window = check_integer("window", window, 1)
    check_interval("lamb", lamb)
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")

    def init_fn(params: PyTree) -> GrokfastMAState:
        buffers = jax.tree.map(
            lambda p: jnp.zeros((window, *jnp.shape(p)), jnp.result_type(p)), params
        )
        return GrokfastMAState(count=zero_count(), window=buffers)

    def update_fn(
        updates: PyTree, state: GrokfastMAState, params: PyTree | None = None
    ) -> tuple[PyTree, GrokfastMAState]:
        del params
        check_same_structure(updates, jax.tree.map(lambda b: b[0], state.window), "optimizer state")
        slot = state.count % window
        buffers = jax.tree.map(
            lambda b, g: b.at[slot].set(g.astype(b.dtype)), state.window, updates
        )
        filled = jnp.minimum(state.count + 1, window)
        active = filled == window if warmup else jnp.asarray(True)

        def amplify(g: jax.Array, b: jax.Array) -> jax.Array:
            total = jnp.sum(b, axis=0)
            slow = total / filled.astype(total.dtype) if reduce == "mean" else total
            return jnp.where(active, g + lamb * slow, g)

        out = jax.tree.map(amplify, updates, buffers)
        return cast_like(out, updates), GrokfastMAState(optax.safe_increment(state.count), buffers)

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))
