"""Low-precision weights: train bfloat16 (or float16) parameters without losing small updates.

Round-to-nearest loses every update smaller than half a unit in the last place
(ulp) of a bfloat16 weight: with 8 significant bits, a weight of 1.0 ignores any
step below 2**-8, and pure-bfloat16 AdamW trails float32. Three fixes, each a
transform chained after the whole update rule (after the learning rate), for
leaves of dtype bfloat16 (and float16 where it makes sense); float32 leaves
pass through untouched:

* [`stochastic_rounding`][varjax.stochastic_rounding] rounds ``p + u`` up or down at random, with
  the probability that makes the rounding unbiased (Gupta et al., 2015, and Zamirai et al., 2020,
  "Revisiting BFloat16 Training", arXiv 2010.06192). State: one PRNG key.
* [`kahan_summation`][varjax.kahan_summation] rounds to nearest and carries the rounding error to
  the next step in a compensation buffer (bfloat16 by default).
* [`split_mantissa`][varjax.split_mantissa] keeps the low 16 mantissa bits of a float32 master
  weight as a ``uint16`` beside the bfloat16 weight: the pair *is* the float32
  weight, bit for bit, at 2 extra bytes. Given the inner optimizer it also
  hands that one the float32 master weights, so the whole trajectory equals
  the float32 run.

How the update lands exactly
----------------------------
``optax.apply_updates`` computes ``(p + u).astype(p.dtype)`` in the promoted
dtype of ``p`` and ``u``. These transforms choose the new weight ``t`` (a value
of the parameter's dtype) and return, for a bfloat16 or float16 leaf, the
update ``u' = float32(t) - float32(p)`` **in float32**: ``p + u'`` is then
computed in float32, and whenever ``t - p`` is exact in float32 the sum is
exactly ``t`` and the cast back changes nothing. ``t - p`` of two bfloat16
values is exact in float32 when their binades are at most 16 apart (24
significant bits cover the 8 of the larger one plus the distance to the
smaller one's last bit); where ``t`` lies within a factor 2 of ``p`` (every
sub-ulp or small step) this is Sterbenz's lemma. For larger jumps, ``t`` comes
from rounding a float32 sum ``p + u`` of the same grid, which keeps it exact
in the tested cases (large and tiny updates, sign changes, zeros, subnormals);
where ``t == p`` the update is exactly zero, so infinite weights stay put.
A bfloat16 update could not do this: outside Sterbenz's range ``t - p`` rounds
in bfloat16 and the sum can miss ``t`` by an ulp, on every sign change. So
these transforms break, deliberately, the Optax habit that updates keep the
parameters' dtype: for low-precision leaves they are float32 (the other leaves
keep their dtype). ``optax.apply_updates`` and ``flax.nnx.Optimizer`` cast
the sum back to the parameter's dtype. Wrappers that build a zero update from
the incoming gradients (``optax.apply_if_finite``) must therefore wrap the
*inner* optimizer, not the chain with the rounding transform:
``low_precision_weights(optax.apply_if_finite(tx, 3))``. A zero update leaves
the weights and the compensation or mantissa state unchanged in all three.

The inner optimizer
-------------------
An Optax optimizer initialised on bfloat16 parameters keeps bfloat16 moments (``optax.adam``'s
``nu`` follows the parameters' dtype) and computes in bfloat16. [`in_float32`][varjax.in_float32]
runs any transform on float32 copies instead: its state is float32 (or whatever it chooses, e.g.
8-bit), it sees float32 gradients and parameters, and its updates are float32, which is what the
rounding transforms want. [`low_precision_weights`][varjax.low_precision_weights] puts the two
together, and [`bf16_adamw`][varjax.bf16_adamw] / [`bf16_adamw_8bit`][varjax.bf16_adamw_8bit] are
the ready optimizers.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import PyTree, ScalarOrSchedule, check_integer, check_same_structure
from varjax.alias import MaskOrFn, _adamw, adamw_8bit
from varjax.roles import Role

__all__ = [
    "KahanSummationState",
    "SplitMantissaState",
    "StochasticRoundingState",
    "bf16_adamw",
    "bf16_adamw_8bit",
    "combine_float32",
    "exact_float32",
    "in_float32",
    "kahan_summation",
    "landing_update",
    "low_precision_weights",
    "random_bits",
    "split_float32",
    "split_mantissa",
    "stochastic_round",
    "stochastic_rounding",
]

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
Rounding = Literal["stochastic", "kahan", "split", "nearest"]
_KEY_IMPL = "threefry2x32"


def _is_low(x: Any) -> bool:
    """Whether ``x`` is a bfloat16 or float16 array (a leaf these transforms round)."""
    return hasattr(x, "dtype") and jnp.dtype(x.dtype) in LOW_PRECISION


def _is_bf16(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.dtype(x.dtype) == jnp.dtype(jnp.bfloat16)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _need_params(name: str, params: Any) -> None:
    if params is None:
        raise ValueError(
            f"{name} needs params: pass them to update(), and chain it last (after the "
            "learning rate) so that it sees the whole update"
        )


# --------------------------------------------------------------------------
# Element-wise pieces
# --------------------------------------------------------------------------


def landing_update(target: jax.Array, param: jax.Array) -> jax.Array:
    """The float32 update that ``optax.apply_updates`` turns into ``target``.

    ``float32(target) - float32(param)``, or exactly zero where ``target ==
    param`` (so that an infinite weight that stays infinite gets 0, not NaN).
    ``(param + u).astype(param.dtype)`` is then ``target``; see the module
    docstring for when the difference is exact.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = jnp.asarray([1.0, 1.0, 0.0], jnp.bfloat16)
      >>> t = jnp.asarray([1.0078125, -3.0, 2.0**-130], jnp.bfloat16)
      >>> u = landing_update(t, p)
      >>> u.dtype, bool(jnp.all((p + u).astype(p.dtype) == t))
      (dtype('float32'), True)
    """
    t32, p32 = exact_float32(target), exact_float32(param)
    return jnp.where(target == param, jnp.zeros_like(t32), t32 - p32)


def _mix(h: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash with full avalanche (Wellons' "lowbias32")."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform ``uint32`` bits of ``shape``: a counter-based hash of each element's index,
    keyed by two words drawn from ``key``.

    ``jax.random.bits`` (threefry, 20 rounds per 64 bits) cost ten times the rest of
    a bfloat16 AdamW step on CPU; stochastic rounding needs 16 good bits per
    element, not cryptographic ones. Each element gets
    ``mix(mix(index * golden + k0) ^ k1)``, ``mix`` a bijective hash with full
    avalanche and ``(k0, k1)`` fresh threefry words per call. It is exact integer
    arithmetic on the global index, so the bits are the same under ``jit`` and
    without, and for any sharding of the array. Leaves of more than 2**32
    elements would repeat indices.
    """
    k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
    size = math.prod(shape)
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return _mix(_mix(index * jnp.uint32(0x9E3779B1) + k0) ^ k1)


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    """Round the float32 array ``x`` to ``dtype`` (bfloat16 or float16) up or down at random,
    so that the expected result is ``x``.

    With ``lo <= x <= hi`` the two neighbours of ``x`` in ``dtype``, the result is
    ``hi`` with probability ``(x - lo) / (hi - lo)``, else ``lo``; values of
    ``dtype`` come back unchanged. For bfloat16, the top half of a float32, this
    is the bit trick of torchao's ``_fp32_to_bf16_sr``: add 16 random bits to
    the float32 pattern and keep its top 16 bits (a carry rounds the magnitude
    away from zero), so the probability is exactly the low 16 bits over 2**16
    and the rounding is exactly unbiased (given uniform bits: they come from
    [`random_bits`][varjax.precision.random_bits]). Beyond the largest finite bfloat16 it
    rounds to it or to infinity in proportion. For float16 the probability is
    compared with a float32 uniform draw (resolution 2**-24); beyond the largest
    finite float16 (65504) it rounds to nearest. NaN and infinities pass
    through.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.full(10_000, 1.0 + 2.0**-10)  # a quarter of the way from 1 to 1 + 2**-7
      >>> y = stochastic_round(x, jnp.bfloat16, jax.random.key(0))
      >>> sorted(set(y.astype(float).tolist())), round(float(y.astype(float).mean()), 4)
      ([1.0, 1.0078125], 1.001)
    """
    dtype = jnp.dtype(dtype)
    x = jnp.asarray(x, jnp.float32)
    if dtype == jnp.dtype(jnp.bfloat16):
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        noise = random_bits(key, x.shape) >> 16
        top = ((bits + noise) >> 16).astype(jnp.uint16)
        rounded = jax.lax.bitcast_convert_type(top, jnp.bfloat16)
        return jnp.where(jnp.isfinite(x), rounded, x.astype(dtype))
    if dtype == jnp.dtype(jnp.float16):
        nearest = x.astype(dtype)
        above = exact_float32(nearest) > x
        other = jnp.nextafter(nearest, jnp.where(above, -jnp.inf, jnp.inf).astype(dtype))
        lo = jnp.where(above, other, nearest)
        hi = jnp.where(above, nearest, other)
        lo32, hi32 = exact_float32(lo), exact_float32(hi)
        span = jnp.where(hi32 > lo32, hi32 - lo32, 1.0)
        uniform = (random_bits(key, x.shape) >> 8).astype(jnp.float32) * 2.0**-24
        up = uniform < (x - lo32) / span
        rounded = jnp.where(up, hi, lo)
        finite = jnp.isfinite(rounded) & (jnp.abs(x) <= float(jnp.finfo(dtype).max))
        return jnp.where(finite, rounded, nearest)
    raise ValueError(f"dtype must be bfloat16 or float16, got {dtype}")


