"""``quantize_state``: keep any transform's optimizer state in 8 or 4 bits between steps."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varjax.quantization.blockwise import (
    block_absmax,
    dequantize_blockwise,
    pack_4bit,
    quantize_blockwise,
    unpack_4bit,
)
from varjax.quantization.codes import default_maps

PyTree = Any

# Inner-state fields that hold non-negative second moments (Optax and varjax
# names, plus PyTorch's): they get the unsigned map, everything else the signed one.
UNSIGNED_FIELDS = frozenset({"nu", "nu_max", "v", "exp_avg_sq", "max_exp_avg_sq"})
# Inner-state fields that hold a copy of the parameters (varjax IGT's true parameters,
# Optax's schedule-free ``z``, DoG's and DoWG's ``init_params``, Prodigy's ``params0``,
# Mechanic's ``x0``): they stay in full precision, since parameters rounded to 8 bits
# are another model, and a distance to rounded starting parameters is noise.
PARAMETER_FIELDS = frozenset({"true_params", "z", "init_params", "params0", "x0"})


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax"],
    meta_fields=["signed", "bits", "shape"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A float array stored as block-wise codes: ``codes`` (uint8; at 4 bits two codes
    per byte along the last axis) and one float32 ``absmax`` per block of the last
    axis. ``signed`` tells which of the two maps made the codes and ``shape`` is
    the array's own."""

    codes: jax.Array
    absmax: jax.Array
    signed: bool
    bits: int
    shape: tuple[int, ...]


class QuantizedState(NamedTuple):
    """State of :func:`quantize_state`: the inner state with large float leaves quantized,
    the number of steps skipped for a non-finite gradient or new state, and the PRNG key of
    stochastic rounding (``None`` for nearest rounding)."""

    inner_state: PyTree
    skipped: jax.Array
    key: jax.Array | None = None


def _is_value_holder(x: Any) -> bool:
    """Whether ``x`` wraps one array the way a Flax NNX ``Variable`` does.

    ``nnx.Optimizer`` hands ``init`` the parameters as ``Variable`` objects, so
    the inner state holds ``Param(zeros)``. A quantized leaf replaces the whole
    ``Variable``: nested inside it, ``QuantizedArray`` would sit where the
    optimizer's later updates, which come without ``Variable`` wrappers, put
    its ``codes`` and ``absmax``, and the two would no longer line up.
    """
    return hasattr(x, "get_value") and hasattr(x, "get_metadata")


def _under_field(path: tuple, names: frozenset[str]) -> bool:
    """Whether ``path`` passes through an attribute (a state NamedTuple's field) in
    ``names``. Dict keys do not count, so a parameter called ``v`` is not a field."""
    return any(isinstance(key, jax.tree_util.GetAttrKey) and key.name in names for key in path)


def is_second_moment(path: tuple) -> bool:
    """Whether a state leaf sits under a field named like a second moment.

    Only attribute names count (the fields of Optax's and varjax's state
    NamedTuples), not dict keys, so a parameter called ``v`` is not mistaken
    for a second moment.
    """
    return _under_field(path, UNSIGNED_FIELDS)


def holds_parameters(path: tuple) -> bool:
    """Whether a state leaf sits under a field named like a copy of the parameters
    (:data:`PARAMETER_FIELDS`); as :func:`is_second_moment`, only attribute names count."""
    return _under_field(path, PARAMETER_FIELDS)


