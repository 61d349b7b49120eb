"""Diagnostics kept in the optimizer state and readable every step.

- [`gradient_noise_scale`][varjax.gradient_noise_scale]: the simple noise scale ``B_simple`` of
  McCandlish et al. (2018), "An Empirical Model of Large-Batch Training";
- [`gradient_snr_monitor`][varjax.gradient_snr_monitor]: per-layer gradient signal, variance and
  signal-to-noise ratio across micro-batches or devices;
- [`state_bytes`][varjax.state_bytes]: the bytes an optimizer state holds.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    check_integer,
    check_interval,
    check_same_structure,
    one_minus_power,
    signal_to_noise,
    trainable_leaves_only,
    zero_count,
)
from varjax._samples import Moments, is_moments, sample_moments
from varjax.roles import Role

__all__ = [
    "GradientSNRState",
    "NoiseScaleState",
    "gradient_noise_scale",
    "gradient_snr_monitor",
    "noise_scale_estimates",
    "state_bytes",
]


def state_bytes(state: Any) -> int:
    """Bytes held by the arrays of an optimizer state (quantized or not); works on
    the shapes from ``jax.eval_shape`` too, without allocating the state.

    Args:
      state: any pytree; its leaves with a ``dtype`` (arrays,
        ``jax.ShapeDtypeStruct``) are counted.

    Returns:
      The number of bytes, an ``int``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> state_bytes(optax.adam(1e-3).init({"w": jnp.zeros(1000)}))  # mu, nu and a count
      8004
    """
    return sum(
        int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype")
    )


@roles.declare(
    count=Role.COUNT,
    grad_norm_squared=Role.EXACT,
    trace_covariance=Role.EXACT,
    noise_scale=Role.EXACT,
)
class NoiseScaleState(NamedTuple):
    """State of [`gradient_noise_scale`][varjax.gradient_noise_scale].

    ``grad_norm_squared`` and ``trace_covariance`` are the bias-corrected EMAs of
    the unbiased per-step estimates of ``|G|^2`` and ``tr(Sigma)`` (per-example
    covariance); ``noise_scale`` is their ratio, ``B_simple``.
    """

    count: jax.Array
    grad_norm_squared: jax.Array
    trace_covariance: jax.Array
    noise_scale: jax.Array


def _debiased_ema_step(
    previous: jax.Array, value: jax.Array, decay: float, count: jax.Array
) -> jax.Array:
    """The bias-corrected EMA after one more ``value``, from the bias-corrected EMA
    ``previous`` of ``count`` earlier values (0 of them: ``previous`` is ignored)."""
    raw = decay * one_minus_power(decay, count) * previous + (1.0 - decay) * value
    return raw / one_minus_power(decay, count + 1)


def noise_scale_estimates(
    small_norm_squared: jax.Array, large_norm_squared: jax.Array, small: float, large: float
) -> tuple[jax.Array, jax.Array]:
    """Unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` from the squared norms of
    gradients averaged over ``small`` and ``large`` examples (McCandlish et al.,
    2018, Appendix A.1), using ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``.

    Examples:
      >>> g2, trace = noise_scale_estimates(jnp.asarray(3.0), jnp.asarray(1.5), 4, 16)
      >>> float(g2), float(trace)
      (1.0, 8.0)
    """
    g2 = (large * large_norm_squared - small * small_norm_squared) / (large - small)
    trace = (small_norm_squared - large_norm_squared) / (1.0 / small - 1.0 / large)
    return g2, trace


def gradient_noise_scale(
    small_batch_size: int, large_batch_size: int, decay: float = 0.99
) -> optax.GradientTransformationExtraArgs:
    """Track the gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et
    al., 2018), the batch size around which larger batches stop paying off.

    The updates (the gradient averaged over ``large_batch_size`` examples) pass
    through unchanged. Each step also needs the gradient averaged over
    ``small_batch_size`` of those examples, as the extra argument
    ``small_batch_grads`` (in data-parallel training, one device's gradient
    before the all-reduce). From the two squared norms the step forms the
    paper's unbiased estimates of ``|G|^2`` and ``tr(Sigma)``, smooths each with
    an EMA of ``decay`` (bias-corrected) and reports their ratio, as the paper
    recommends, since the ratio of two noisy estimates is biased. The noise
    scale is ``inf`` while the ``|G|^2`` estimate is not positive (the small
    per-step estimates can be negative).

    Args:
      small_batch_size: the examples behind ``small_batch_grads``, an integer >= 1.
      large_batch_size: the examples behind the updates, an integer above
        ``small_batch_size``.
      decay: decay of the EMAs of the two estimates, in [0, 1) (0: no smoothing).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`NoiseScaleState`][varjax.diagnostics.NoiseScaleState]; ``update`` needs
      ``small_batch_grads``, one gradient with the structure and shapes of the updates.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.gradient_noise_scale(32, 256), optax.adam(1e-3))
      >>> params = {"w": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> big, small = {"w": jnp.ones(3)}, {"w": jnp.full(3, 1.5)}
      >>> updates, state = tx.update(big, state, params, small_batch_grads=small)
      >>> round(float(state[0].noise_scale), 2)  # tr(Sigma) / |G|^2
      55.65
    """
    small_batch_size = check_integer("small_batch_size", small_batch_size, 1)
    try:
        large_batch_size = check_integer("large_batch_size", large_batch_size, small_batch_size + 1)
    except ValueError as error:
        raise ValueError(f"{error} (it must exceed small_batch_size={small_batch_size})") from None
    check_interval("decay", decay, 0.0, 1.0, high_closed=False)
    small, large = float(small_batch_size), float(large_batch_size)

    def init_fn(params: optax.Params) -> NoiseScaleState:
        del params
        # a fresh array per field: one buffer twice in a state cannot be donated
        return NoiseScaleState(
            zero_count(),
            jnp.zeros([], jnp.float32),
            jnp.zeros([], jnp.float32),
            jnp.full([], jnp.inf, jnp.float32),
        )

    def update_fn(
        updates: optax.Updates,
        state: NoiseScaleState,
        params: optax.Params | None = None,
        *,
        small_batch_grads: optax.Updates | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, NoiseScaleState]:
        del params, extra_args
        if small_batch_grads is None:
            raise ValueError("gradient_noise_scale needs the extra argument small_batch_grads")
        try:
            check_same_structure(small_batch_grads, updates, "updates")
        except ValueError as error:
            raise ValueError(
                "gradient_noise_scale: small_batch_grads must be one gradient averaged over "
                "small_batch_size examples, with the tree structure and shapes of the updates "
                f"(not stacked micro-batch gradients); {error}"
            ) from None
        large_sq = jnp.square(optax.global_norm(updates)).astype(jnp.float32)
        small_sq = jnp.square(optax.global_norm(small_batch_grads)).astype(jnp.float32)
        g2, trace = noise_scale_estimates(small_sq, large_sq, small, large)
        g2_ema = _debiased_ema_step(state.grad_norm_squared, g2, decay, state.count)
        trace_ema = _debiased_ema_step(state.trace_covariance, trace, decay, state.count)
        noise_scale = jnp.where(g2_ema > 0, trace_ema / jnp.where(g2_ema > 0, g2_ema, 1.0), jnp.inf)
        return updates, NoiseScaleState(
            optax.safe_increment(state.count), g2_ema, trace_ema, noise_scale
        )

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))


@roles.declare(count=Role.COUNT, signal=Role.EXACT, variance=Role.EXACT, gsnr=Role.EXACT)
class GradientSNRState(NamedTuple):
    """State of [`gradient_snr_monitor`][varjax.gradient_snr_monitor], one scalar per parameter
    leaf: ``signal``, the mean over the leaf's elements of the unbiased estimate of the squared mean
    gradient; ``variance``, the mean of the unbiased variance across the samples; ``gsnr``, their
    ratio (all EMAs when ``decay > 0``)."""

    count: jax.Array
    signal: optax.Updates
    variance: optax.Updates
    gsnr: optax.Updates


class _Layer(NamedTuple):  # one leaf: the layer's signal and variance
    signal: jax.Array
    variance: jax.Array


def _layer_signal_and_variance(moments: Moments) -> _Layer:
    """``mean^2 - variance / n`` is unbiased for the squared expected gradient: the
    sample mean's own variance would otherwise put a floor of ``1 / n`` under the
    ratio."""
    signal = jnp.square(moments.mean) - moments.variance / moments.n
    return _Layer(jnp.mean(signal), jnp.mean(moments.variance))


def gradient_snr_monitor(
    axis_name: str | None = None, decay: float = 0.0
) -> optax.GradientTransformationExtraArgs:
    """Per-layer gradient signal-to-noise ratio (GSNR; Liu et al., 2020, "Understanding
    Why Neural Networks Generalize Well Through GSNR of Parameters"), read from
    the state every step. The updates pass through unchanged.

    The gradient samples come from one of two sources:

    - ``axis_name=None``: the extra argument ``microbatch_grads``, the gradients
      of ``n >= 2`` micro-batches stacked on a leading axis (``jax.vmap`` of the
      gradient function over micro-batches gives them);
    - ``axis_name="..."``: inside ``shard_map`` (or ``pmap``), the updates on
      each device are one sample, and the statistics are taken across the
      named axis with collectives. Both give the same numbers.

    Per leaf, over its elements ``i`` and the ``n`` samples ``k``: ``variance =
    mean_i var_k(g_ki)`` (unbiased) and ``signal = mean_i [(mean_k g_ki)^2 -
    var_k(g_ki) / n]``, the unbiased estimate of the squared expected gradient
    (without the correction, a pure-noise gradient would show a GSNR of
    ``1 / n``). ``gsnr = signal / variance`` is a ratio of means: element-wise
    ratios are unbounded where a variance vanishes. The signal, hence the
    GSNR, can be negative when the signal is below the estimate's resolution;
    ``decay > 0`` smooths signal and variance with bias-corrected EMAs before
    the ratio. A leaf with zero variance has ``gsnr = inf``, or 0 if its mean
    gradient is zero too. The GSNR is that of the samples, e.g. micro-batch
    gradients: ``B`` times the per-example GSNR for micro-batches of ``B``.

    Args:
      axis_name: the named axis of ``shard_map`` or ``pmap`` whose devices
        each hold one gradient sample (the updates), with >= 2 devices;
        ``None`` (default): the samples come as ``microbatch_grads``.
      decay: decay of the bias-corrected EMAs of signal and variance, in
        [0, 1) (0, default: the current step's values).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`GradientSNRState`][varjax.diagnostics.GradientSNRState]; without ``axis_name``, ``update``
      needs ``microbatch_grads`` of shape ``(n, *gradient.shape)`` per leaf.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, varjax
      >>> tx = varjax.gradient_snr_monitor()
      >>> params = {"w": jnp.zeros(3)}
      >>> samples = {"w": jnp.asarray([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]])}
      >>> _, state = tx.update({"w": samples["w"].mean(0)}, tx.init(params),
      ...                      microbatch_grads=samples)
      >>> round(float(state.gsnr["w"]), 4)  # signal (4 - 2/2 + 4 + 0) / 3, variance 2 / 3
      3.5
    """

    check_interval("decay", decay, 0.0, 1.0, high_closed=False)

    def init_fn(params: optax.Params) -> GradientSNRState:
        def zeros() -> optax.Updates:  # fresh buffers: a state is donated whole
            return jax.tree.map(lambda p: jnp.zeros([], jnp.float32), params)

        return GradientSNRState(zero_count(), zeros(), zeros(), zeros())

    def update_fn(
        updates: optax.Updates,
        state: GradientSNRState,
        params: optax.Params | None = None,
        *,
        microbatch_grads: optax.Updates | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, GradientSNRState]:
        del params, extra_args
        # one scalar per leaf: the tree is checked, the shapes cannot be
        check_same_structure(updates, state.gsnr, "optimizer state", shapes=False)
        moments = sample_moments(updates, microbatch_grads, axis_name, "gradient_snr_monitor")
        layers = jax.tree.map(_layer_signal_and_variance, moments, is_leaf=is_moments)
        is_layer = lambda x: isinstance(x, _Layer)  # noqa: E731

        def smooth(name: str, previous: optax.Updates) -> optax.Updates:
            return jax.tree.map(
                lambda layer, old: _debiased_ema_step(
                    old, getattr(layer, name), decay, state.count
                ),
                layers,
                previous,
                is_leaf=is_layer,
            )

        signal, variance = smooth("signal", state.signal), smooth("variance", state.variance)
        gsnr = jax.tree.map(signal_to_noise, signal, variance)
        return updates, GradientSNRState(optax.safe_increment(state.count), signal, variance, gsnr)

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))