def split_float32(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split float32 ``x`` into its top 16 bits as bfloat16 (``x`` truncated towards zero) and its
    low 16 bits as uint16; [`combine_float32`][varjax.precision.combine_float32] inverts it.

    A NaN gets a quiet bfloat16 NaN as its top half (a NaN whose payload sits in
    the low bits would otherwise truncate to infinity).

    Examples:
      >>> import jax.numpy as jnp
      >>> hi, lo = split_float32(jnp.asarray([1.0 + 2.0**-20, -3.0]))
      >>> hi.tolist(), lo.tolist(), combine_float32(hi, lo).tolist()
      ([1.0, -3.0], [8, 0], [1.0000009536743164, -3.0])
    """
    # Bit casts between float32 and pairs of uint16 (low half first), not shifts and
    # masks: XLA:GPU (jax 0.11.2) miscompiled ``(bits & 0xFFFF).astype(uint16)`` of a
    # fused sum into 0s and 1s (benchmarks/bf16_backend_check.py).
    halves = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint16)
    top = jax.lax.bitcast_convert_type(halves[..., 1], jnp.bfloat16)
    top = jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, jnp.bfloat16), top)
    return top, halves[..., 0]


def combine_float32(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """The float32 whose top 16 bits are the bfloat16 ``hi`` and whose low 16 bits are ``lo``."""
    # shifts of widened halves, not a stack of the two: XLA wrote a stack's concatenate out
    # as a kernel of its own (compiled for an H100, a donated bfloat16 AdamW step with
    # stochastic rounding held two u16[..., 2] arrays: 8 bytes a parameter)
    top = jax.lax.bitcast_convert_type(jnp.asarray(hi, jnp.bfloat16), jnp.uint16)
    bits = (top.astype(jnp.uint32) << 16) | jnp.asarray(lo, jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def exact_float32(x: jax.Array) -> jax.Array:
    """``x.astype(float32)`` for a bfloat16 or float16 ``x``, immune to excess precision.

    XLA may skip the rounding of a value it converts to a narrower float and
    straight back (``xla_allow_excess_precision``, on by default; XLA:GPU does
    it): ``float32(bfloat16(y))`` can then be ``y`` itself, and a rounding error
    computed as ``y - float32(bfloat16(y))`` comes out zero. Here the narrow
    value is read from its bits, which XLA cannot skip: a bfloat16 is the top
    half of a float32; a float16's sign, exponent and fraction are moved into
    float32's fields (its subnormals, ``fraction * 2**-24``, are exact in
    float32).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> y = jnp.float32(1.0 + 2.0**-10)
      >>> float(jax.jit(lambda y: y - exact_float32(y.astype(jnp.bfloat16)))(y))
      0.0009765625
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.dtype(jnp.bfloat16):
        return combine_float32(x, jnp.zeros(x.shape, jnp.uint16))
    if x.dtype == jnp.dtype(jnp.float16):
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        negative = bits >= 0x8000
        exponent = (bits >> 10) % 32
        fraction = bits % 1024
        # normal numbers: rebias the exponent (15 -> 127); infinities and NaNs: all ones
        field = jnp.where(exponent == 31, jnp.uint32(255), exponent + 112)
        normal = jax.lax.bitcast_convert_type((field << 23) + (fraction << 13), jnp.float32)
        magnitude = jnp.where(exponent == 0, fraction.astype(jnp.float32) * 2.0**-24, normal)
        return jnp.where(negative, -magnitude, magnitude)
    return x.astype(jnp.float32)