def _check_map(name: str, code: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    code = np.asarray(code, np.float32)
    low = -1.0 if signed else 0.0
    if (
        code.shape != (2**bits,)
        or np.any(np.diff(code) < 0)
        or code.min() < low
        or code.max() != 1.0
    ):
        raise ValueError(
            f"{name} must be a sorted array of 2**bits = {2**bits} values in "
            f"[{low:g}, 1] ending at 1, got shape {code.shape}"
        )
    return code


@dataclasses.dataclass(frozen=True)
class _Codec:
    """The settings that compress and expand a state, hashable: the jitted functions
    below compile once per codec and state layout, shared by every
    :func:`quantize_state` built with equal settings (``optax.inject_hyperparams``
    builds a new one at every step)."""

    bits: int
    block_size: int
    min_size: int
    is_unsigned: Callable[[tuple], bool]
    is_full_precision: Callable[[tuple], bool]
    signed_map: tuple[float, ...]
    unsigned_map: tuple[float, ...]

    def code(self, signed: bool) -> np.ndarray:
        return np.asarray(self.signed_map if signed else self.unsigned_map, np.float32)

    def should_quantize(self, path: tuple, x: Any) -> bool:
        return (
            not self.is_full_precision(path)
            and isinstance(x, jax.Array | np.ndarray)
            and jnp.issubdtype(x.dtype, jnp.floating)
            and x.size >= max(self.min_size, 1)
        )


@functools.partial(jax.jit, static_argnums=0)
def _compress(codec: _Codec, tree: PyTree, key: jax.Array | None) -> PyTree:
    """Quantize the float leaves of ``tree`` with at least ``min_size`` elements."""
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_value_holder)
    out = []
    for i, (path, x) in enumerate(paths_and_leaves):
        value = x.get_value() if _is_value_holder(x) else x  # a Flax NNX Variable holds it
        if not codec.should_quantize(path, value):
            out.append(x)
            continue
        signed = not codec.is_unsigned(path)
        leaf_key = None if key is None else jax.random.fold_in(key, i)
        code = codec.code(signed)
        # times a one from behind a barrier: in a jitted init the inner state's zeros are
        # then made inside the quantizing loop, never stored in float32, where XLA would
        # constant-fold them (34 s of compilation for one 4096x4096 leaf on CPU)
        value = value * jax.lax.optimization_barrier(jnp.ones((), value.dtype))
        codes, absmax = quantize_blockwise(value, code, codec.block_size, key=leaf_key)
        if codec.bits == 4:
            codes = pack_4bit(codes)
        out.append(QuantizedArray(codes, absmax, signed, codec.bits, tuple(value.shape)))
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=0)
def _expand(codec: _Codec, tree: PyTree) -> PyTree:
    """Dequantize every :class:`QuantizedArray` of ``tree``."""

    def leaf(x: Any) -> Any:
        if not isinstance(x, QuantizedArray):
            return x
        codes = x.codes
        if x.bits == 4:
            codes = unpack_4bit(codes, x.shape[-1] if x.shape else 1).reshape(x.shape)
        return dequantize_blockwise(codes, x.absmax, codec.code(x.signed), codec.block_size)

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, QuantizedArray))


def _all_absmax_finite(absmaxes: list[jax.Array]) -> jax.Array:
    """Whether every element of the block absmax arrays ``absmaxes`` is finite.

    On one device all of them are checked at once, in one small kernel: one check
    per leaf added 241 kernels and 0.41 ms of summed kernel time to an 8-bit AdamW
    step at 251M parameters on an H100 (4.31 ms before), at once 3 kernels and
    0.11 ms. Over several devices each leaf is checked where it lies, since joining
    sharded arrays would gather them.
    """
    if len(absmaxes) > 1 and jax.device_count() == 1:
        absmaxes = [jnp.concatenate([jnp.ravel(a) for a in absmaxes])]
    return all_finite(absmaxes)


# Whether update_fn computes the new inner state twice (see update_fn); ``None``: on
# every platform but the CPU. On a GPU, XLA fuses the first pass (moment update and
# block max) into one reduction that writes only the absmax. XLA:CPU fuses neither a
# reduce-window nor a reduce with what computes its operand, so there the first pass
# writes the new moments anyway and the second pass only adds temporaries (at 4096x4096,
# adamw_8bit: 24.0 bytes of XLA temporaries per parameter against 8.1 in one pass).
_TWO_PASSES: bool | None = None


def _use_two_passes() -> bool:
    return jax.default_backend() != "cpu" if _TWO_PASSES is None else _TWO_PASSES


def _leaves_with_stored(stored: PyTree, new: PyTree) -> tuple[list, list, Any]:
    """The leaves of a new inner state (a Flax NNX ``Variable`` counts as one), the
    stored leaves at the same places (a :class:`QuantizedArray` where the leaf is kept
    quantized), and the new state's treedef."""
    leaves, treedef = jax.tree_util.tree_flatten(new, is_leaf=_is_value_holder)
    return leaves, treedef.flatten_up_to(stored), treedef


def _value(x: Any) -> Any:
    return x.get_value() if _is_value_holder(x) else x  # a Flax NNX Variable holds it


def _new_absmax(codec: _Codec, stored: PyTree, new: PyTree) -> list[jax.Array | None]:
    """The block absmax of each leaf of the new inner state ``new`` that ``stored`` keeps
    quantized (``None`` for the others), in the order of ``new``'s leaves.

    Only these reductions of the new state are used, so XLA can fuse the elementwise
    moment update into them and never write the new moments in float32; the step then
    computes them a second time to encode them (:func:`_encode`).
    """
    leaves, stored_leaves, _ = _leaves_with_stored(stored, new)
    return [
        block_absmax(_value(x), codec.block_size) if isinstance(old, QuantizedArray) else None
        for x, old in zip(leaves, stored_leaves, strict=True)
    ]


