"""Noise-aware clipping and scaling: transforms that measure gradient noise and act on it.

- [`autoclip`][varjax.autoclip]: clip to a percentile of the history of gradient norms;
- [`scale_by_gsnr`][varjax.scale_by_gsnr]: element-wise rates from the gradient signal-to-noise
  ratio across micro-batches or devices;
- [`agvm`][varjax.agvm]: per-group rates from the gradient variance of each group of
  parameters relative to an anchor group;
- [`quantile_clipping`][varjax.quantile_clipping]: the running median (or quantile) of the
  gradients that clipping estimates.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    ScalarOrSchedule,
    ShapeWitness,
    check_integer,
    check_interval,
    check_same_structure,
    clip_to_norm,
    global_norm,
    resolve,
    shape_witness,
    signal_to_noise,
    trainable_leaves_only,
    witness_shapes,
    zero_count,
)
from varjax._samples import Moments, half_means, is_moments, sample_moments
from varjax.roles import Role

__all__ = [
    "AGVMState",
    "AutoClipState",
    "QuantileClippingState",
    "agvm",
    "autoclip",
    "gsnr_scale",
    "percentile_of_history",
    "quantile_clipping",
    "scale_by_gsnr",
]


@roles.declare(norms=Role.EXACT, count=Role.COUNT, shapes=Role.EXACT)
class AutoClipState(NamedTuple):
    """State of [`autoclip`][varjax.autoclip]: the last ``window`` gradient norms (a ring buffer,
    filled from index 0), how many norms have been recorded, and ``shapes``,
    a ``varjax._base.ShapeWitness`` (the parameters' tree and shapes as static
    data: no leaves, no bytes) that the gradient tree is checked against."""

    norms: jax.Array
    count: jax.Array
    shapes: ShapeWitness


def percentile_of_history(norms: jax.Array, count: jax.Array, percentile: float) -> jax.Array:
    """The ``percentile`` (in [0, 100]) of the first ``min(count, len(norms))`` entries,
    interpolated linearly between order statistics as ``np.percentile`` does;
    ``inf`` while nothing is recorded.

    Examples:
      >>> float(percentile_of_history(jnp.asarray([3.0, 1.0, 2.0, 0.0]), jnp.asarray(3), 50.0))
      2.0
    """
    window = norms.shape[0]
    n = jnp.minimum(count, window)
    ordered = jnp.sort(jnp.where(jnp.arange(window) < n, norms, jnp.inf))
    position = percentile / 100.0 * jnp.maximum(n - 1, 0).astype(norms.dtype)
    below = jnp.floor(position).astype(jnp.int32)
    above = jnp.minimum(below + 1, jnp.maximum(n - 1, 0))
    low, high = ordered[below], ordered[above]
    value = low + (position - below) * (high - low)
    return jnp.where(n > 0, value, jnp.inf)


def autoclip(percentile: float = 10.0, window: int = 10_000) -> optax.GradientTransformation:
    """AutoClip (Seetharaman et al., 2020, "AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks"): clip the global gradient norm to a percentile of
    the norms seen so far.

    Each step records the global norm of the incoming updates, then rescales
    them to the ``percentile``-th percentile of the recorded norms (the current
    one included) when their norm is larger, as ``optax.clip_by_global_norm``
    does (PyTorch's ``clip_grad_norm_``, used by the paper's code, adds 1e-6 to
    the norm). ``percentile=10`` is the paper's recommendation.

    The paper keeps every norm since the start; here the history is the last
    ``window`` norms, a fixed-size ring buffer, so that the state has a fixed
    shape. Until ``window`` steps have passed the two agree exactly. The
    percentile interpolates linearly between order statistics (NumPy's default).
    A non-finite norm is not recorded and its updates pass through unchanged.

    Args:
      percentile: the percentile of the recorded norms to clip to, in (0, 100]
        (10 as the paper).
      window: how many of the latest norms are kept, an integer >= 1 (the
        history's memory, ``4 * window`` bytes).

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.autoclip(percentile=10.0), optax.adam(1e-3))
      >>> params = {"w": jnp.ones(3)}
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    """
    check_interval("percentile", percentile, 0.0, 100.0, low_closed=False)
    window = check_integer("window", window, 1)

    def init_fn(params: optax.Params) -> AutoClipState:
        return AutoClipState(jnp.zeros([window], jnp.float32), zero_count(), shape_witness(params))

    def update_fn(
        updates: optax.Updates, state: AutoClipState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, AutoClipState]:
        del params
        check_same_structure(updates, witness_shapes(state.shapes), "optimizer state")
        norm = global_norm(updates).astype(jnp.float32)
        finite = jnp.isfinite(norm)
        slot = state.count % state.norms.shape[0]
        norms = jnp.where(finite, state.norms.at[slot].set(norm), state.norms)
        count = jnp.where(finite, optax.safe_increment(state.count), state.count)
        threshold = percentile_of_history(norms, count, percentile)
        clipped = clip_to_norm(updates, jnp.where(finite, threshold, jnp.inf), norm=norm)
        return clipped, AutoClipState(norms, count, state.shapes)

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))


def gsnr_scale(moments: Moments, min_scale: float) -> jax.Array:
    """The element-wise rate factor of VRGD (Jiang et al., 2023, eqs. 7-9) for one layer.

    ``r = mean^2 / variance`` per element, divided by its mean over the layer,
    then clipped to ``[min_scale, 1]``. A constant factor on the variance
    cancels in the division, so the unbiased variance gives the paper's
    numbers. An element with zero variance and a nonzero mean (``r = inf``)
    gets 1 and is left out of the layer mean; one with neither gets
    ``min_scale`` (its mean gradient is zero anyway).

    Examples:
      >>> m = Moments(jnp.asarray([2.0, 1.0, 0.1]), jnp.asarray([1.0, 1.0, 1.0]), 4)
      >>> [round(float(x), 4) for x in gsnr_scale(m, 0.1)]  # r = 4, 1, 0.01; mean 1.67
      [1.0, 0.5988, 0.1]
    """
    ratio = signal_to_noise(jnp.square(moments.mean), moments.variance)
    finite = jnp.isfinite(ratio)
    layer_mean = jnp.sum(jnp.where(finite, ratio, 0.0)) / jnp.maximum(jnp.sum(finite), 1)
    positive = layer_mean > 0
    normalised = jnp.where(positive, ratio / jnp.where(positive, layer_mean, 1.0), ratio)
    return jnp.clip(jnp.where(finite, normalised, 1.0), min_scale, 1.0)


def scale_by_gsnr(
    min_scale: float = 0.1, axis_name: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """Element-wise rates from the gradient signal-to-noise ratio (GSNR): the
    variance-reduced gradient descent (VRGD) of Jiang et al., 2023,
    "Accelerating Large Batch Training via Gradient Signal to Noise Ratio".

    Each element's mean gradient is scaled by its GSNR ``r = mean^2 /
    variance`` across the gradient samples of the step, normalised by the
    mean of ``r`` over its layer (the leaf) and clipped to ``[min_scale, 1]``
    (the paper's ``gamma = 0.1``): coordinates whose gradients agree across
    samples keep their step, noisy ones are slowed down to at most
    ``min_scale`` of it. Chained in front of a base optimizer, this is the
    paper's VR-SGD (``optax.sgd``), VR-Momentum, or VR-Adam (``optax.adam``:
    the scaled gradient feeds both moments, as the paper prescribes).

    The samples come from one of two sources:

    - ``axis_name=None``: the extra argument ``microbatch_grads``, the
      gradients of ``n >= 2`` micro-batches stacked on a leading axis; the
      incoming updates (normally the mean of the samples) are scaled;
    - ``axis_name="..."``: inside ``shard_map`` or ``pmap``, the updates on
      each device are one sample; the output is the scaled mean across the
      axis, so the usual all-reduce of the gradient happens here.

    Differences from the paper: its VR-Adam also keeps a momentum of the GSNR
    (``beta3 = 0.9``), whose exact form is in an appendix we could not read;
    it is not implemented, so ``r`` here is that of the current step. The
    paper does not say how a vanishing variance is treated; see
    [`gsnr_scale`][varjax.noise.gsnr_scale]. Statistics are taken in float32 at least and the
    updates keep their dtypes.

    Args:
      min_scale: the lower clip of the rate factors, in (0, 1] (the paper's
        ``gamma = 0.1``; 1: no scaling).
      axis_name: the named axis of ``shard_map`` or ``pmap`` whose devices
        each hold one gradient sample (the updates), with >= 2 devices;
        ``None`` (default): the samples come as ``microbatch_grads``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; without ``axis_name``,
      ``update`` needs ``microbatch_grads`` of shape ``(n, *gradient.shape)``
      per leaf (``ValueError`` otherwise).

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.scale_by_gsnr(), optax.adam(1e-3))  # VR-Adam
      >>> params = {"w": jnp.zeros(3)}
      >>> samples = {"w": jnp.asarray([[1.0, 1.0, -1.0], [1.2, -1.0, 1.0]])}
      >>> updates, state = tx.update({"w": samples["w"].mean(0)}, tx.init(params),
      ...                            params, microbatch_grads=samples)
    """
    check_interval("min_scale", min_scale, 0.0, 1.0, low_closed=False)

    def update_fn(
        updates: optax.Updates,
        state: optax.EmptyState,
        params: optax.Params | None = None,
        *,
        microbatch_grads: optax.Updates | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params, extra_args
        moments = sample_moments(updates, microbatch_grads, axis_name, "scale_by_gsnr")
        scales = jax.tree.map(lambda m: gsnr_scale(m, min_scale), moments, is_leaf=is_moments)
        if axis_name is not None:
            updates_in = jax.tree.map(lambda m: m.mean, moments, is_leaf=is_moments)
        else:
            updates_in = updates
        scaled = jax.tree.map(
            lambda u, s, like: (u * s).astype(like.dtype), updates_in, scales, updates
        )
        return scaled, state

    return trainable_leaves_only(
        optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
    )


@roles.declare(count=Role.COUNT, factors=Role.EXACT, inner_state=Role.NESTED, shapes=Role.EXACT)
class AGVMState(NamedTuple):
    """State of [`agvm`][varjax.agvm]: the step count, the smoothed rate factor of each
    group (a dict from label to a scalar; the anchor's stays 1), the inner
    transform's state, and ``shapes``, a ``varjax._base.ShapeWitness`` (the
    parameters' tree and shapes as static data: no leaves, no bytes) that the
    gradient tree is checked against."""

    count: jax.Array
    factors: dict[Hashable, jax.Array]
    inner_state: optax.OptState
    shapes: ShapeWitness


def _group_cosine(first: list[jax.Array], second: list[jax.Array]) -> jax.Array:
    """Cosine similarity of two gradients of one group, given as lists of leaves;
    as ``torch.cosine_similarity``, the norms' product is floored at 1e-8."""
    dot = sum(jnp.vdot(a, b) for a, b in zip(first, second, strict=True))
    norm_first = jnp.sqrt(sum(jnp.vdot(a, a) for a in first))
    norm_second = jnp.sqrt(sum(jnp.vdot(b, b) for b in second))
    return dot / jnp.maximum(norm_first * norm_second, 1e-8)


def agvm(
    inner: optax.GradientTransformation,
    labels: Any | Callable[[optax.Params], Any],
    anchor: Hashable,
    momentum: float = 0.97,
    interval: int = 10,
    start_step: int = 0,
    min_ratio: float = 0.5,
    max_ratio: float = 10.0,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adaptive gradient variance modulation (AGVM; Xue et al., 2022, "Large-batch
    Optimization for Dense Visual Predictions"): give each group of parameters
    a rate factor that evens out its gradient variance against an anchor group.

    Parameters are split into groups by ``labels`` (a pytree of hashable
    labels like the parameters, or a function of the parameters returning
    one, as in ``optax.multi_transform``); ``anchor`` names the reference
    group (the backbone in the paper). The gradient samples of the step are
    split in two halves, and each group's variance is measured as ``D = 1 -
    cos(G_1, G_2)`` between the mean gradients of the halves, over all the
    group's parameters at once. Every ``interval`` steps from ``start_step``
    on, each group's factor moves towards ``sqrt(clip((D_anchor + 1e-6) /
    (D + 1e-6), min_ratio, max_ratio))`` by an EMA of ``momentum``; the
    factors start at 1. The mean gradient goes through ``inner`` and each
    group's output is multiplied by its factor, as the official code scales
    each group's learning rate (weight decay inside ``inner`` is scaled too).

    The samples come from the extra argument ``microbatch_grads`` (``n >= 2``
    gradients on a leading axis: the halves are the first ``n // 2`` and the
    rest; the incoming updates, normally their mean, go to ``inner``) or,
    with ``axis_name``, from the devices along that axis inside
    ``shard_map``/``pmap`` (devices below ``n // 2`` and the rest, as the
    official code's two groups of ranks; ``inner`` gets the mean across all).

    Defaults follow the official code (``Sense-X/AGVM``): momentum 0.97, the
    clip to [0.5, 10] and the 1e-6; the paper's interval is 10 (5 above
    about 1K batch size). The official configs start right after the
    learning-rate warm-up, which ``start_step`` reproduces. Differences: with
    Adam, the official code measures the cosine on Adam-preconditioned
    gradients; here it is always the raw gradients. The variance is computed
    every step and used on measuring steps only (one extra pass over the
    gradients). A measurement that is not finite, from a non-finite gradient
    or one so large that its squared norm overflows float32, leaves the
    factors as they are (in the EMA it would stay NaN for good).

    Args:
      inner: the optimizer whose output is scaled per group (learning rate
        included); extra arguments of ``update`` are forwarded to it.
      labels: a pytree of hashable group labels like the parameters, or a
        function of the parameters returning one.
      anchor: the label of the reference group, whose factor stays 1.
      momentum: the EMA decay of the factors, in [0, 1) (0.97 as the official
        code).
      interval: the factors move every ``interval`` steps, an integer >= 1.
      start_step: the first step that moves the factors, an integer >= 0
        (e.g. the end of the learning-rate warm-up).
      min_ratio: the lower clip of the variance ratio, > 0.
      max_ratio: the upper clip of the variance ratio, >= ``min_ratio``.
      axis_name: the named axis of ``shard_map`` or ``pmap`` whose devices
        each hold one gradient sample (the updates), with >= 2 devices;
        ``None`` (default): the samples come as ``microbatch_grads``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; without ``axis_name``,
      ``update`` needs ``microbatch_grads`` of shape ``(n, *gradient.shape)``
      per leaf (``ValueError`` otherwise).

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> params = {"backbone": jnp.zeros(4), "head": jnp.zeros(2)}
      >>> labels = {"backbone": "backbone", "head": "head"}
      >>> tx = varjax.agvm(optax.sgd(0.1, momentum=0.9), labels, anchor="backbone")
      >>> samples = {"backbone": jnp.ones((2, 4)), "head": jnp.asarray([[1.0, 1], [1, -1]])}
      >>> grads = {"backbone": jnp.ones(4), "head": jnp.asarray([1.0, 0.0])}
      >>> updates, state = tx.update(grads, tx.init(params), params, microbatch_grads=samples)
      >>> # D is 0 for the backbone and 1 for the head: factor 0.97 + 0.03 * sqrt(0.5)
      >>> round(float(state.factors["head"]), 4)
      0.9912
    """
    check_interval("momentum", momentum, 0.0, 1.0, high_closed=False)
    interval = check_integer("interval", interval, 1)
    start_step = check_integer("start_step", start_step, 0)
    check_interval("min_ratio", min_ratio, 0.0, low_closed=False)
    check_interval("max_ratio", max_ratio, min_ratio)
    inner = optax.with_extra_args_support(inner)

    def group_labels(tree: optax.Params) -> list[Hashable]:
        tree_labels = labels(tree) if callable(labels) else labels
        leaves = jax.tree.leaves(tree)
        # leaves without state (integer ones, see trainable_leaves_only) have no group
        is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
        with_masked = jax.tree.leaves(tree, is_leaf=is_masked)
        flat_labels = jax.tree.structure(tree, is_leaf=is_masked).flatten_up_to(tree_labels)
        flat = [y for x, y in zip(with_masked, flat_labels, strict=True) if not is_masked(x)]
        if leaves and anchor not in flat:
            raise ValueError(f"anchor {anchor!r} is not one of the labels {sorted(set(flat))}")
        return flat

    def init_fn(params: optax.Params) -> AGVMState:
        groups = dict.fromkeys(group_labels(params))
        factors = {label: jnp.ones([], jnp.float32) for label in groups}
        return AGVMState(zero_count(), factors, inner.init(params), shape_witness(params))

    def measured_factors(flat_labels, first, second) -> dict[Hashable, jax.Array]:
        first, second = jax.tree.leaves(first), jax.tree.leaves(second)
        variance = {}
        for label in dict.fromkeys(flat_labels):
            members = [i for i, x in enumerate(flat_labels) if x == label]
            cosine = _group_cosine([first[i] for i in members], [second[i] for i in members])
            variance[label] = 1.0 - cosine
        return {
            label: jnp.sqrt(jnp.clip((variance[anchor] + 1e-6) / (d + 1e-6), min_ratio, max_ratio))
            for label, d in variance.items()
        }

    def update_fn(
        updates: optax.Updates,
        state: AGVMState,
        params: optax.Params | None = None,
        *,
        microbatch_grads: optax.Updates | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AGVMState]:
        check_same_structure(updates, witness_shapes(state.shapes), "optimizer state")
        flat_labels = group_labels(updates)
        first, second = half_means(updates, microbatch_grads, axis_name, "agvm")
        if axis_name is not None:
            updates = jax.lax.pmean(updates, axis_name)
        measuring = (state.count >= start_step) & ((state.count - start_step) % interval == 0)
        target = measured_factors(flat_labels, first, second)
        factors = {  # a non-finite measurement would stay in the EMA for good
            label: jnp.where(
                measuring & jnp.isfinite(target[label]),
                momentum * old + (1.0 - momentum) * target[label],
                old,
            )
            for label, old in state.factors.items()
        }
        out, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        flat_out, treedef = jax.tree.flatten(out)
        scaled = [
            (u * factors[label]).astype(u.dtype)
            for u, label in zip(flat_out, flat_labels, strict=True)
        ]
        new_state = AGVMState(optax.safe_increment(state.count), factors, inner_state, state.shapes)
        return treedef.unflatten(scaled), new_state

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))


@roles.declare(count=Role.COUNT, estimate=Role.EXACT)
class QuantileClippingState(NamedTuple):
    """State of [`quantile_clipping`][varjax.quantile_clipping]: the step count and the running
    estimate of the median (or quantile) of the gradients, float32 at least."""

    count: jax.Array
    estimate: optax.Updates


def quantile_clipping(
    threshold: ScalarOrSchedule = 1.0,
    scope: Literal["global", "tensor", "element"] = "global",
    quantile: float = 0.5,
) -> optax.GradientTransformation:
    """Track the median of the gradients with clipped steps (Schaipp, Garrigos,
    Simsekli and Gower, 2024, "SGD with Clipping is Secretly Estimating the
    Median Gradient", since renamed "Tracking the Median of Gradients with a
    Stochastic Proximal Point Method").

    The running estimate ``m`` (0 at the start) takes one stochastic proximal
    point step with step size ``threshold`` on a median objective per
    gradient ``g``, and the updates become the new ``m``:

    - ``scope="global"``: geometric median of the whole gradient, ``m <- m +
      clip(g - m)``, the residual rescaled to norm ``threshold`` when its
      global norm is larger;
    - ``scope="tensor"``: the same per leaf (a geometric median per tensor);
    - ``scope="element"``: coordinate-wise, the residual clamped element by
      element; with ``quantile = p`` the objective is the pinball loss and
      the clamp is ``[-2 (1 - p) threshold, 2 p threshold]``, so that ``m``
      tracks the ``p``-quantile of each coordinate (``p = 0.5``: the median,
      clamp at ``+-threshold``).

    A squared-distance objective would give the EMA of heavy-ball momentum,
    the running mean; the median estimate is robust to heavy-tailed noise.
    With ``m`` reset to zero every step, the update is ``g`` clipped to
    ``threshold``: clipped SGD, hence the paper's title. Chain a learning
    rate (``optax.sgd``) or another transform after it.

    Source: the paper's text was not available to us; the equations follow
    from its stated construction (proximal steps on median objectives, whose
    special cases are clipping) and are checked in the tests against the
    proximal objective itself. The quantile generalisation is ours. A
    gradient entry that is not finite leaves its part of the estimate
    unchanged for that step (the whole tree, the leaf, or the element,
    following ``scope``).

    Args:
      threshold: the proximal step size, the largest move of the estimate per
        step, > 0, or a schedule.
      scope: ``"global"`` (default), ``"tensor"`` or ``"element"``, as above.
      quantile: the quantile tracked with ``scope="element"``, in (0, 1);
        must be 0.5 (the median) for the other scopes.

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.quantile_clipping(1.0, scope="global"), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> updates, state = tx.update({"w": jnp.asarray([3.0, 4.0])}, tx.init(params), params)
      >>> [round(float(u), 4) for u in updates["w"]]  # g clipped to norm 1, times -0.1
      [-0.06, -0.08]
    """
    if scope not in ("global", "tensor", "element"):
        raise ValueError(f"scope must be 'global', 'tensor' or 'element', got {scope!r}")
    check_interval("threshold", threshold, 0.0, low_closed=False)
    check_interval("quantile", quantile, 0.0, 1.0, low_closed=False, high_closed=False)
    if scope != "element" and quantile != 0.5:
        raise ValueError(f"quantile must be 0.5 unless scope='element', got {quantile!r}")

    def init_fn(params: optax.Params) -> QuantileClippingState:
        estimate = jax.tree.map(
            lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32)),
            params,
        )
        return QuantileClippingState(zero_count(), estimate)

    def element_step(g: jax.Array, m: jax.Array, tau: jax.Array) -> jax.Array:
        step = jnp.clip(g - m, -2.0 * (1.0 - quantile) * tau, 2.0 * quantile * tau)
        return m + jnp.where(jnp.isfinite(g), step, 0.0)

    def update_fn(
        updates: optax.Updates, state: QuantileClippingState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, QuantileClippingState]:
        del params
        tau = jnp.asarray(resolve(threshold, state.count), jnp.float32)
        check_same_structure(updates, state.estimate, "optimizer state")
        grads, treedef = jax.tree.flatten(updates)
        old = treedef.flatten_up_to(state.estimate)
        if scope == "element":
            new = [element_step(g.astype(m.dtype), m, tau) for g, m in zip(grads, old, strict=True)]
        else:
            # a residual whose norm is not finite leaves its part of the estimate alone
            residuals = [g.astype(m.dtype) - m for g, m in zip(grads, old, strict=True)]
            steps = clip_to_norm(residuals, tau, scope, non_finite="zero")
            new = [m + s for m, s in zip(old, steps, strict=True)]
        out = [m.astype(g.dtype) for m, g in zip(new, grads, strict=True)]
        estimate = treedef.unflatten(new)
        new_state = QuantileClippingState(optax.safe_increment(state.count), estimate)
        return treedef.unflatten(out), new_state

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))