def _sum32(param: jax.Array, update: jax.Array) -> jax.Array:
    """``param + update`` in float32: the value the rounding transforms round."""
    return param.astype(jnp.float32) + jnp.asarray(update).astype(jnp.float32)


# --------------------------------------------------------------------------
# Stochastic rounding
# --------------------------------------------------------------------------


@roles.declare(key=Role.EXACT)
class StochasticRoundingState(NamedTuple):
    """State of [`stochastic_rounding`][varjax.stochastic_rounding]: the raw data (``uint32[2]``) of
    a threefry PRNG key, split once per step (a plain array, so Orbax stores it)."""

    key: jax.Array


def stochastic_rounding(seed: int = 0) -> optax.GradientTransformation:
    """Round each low-precision weight's new value ``p + u`` stochastically: chain it last.

    For every bfloat16 or float16 leaf, the update becomes ``landing_update(stochastic_round(p + u),
    p)`` (float32), so that ``optax.apply_updates(p, u')`` equals ``p + u`` (computed in float32)
    rounded up or down at random, with expectation ``p + u``: an update far below half an ulp still
    moves the weight, in expectation by exactly ``u``, where round-to-nearest would freeze it.
    float32 (and wider) leaves pass through unchanged. The key lives in the state (``seed`` starts
    it); each step splits it and folds in the leaf's index, so a run is reproducible from the seed
    and gives the same bits under ``jit`` and without. The random bits
    ([`random_bits`][varjax.precision.random_bits]) depend on each element's global index, not on
    the leaf's sharding. The state is 8 bytes.

    Put the whole update rule, learning rate included, before it, and give that
    one float32 state with [`in_float32`][varjax.in_float32] (or use
    [`low_precision_weights`][varjax.low_precision_weights]).

    Args:
      seed: the integer seed of the rounding key.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from varjax.precision import in_float32, stochastic_rounding
      >>> tx = optax.chain(in_float32(optax.adamw(1e-3)), stochastic_rounding(seed=0))
      >>> params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones((4, 4), jnp.bfloat16)}, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> updates["w"].dtype, new["w"].dtype
      (dtype('float32'), dtype(bfloat16))
    """
    if not isinstance(seed, jax.core.Tracer):  # inside optax.inject_hyperparams it is an array
        seed = check_integer("seed", seed)

    def init_fn(params: PyTree) -> StochasticRoundingState:
        del params
        return StochasticRoundingState(
            key=jax.random.key_data(jax.random.key(seed, impl=_KEY_IMPL))
        )

    def update_fn(
        updates: PyTree, state: StochasticRoundingState, params: PyTree | None = None
    ) -> tuple[PyTree, StochasticRoundingState]:
        _need_params("stochastic_rounding", params)
        check_same_structure(updates, params, "params")
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key, impl=_KEY_IMPL))
        leaves, treedef = jax.tree.flatten(updates)
        out = []
        for index, (u, p) in enumerate(zip(leaves, jax.tree.leaves(params), strict=True)):
            if _is_low(p):
                target = stochastic_round(
                    _sum32(p, u), p.dtype, jax.random.fold_in(step_key, index)
                )
                u = landing_update(target, p)
            out.append(u)
        return jax.tree.unflatten(treedef, out), StochasticRoundingState(
            key=jax.random.key_data(key)
        )

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------
# Kahan summation
# --------------------------------------------------------------------------