def _encode(
    codec: _Codec,
    stored: PyTree,
    new: PyTree,
    absmax: list[jax.Array | None],
    finite: jax.Array,
    key: jax.Array | None,
) -> PyTree:
    """The stored state after a step: each leaf of ``new`` that ``stored`` keeps quantized
    encoded with its block ``absmax`` (from :func:`_new_absmax`), the others as they are,
    where ``finite``; ``stored`` itself where not. The select is elementwise, so XLA fuses
    it with the encoding."""
    leaves, stored_leaves, treedef = _leaves_with_stored(stored, new)
    out = []
    for i, (x, old, amax) in enumerate(zip(leaves, stored_leaves, absmax, strict=True)):
        if not isinstance(old, QuantizedArray):
            out.append(jax.tree.map(lambda n, o: jnp.where(finite, n, o), x, old))
            continue
        leaf_key = None if key is None else jax.random.fold_in(key, i)
        codes, _ = quantize_blockwise(
            _value(x), codec.code(old.signed), codec.block_size, key=leaf_key, absmax=amax
        )
        if old.bits == 4:
            codes = pack_4bit(codes)
        codes = jnp.where(finite, codes, old.codes)
        amax = jnp.where(finite, amax, old.absmax)
        out.append(dataclasses.replace(old, codes=codes, absmax=amax))
    return jax.tree.unflatten(treedef, out)


def _barrier(tree: PyTree) -> PyTree:
    """``tree`` through one ``jax.lax.optimization_barrier`` over its array leaves (other
    leaves, such as Python numbers among the extra arguments, pass as they are): what is
    computed from the outputs is neither merged with what was computed from the inputs
    (common-subexpression elimination) nor started before all the inputs exist."""
    leaves, treedef = jax.tree.flatten(tree)
    where = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array | np.ndarray)]
    held = jax.lax.optimization_barrier([leaves[i] for i in where])
    for i, x in zip(where, held, strict=True):
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every element of every leaf is finite, as a boolean scalar.

    On CPU it is read as ``isfinite(sum(x - x))`` (``inf - inf`` and ``nan - nan``
    are NaN, and a sum with a NaN is NaN), which XLA:CPU fuses into one pass,
    where ``all(isfinite(x))`` first writes a boolean array as large as ``x``.
    (``max(abs(x))`` would not do: XLA:CPU's max drops a NaN.) Elsewhere it is
    ``all(isfinite(x))``.

    >>> all_finite({"a": jnp.ones(3), "b": jnp.asarray([1.0, jnp.inf])}).item()
    False
    """

    def finite(x: jax.Array) -> jax.Array:
        return jax.lax.platform_dependent(
            x,
            cpu=lambda x: jnp.isfinite(jnp.sum(x - x)),
            default=lambda x: jnp.all(jnp.isfinite(x)),
        )

    return functools.reduce(jnp.logical_and, map(finite, jax.tree.leaves(tree)), jnp.asarray(True))


def quantize_state(
    inner: optax.GradientTransformation,
    *,
    bits: int = 8,
    block_size: int | None = None,
    min_size: int = 4096,
    unsigned: Callable[[tuple], bool] | None = None,
    full_precision: Callable[[tuple], bool] | None = None,
    signed_map: np.ndarray | None = None,
    unsigned_map: np.ndarray | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Store ``inner``'s optimizer state block-wise quantized to 8 or 4 bits between steps
    (Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization"; Li et
    al., 2023, "Memory Efficient Optimizers with 4-bit States").

    Every floating-point leaf of the inner state with at least ``min_size``
    elements is kept as codes of a quantization map plus one float32 absmax per
    ``block_size`` elements of its last axis. Smaller leaves, step counts and
    other non-float leaves stay as they are. Each step dequantizes, runs
    ``inner.update`` and quantizes the new state.

    Leaves under a state field named like a second moment (``nu``, ``nu_max``,
    ``v``, ``exp_avg_sq``) get the unsigned map and the rest the signed one;
    pass ``unsigned(key_path) -> bool`` to choose otherwise. An unsigned map
    clips negative values to zero, so only non-negative moments may use it.
    Leaves under a field that holds a copy of the parameters (``true_params``,
    ``z``, ``init_params``, ``params0``, ``x0``: IGT, schedule-free, DoG,
    Prodigy, Mechanic) stay in full precision; pass
    ``full_precision(key_path) -> bool`` to choose which leaves stay unquantized
    instead.

    - ``bits=8`` (default ``block_size=256``, about 1.02 bytes per element):
      bitsandbytes' dynamic maps and defaults, codes equal to its
      ``quantize_blockwise``.
    - ``bits=4`` (default ``block_size=128``, about 0.53 bytes per element, two
      codes per byte): the maps of Li et al. (:func:`default_maps`): a dynamic
      map for first moments and a linear map without zero for second moments.
      Their rank-1 normalisation of second moments is not implemented: blocks
      of 128 are used for both.

    ``signed_map`` and ``unsigned_map`` replace the maps (sorted, ``2**bits``
    values, largest 1). Rounding is to the nearest entry; with
    ``stochastic_rounding=True`` it is unbiased stochastic rounding between the
    two entries around each value, driven by a PRNG key (from ``seed``) kept in
    the state, so a restored checkpoint continues identically.

    A NaN or Inf would poison a block's absmax and, with it, the whole block of
    state. A step is therefore skipped when the gradient has one, and also when
    a finite gradient overflows the new state (a gradient of ``1e20`` squares
    past float32's range in Adam's second moment), which the new absmax shows:
    the updates are zero, the state is left unchanged and ``skipped`` is
    incremented, as ``optax.apply_if_finite`` does. (Full-precision Adam keeps
    an infinite second moment and freezes that one element; here its block of
    ``block_size`` neighbours would turn to NaN.) Only the wrapped transform
    is skipped: a weight decay or learning-rate schedule chained after the
    wrapper still acts, so wrap the whole chain, as the ready optimizers
    (:func:`varjax.adamw_8bit` and the others) do, to skip the whole step.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from varjax.quantization import quantize_state
      >>> tx = optax.chain(quantize_state(optax.scale_by_adam()), optax.scale(-1e-3))
      >>> params = {"w": jnp.ones((64, 128))}
      >>> state = tx.init(params)
      >>> state[0].inner_state.mu["w"].codes.dtype
      dtype('uint8')
      >>> updates, state = tx.update({"w": jnp.ones((64, 128))}, state, params)
    """
    default_signed, default_unsigned = default_maps(bits)  # checks bits
    block_size = (256 if bits == 8 else 128) if block_size is None else block_size
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    signed_code = _check_map(
        "signed_map", default_signed if signed_map is None else signed_map, bits, True
    )
    unsigned_code = _check_map(
        "unsigned_map", default_unsigned if unsigned_map is None else unsigned_map, bits, False
    )
    codec = _Codec(
        bits,
        block_size,
        min_size,
        unsigned or is_second_moment,
        full_precision or holds_parameters,
        tuple(float(v) for v in signed_code),
        tuple(float(v) for v in unsigned_code),
    )
    compress = functools.partial(_compress, codec)
    expand = functools.partial(_expand, codec)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> QuantizedState:
        key = jax.random.key_data(jax.random.key(seed)) if stochastic_rounding else None
        # the initial state is rounded to nearest: it is zeros for the usual moments
        return QuantizedState(compress(inner.init(params), None), jnp.zeros([], jnp.int32), key)

    def update_fn(
        updates: PyTree, state: QuantizedState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, QuantizedState]:
        if state.key is None:
            key, rounding_key = None, None
        else:
            key, rounding_key = jax.random.split(jax.random.wrap_key_data(state.key))
            key = jax.random.key_data(key)

        def step(inputs: tuple) -> tuple[PyTree, PyTree]:
            grads, quantized, params, extra_args = inputs
            out, new_inner = inner.update(grads, expand(quantized), params, **extra_args)
            return jax.tree.map(lambda o, g: o.astype(g.dtype), out, grads), new_inner

        inputs = (updates, state.inner_state, params, extra_args)
        out, new_inner = step(inputs)
        absmax = _new_absmax(codec, state.inner_state, new_inner)
        finite = all_finite(updates) & _all_absmax_finite([a for a in absmax if a is not None])
        if _use_two_passes():
            # Two passes over the same inputs, so that the full-precision new state is
            # never stored: the first keeps only the new absmax of each quantized leaf,
            # the second, on inputs behind a barrier (so that XLA does not merge the two),
            # computes the state again and encodes it with that absmax.
            inputs, absmax, finite = _barrier((inputs, absmax, finite))
            out, new_inner = step(inputs)
        inner_state = _encode(codec, inputs[1], new_inner, absmax, finite, rounding_key)
        # a select rather than lax.cond: XLA then fuses the step with what follows (on an
        # H200 at 251M, 5.14 ms a step against 5.99 ms)
        out = jax.tree.map(lambda o: jnp.where(finite, o, jnp.zeros_like(o)), out)
        skipped = state.skipped + (1 - finite.astype(jnp.int32))
        return out, QuantizedState(inner_state, skipped, key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