# the compensation is the rounding error itself: quantized, it would be noise
@roles.declare(compensation=Role.EXACT)
class KahanSummationState(NamedTuple):
    """State of [`kahan_summation`][varjax.kahan_summation]: per low-precision leaf, the rounding
    error not yet applied (``optax.MaskedNode()`` for the other leaves)."""

    compensation: PyTree


def kahan_summation(compensation_dtype: Any = None) -> optax.GradientTransformation:
    """Round each low-precision weight to nearest and carry the rounding error to the
    next step (Kahan-compensated summation): chain it last.

    Per bfloat16 or float16 leaf, with ``c`` the compensation (zero at first),
    in float32: ``x = p + (u + c)``; the new weight is ``t = round_to_nearest(x)``
    and the new compensation ``c = x - t`` (exact in float32, at most half an ulp
    of ``t``), stored in ``compensation_dtype``. The update is
    ``landing_update(t, p)`` (float32), so ``optax.apply_updates`` lands on
    ``t``. ``p + c`` tracks the exact running sum ``p_0 + sum(u)``: the only
    errors left are float32's rounding of ``x`` and the storage rounding of
    ``c``, each step at most ``2**-9 |c|`` in bfloat16 (relative precision
    2**-8), so the weight stays within half an ulp plus about ``steps * 2**-10``
    ulps of the exact sum, where round-to-nearest drops every sub-half-ulp
    update entirely. A float32 compensation makes the storage rounding
    negligible (``2**-25 |c|``). float32 leaves pass through unchanged. A
    non-finite ``x - t`` (a weight that overflowed or became NaN) resets the
    compensation to zero instead of poisoning it.

    Args:
      compensation_dtype: the dtype of the compensation buffers; ``None`` (the
        default) gives each leaf its own dtype (bfloat16 for bfloat16 weights,
        2 bytes a parameter). For float16 weights, whose small residuals fall
        into float16's subnormals, float32 is the better choice.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from varjax.precision import kahan_summation
      >>> tx = kahan_summation()
      >>> p = {"w": jnp.ones(3, jnp.bfloat16)}
      >>> state = tx.init(p)
      >>> for _ in range(8):  # eight steps of 2**-10, an eighth of an ulp of 1.0 each
      ...     u, state = tx.update({"w": jnp.full(3, 2.0**-10)}, state, p)
      ...     p = optax.apply_updates(p, u)
      >>> p["w"].tolist()  # round-to-nearest would have kept 1.0
      [1.0078125, 1.0078125, 1.0078125]
    """
    if compensation_dtype is not None:
        compensation_dtype = jnp.dtype(compensation_dtype)
        if not jnp.issubdtype(compensation_dtype, jnp.floating):
            raise ValueError(
                f"compensation_dtype must be a floating dtype or None, got {compensation_dtype}"
            )

    def init_fn(params: PyTree) -> KahanSummationState:
        def buffer(p: Any) -> Any:
            if not _is_low(p):
                return optax.MaskedNode()
            return jnp.zeros_like(p, dtype=compensation_dtype or p.dtype)

        return KahanSummationState(compensation=jax.tree.map(buffer, params))

    def update_fn(
        updates: PyTree, state: KahanSummationState, params: PyTree | None = None
    ) -> tuple[PyTree, KahanSummationState]:
        _need_params("kahan_summation", params)
        check_same_structure(updates, params, "params")

        def leaf(u: Any, p: Any, c: Any) -> tuple[Any, Any]:
            if _is_masked(c):
                return u, c
            x = p.astype(jnp.float32) + (jnp.asarray(u).astype(jnp.float32) + c.astype(jnp.float32))
            target = x.astype(p.dtype)
            residual = x - exact_float32(target)
            residual = jnp.where(jnp.isfinite(residual), residual, 0.0)
            return landing_update(target, p), residual.astype(c.dtype)

        pairs = jax.tree.map(leaf, updates, params, state.compensation)
        treedef = jax.tree.structure(updates)
        flat = treedef.flatten_up_to(pairs)
        new_updates = treedef.unflatten([u for u, _ in flat])
        compensation = treedef.unflatten([c for _, c in flat])
        return new_updates, KahanSummationState(compensation=compensation)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------
# Split mantissa
# --------------------------------------------------------------------------


# the low bits are part of the weights (a copy of the parameters, with the bf16 leaf)
@roles.declare(low_bits=Role.PARAMETERS, inner_state=Role.NESTED)
class SplitMantissaState(NamedTuple):
    """State of [`split_mantissa`][varjax.split_mantissa]: per bfloat16 leaf the low 16 bits of its
    float32 master weight (``uint16``; ``optax.MaskedNode()`` for the other
    leaves), and the inner optimizer's state (``optax.EmptyState()`` without one)."""

    low_bits: PyTree
    inner_state: PyTree


def _master(params: PyTree, low_bits: PyTree) -> PyTree:
    """The float32 master weights: bfloat16 leaves joined with their low bits."""
    return jax.tree.map(
        lambda p, lo: p if _is_masked(lo) else combine_float32(p, lo), params, low_bits
    )


def _as_float32(tree: PyTree, like: PyTree) -> PyTree:
    """Leaves of ``tree`` cast to float32 where the matching leaf of ``like`` is low-precision."""
    return jax.tree.map(lambda x, p: x.astype(jnp.float32) if _is_low(p) else x, tree, like)


def split_mantissa(
    inner: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Keep the low 16 mantissa bits of float32 master weights beside the bfloat16
    weights: the two together are the float32 weights, bit for bit.

    A float32 ``w`` is its top 16 bits (a bfloat16: ``w`` *truncated* towards zero) and its low 16
    bits. The parameters hold the top half and the state a ``uint16`` with the low half, 2 bytes a
    parameter. Each step, per bfloat16 leaf: ``w = combine(p, low_bits)``; ``w' = w + u`` in
    float32, exactly what ``optax.apply_updates`` does to a float32 weight; ``p', low_bits' =
    split(w')``, and the update is ``landing_update(p', p)`` (float32), so that
    ``optax.apply_updates`` lands on ``p'``. The forward pass therefore sees the master weight
    truncated to bfloat16, not rounded to nearest (up to one bfloat16 ulp below it in magnitude,
    half an ulp on average): the trade-off of BF16FusedAdamW's 16+16 split, which saves the master
    copy's other 2 bytes. float32 leaves pass through unchanged; float16 leaves raise ``ValueError``
    (float16 is not the top half of a float32: use [`kahan_summation`][varjax.kahan_summation] or
    [`stochastic_rounding`][varjax.stochastic_rounding]).

    With ``inner`` (any transform, the whole update rule with its learning
    rate), ``split_mantissa(inner)`` runs it on the float32 master weights: its
    state is initialised from float32 copies of the parameters, it gets the
    gradients in float32 and the master weights as ``params``. Given the same
    gradients, the reconstructed float32 weights then follow the float32-weight
    run of ``inner`` bit for bit, weight decay and every other read of the
    parameters included, as far as XLA compiles the two steps' arithmetic
    alike: it may contract a multiply and an add into one fused multiply-add in
    one program and not in the other (measured on CPU: with bfloat16 gradients,
    0.2% of the weights of a 33 x 17 leaf one float32 ulp apart after two Adam
    steps; with float32 gradients none over 200 steps). Without ``inner``,
    chain it last after an update rule (best in float32 via
    [`in_float32`][varjax.in_float32]): a rule that reads the parameters
    (decoupled weight decay, AdamP's projection) then reads the truncated
    bfloat16 weights, off by less than one bfloat16 ulp (2**-7 relative), so
    the weight-decay term of each step is off by less than ``2**-7`` of itself.

    Args:
      inner: the update rule to run on the float32 master weights, or ``None``
        for the transform to chain last.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from varjax.precision import combine_float32, split_mantissa
      >>> tx = split_mantissa(optax.sgd(1e-3))
      >>> p = {"w": jnp.ones(2, jnp.bfloat16)}
      >>> state = tx.init(p)
      >>> u, state = tx.update({"w": jnp.asarray([1.0, -1.0], jnp.bfloat16)}, state, p)
      >>> p = optax.apply_updates(p, u)
      >>> combine_float32(p["w"], state.low_bits["w"]).tolist()  # float32 1 -+ 1e-3
      [0.9990000128746033, 1.0010000467300415]
    """

    def init_fn(params: PyTree) -> SplitMantissaState:
        def bits(p: Any) -> Any:
            if hasattr(p, "dtype") and jnp.dtype(p.dtype) == jnp.dtype(jnp.float16):
                raise ValueError(
                    "split_mantissa splits float32 into bfloat16 + uint16; a float16 leaf "
                    "has no such split: use kahan_summation or stochastic_rounding for it"
                )
            return jnp.zeros_like(p, dtype=jnp.uint16) if _is_bf16(p) else optax.MaskedNode()

        low_bits = jax.tree.map(bits, params)
        if inner is None:
            return SplitMantissaState(low_bits=low_bits, inner_state=optax.EmptyState())
        return SplitMantissaState(
            low_bits=low_bits, inner_state=inner.init(_master(params, low_bits))
        )

    def update_fn(
        updates: PyTree,
        state: SplitMantissaState,
        params: PyTree | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, SplitMantissaState]:
        _need_params("split_mantissa", params)
        check_same_structure(updates, params, "params")
        master = _master(params, state.low_bits)
        inner_state = state.inner_state
        if inner is not None:
            updates, inner_state = optax.with_extra_args_support(inner).update(
                _as_float32(updates, params), inner_state, master, **extra_args
            )

        def leaf(u: Any, p: Any, w: Any, lo: Any) -> tuple[Any, Any]:
            if _is_masked(lo):
                return u, lo
            hi, lo = split_float32(w + jnp.asarray(u).astype(jnp.float32))
            return landing_update(hi, p), lo

        pairs = jax.tree.map(leaf, updates, params, master, state.low_bits)
        treedef = jax.tree.structure(updates)
        flat = treedef.flatten_up_to(pairs)
        new_updates = treedef.unflatten([u for u, _ in flat])
        low_bits = treedef.unflatten([lo for _, lo in flat])
        return new_updates, SplitMantissaState(low_bits=low_bits, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# The inner optimizer in float32, and the ready optimizers
# --------------------------------------------------------------------------


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Run ``tx`` in float32 on low-precision parameters.

    Its state is initialised from float32 copies of the bfloat16 and float16 parameters (so Adam's
    moments are float32, or 8-bit in a quantized optimizer, instead of following the weights into
    bfloat16); each update hands it the gradients and the parameters of those leaves in float32, and
    its updates come out in float32, ready for [`stochastic_rounding`][varjax.stochastic_rounding]
    or [`kahan_summation`][varjax.kahan_summation] chained after it, or for ``optax.apply_updates``,
    which then rounds ``p + u`` to nearest once (a bfloat16 update added in bfloat16 would round
    twice). Other leaves pass unchanged. Extra arguments are forwarded.

    Args:
      tx: the transform to run in float32.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from varjax.precision import in_float32
      >>> state = in_float32(optax.adam(1e-3)).init({"w": jnp.zeros(3, jnp.bfloat16)})
      >>> state[0].nu["w"].dtype
      dtype('float32')
    """
    inner = optax.with_extra_args_support(tx)

    def init_fn(params: PyTree) -> PyTree:
        return inner.init(_as_float32(params, params))

    def update_fn(
        updates: PyTree, state: PyTree, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, PyTree]:
        if params is None:
            return inner.update(updates, state, None, **extra_args)
        check_same_structure(updates, params, "params")
        return inner.update(
            _as_float32(updates, params), state, _as_float32(params, params), **extra_args
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


ROUNDINGS = ("stochastic", "kahan", "split", "nearest")


def low_precision_weights(
    tx: optax.GradientTransformation,
    rounding: Rounding = "stochastic",
    *,
    seed: int = 0,
    compensation_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Train bfloat16 weights with the update rule ``tx`` (learning rate included).

    * ``"stochastic"``: ``chain(in_float32(tx), stochastic_rounding(seed))``;
      state: ``tx``'s plus an 8-byte key.
    * ``"kahan"``: ``chain(in_float32(tx), kahan_summation(compensation_dtype))``;
      plus 2 bytes a parameter.
    * ``"split"``: ``split_mantissa(tx)``: the float32 trajectory, bit for bit;
      plus 2 bytes a parameter.
    * ``"nearest"``: ``in_float32(tx)``: round-to-nearest once per step, the
      baseline that loses sub-half-ulp updates.

    float32 leaves get plain ``tx``. To skip non-finite steps, wrap ``tx``:
    ``low_precision_weights(optax.apply_if_finite(tx, 3))``.

    Args:
      tx: the update rule, ending with its learning rate.
      rounding: one of ``"stochastic"``, ``"kahan"``, ``"split"``, ``"nearest"``.
      seed: the seed of the stochastic rounding key.
      compensation_dtype: the Kahan compensation's dtype (``None``: the weights').

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from varjax.precision import low_precision_weights
      >>> tx = low_precision_weights(optax.adam(1e-3), "kahan")
      >>> params = {"w": jnp.ones(4, jnp.bfloat16)}
      >>> updates, _ = tx.update({"w": jnp.ones(4, jnp.bfloat16)}, tx.init(params), params)
      >>> updates["w"].dtype  # float32, so that apply_updates lands on the rounded value
      dtype('float32')
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "split":
        return split_mantissa(tx)
    if rounding == "nearest":
        return in_float32(tx)
    last = (
        stochastic_rounding(seed)
        if rounding == "stochastic"
        else kahan_summation(compensation_dtype)
    )
    return optax.chain(in_float32(tx), last)


def bf16_adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    *,
    mask: MaskOrFn = None,
    rounding: Rounding = "stochastic",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """``optax.adamw`` for bfloat16 weights: float32 moments, and the new weights
    rounded by ``rounding`` (see [`low_precision_weights`][varjax.low_precision_weights]; default
    stochastic rounding). Weights and state: 2 + 8 bytes a parameter (12 with
    ``"kahan"`` or ``"split"``), against 12 for AdamW on float32 weights.

    Args:
      learning_rate: the learning rate, a float or an ``optax.Schedule``.
      b1: the decay of the first moment, in [0, 1).
      b2: the decay of the second moment, in [0, 1).
      eps: added to the root of the second moment, >= 0.
      weight_decay: decoupled weight decay (AdamW's), >= 0, float or schedule.
      mask: which leaves take weight decay, as in ``optax.adamw``.
      rounding: how the new bfloat16 weights are rounded: ``"stochastic"``, ``"kahan"``, ``"split"``
        or ``"nearest"`` ([`low_precision_weights`][varjax.low_precision_weights]).
      seed: the seed of the stochastic rounding key.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.bf16_adamw(1e-3, weight_decay=0.1)
      >>> state = tx.init({"w": jnp.zeros((128, 64), jnp.bfloat16)})
    """
    # varjax's AdamW (optax.scale_by_adam, decoupled weight decay, the learning rate):
    # its arguments are checked, integer leaves keep still, a wrong gradient tree is named
    tx = _adamw(learning_rate, b1, b2, eps, weight_decay, mask=mask)
    return low_precision_weights(tx, rounding, seed=seed)


def bf16_adamw_8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    *,
    mask: MaskOrFn = None,
    rounding: Rounding = "stochastic",
    seed: int = 0,
    block_size: int | None = None,
    min_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``varjax.adamw_8bit`` for bfloat16 weights: about 4 bytes a parameter of weights and state (2
    for the weights, 2 for the 8-bit moments, plus block scales), against 12 for AdamW on float32
    weights; ``"kahan"`` and ``"split"`` add 2. The new weights are rounded by ``rounding`` (see
    [`low_precision_weights`][varjax.low_precision_weights]; default stochastic rounding). Leaves
    under ``min_size`` elements keep float32 moments.

    Args:
      learning_rate: the learning rate, a float or an ``optax.Schedule``.
      b1: the decay of the first moment, in [0, 1).
      b2: the decay of the second moment, in [0, 1).
      eps: added to the root of the second moment, >= 0.
      weight_decay: decoupled weight decay (AdamW's), >= 0, float or schedule.
      mask: which leaves take weight decay, as in ``optax.adamw``.
      rounding: how the new bfloat16 weights are rounded: ``"stochastic"``, ``"kahan"``, ``"split"``
        or ``"nearest"`` ([`low_precision_weights`][varjax.low_precision_weights]).
      seed: the seed of the stochastic rounding key.
      block_size: entries per quantization block along the last axis; ``None``:
        256.
      min_size: leaves with fewer elements keep float32 moments; ``None``: 4096.

    Examples:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.bf16_adamw_8bit(1e-3)
      >>> state = tx.init({"w": jnp.zeros((64, 1024), jnp.bfloat16)})
      >>> print(round(varjax.state_bytes(state) / (64 * 1024), 2))  # 2 x (1 + 4 / 256)
      2.03
    """
    tx = adamw_8bit(
        learning_rate,
        b1,
        b2,
        eps,
        weight_decay,
        mask=mask,
        block_size=block_size,
        min_size=min_size,
    )
    return low_precision_weights(tx, rounding, seed=seed)
