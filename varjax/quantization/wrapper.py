"""``quantize_state``: keep any transform's optimizer state in 8 or 4 bits between steps."""

from __future__ import annotations

import dataclasses
import functools
import operator
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varjax import roles as roles_lib
from varjax._base import check_integer, check_same_structure, shape_witness
from varjax.quantization import leafwise
from varjax.quantization.blockwise import (
    _dequantized,
    _nibbles,
    _packed,
    block_absmax,
    pack_4bit,
    quantize_blockwise,
    unpack_4bit,
)
from varjax.quantization.codes import default_maps
from varjax.roles import Role

PyTree = Any


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax"],
    meta_fields=["signed", "bits", "shape"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A float array stored as block-wise codes.

    Args:
      codes: uint8 codes of the map's entries; at 4 bits two codes per byte
        along the last axis.
      absmax: one float32 absmax per block of the last axis.
      signed: which of the two maps made the codes.
      bits: 8 or 4.
      shape: the array's own shape.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> state = quantize_state(optax.scale_by_adam(), min_size=0).init(jnp.ones((2, 300)))
      >>> mu = state.inner_state.mu
      >>> mu.codes.shape, mu.absmax.shape, mu.signed
      ((2, 300), (2, 2), True)
    """

    codes: jax.Array
    absmax: jax.Array
    signed: bool
    bits: int
    shape: tuple[int, ...]


@roles_lib.declare(inner_state=Role.EXACT, skipped=Role.COUNT, key=Role.EXACT, spec=Role.EXACT)
class QuantizedState(NamedTuple):
    """State of [`quantize_state`][varjax.quantize_state].

    Attributes:
      inner_state: the inner transform's state, its moments as
        [`QuantizedArray`][varjax.quantization.QuantizedArray] leaves.
      skipped: the number of steps skipped for a non-finite gradient or new state.
      key: the PRNG key data of stochastic rounding, ``None`` for nearest rounding.
      spec: the structure and leaf shapes of the parameters (a
        ``varjax._base.ShapeWitness``: no arrays), which gradients are
        checked against.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> state = quantize_state(optax.adam(1e-3)).init({"w": jnp.ones(3)})
      >>> int(state.skipped), state.key
      (0, None)
    """

    inner_state: PyTree
    skipped: jax.Array
    key: jax.Array | None = None
    spec: Any = None


def _is_value_holder(x: Any) -> bool:
    """Whether ``x`` wraps one array the way a Flax NNX ``Variable`` does.

    ``nnx.Optimizer`` hands ``init`` the parameters as ``Variable`` objects, so
    the inner state holds ``Param(zeros)``. A quantized leaf replaces the whole
    ``Variable``: nested inside it, ``QuantizedArray`` would sit where the
    optimizer's later updates, which come without ``Variable`` wrappers, put
    its ``codes`` and ``absmax``, and the two would no longer line up.
    """
    return hasattr(x, "get_value") and hasattr(x, "get_metadata")


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
    """The settings that compress and expand a state, hashable: the jitted functions below compile
    once per codec and state layout, shared by every [`quantize_state`][varjax.quantize_state] built
    with equal settings (``optax.inject_hyperparams`` builds a new one at every step)."""

    bits: int
    block_size: int
    min_size: int
    override: Callable[[tuple, Role | None], Role | None]
    signed_map: tuple[float, ...]
    unsigned_map: tuple[float, ...]

    def code(self, signed: bool) -> np.ndarray:
        return np.asarray(self.signed_map if signed else self.unsigned_map, np.float32)

    def fates(self, tree: PyTree) -> list[tuple[tuple, Any, Role | None, bool | None]]:
        """Each leaf of ``tree`` (NNX ``Variable`` objects count as leaves) with its path,
        its role after the override, and its fate: ``True`` for the signed map,
        ``False`` for the unsigned map, ``None`` to keep it as it is. Only float leaves
        of at least ``min_size`` elements are quantized."""
        out = []
        for path, leaf, declared in roles_lib.leaf_roles(tree, is_leaf=_is_value_holder):
            role = self.override(path, declared)
            fate = None
            if self.is_large_float(leaf):
                fate = {Role.SIGNED: True, Role.NON_NEGATIVE: False}.get(role)
            out.append((path, leaf, role, fate))
        return out

    def is_large_float(self, leaf: Any) -> bool:
        value = leaf.get_value() if _is_value_holder(leaf) else leaf
        return (
            isinstance(value, jax.Array | np.ndarray)
            and jnp.issubdtype(value.dtype, jnp.floating)
            and value.size >= max(self.min_size, 1)
        )


class UndeclaredRoleWarning(UserWarning):
    """A large float leaf of [`quantize_state`][varjax.quantize_state]'s inner state has no declared
    role, so it is kept in full precision.

    Examples:
      >>> import warnings
      >>> warnings.simplefilter("error", UndeclaredRoleWarning)  # make it an error
      >>> warnings.resetwarnings()
    """


def _warn_undeclared(codec: _Codec, tree: PyTree, fates: list) -> None:
    """Warn about the large float leaves kept in full precision for want of a role."""
    undeclared = [
        f"{roles_lib.undeclared_owner(tree, path)} at {jax.tree_util.keystr(path)}"
        for path, leaf, role, _ in fates
        if role is None and codec.is_large_float(leaf)
    ]
    if undeclared:
        warnings.warn(
            "quantize_state keeps these state leaves in full precision, since their roles "
            f"are not declared: {'; '.join(undeclared)}. Declare the roles of a state type "
            "with varjax.roles.register_roles (or the @varjax.roles.declare decorator), or "
            "choose per leaf with quantize_state(..., roles=...).",
            UndeclaredRoleWarning,
            stacklevel=2,
        )


@functools.partial(jax.jit, static_argnums=0)
def _compress(codec: _Codec, tree: PyTree, key: jax.Array | None) -> PyTree:
    """Quantize the leaves of ``tree`` whose role is a moment, with the map of its sign."""
    fates = codec.fates(tree)
    _warn_undeclared(codec, tree, fates)
    out = []
    for i, (_, x, _, signed) in enumerate(fates):
        if signed is None:
            out.append(x)
            continue
        value = x.get_value() if _is_value_holder(x) else x  # a Flax NNX Variable holds it
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
    return jax.tree.unflatten(jax.tree.structure(tree, is_leaf=_is_value_holder), out)


# Parameters from which an eager ``init`` runs the inner init and the quantization in
# one jitted function: 4M elements, 16 MiB of float32 per moment. Called eagerly, the
# inner init would first hold every leaf's float32 state at once (8 bytes a parameter
# for Adam, more than the step needs); jitted, XLA makes each leaf's zeros inside its
# quantization. Smaller trees are quantized as before, without a compile.
_JIT_INIT_ELEMENTS = 1 << 22


def _jit_init(params: PyTree) -> bool:
    """Whether ``init`` jits: on one device, for a large tree (on several devices a jitted
    init would not keep each leaf's sharding; inside a trace it is inlined)."""
    if jax.device_count() != 1:
        return False
    return sum(int(np.size(x)) for x in jax.tree.leaves(params)) >= _JIT_INIT_ELEMENTS


@functools.partial(jax.jit, static_argnums=(0, 1))
def _initial_state(codec: _Codec, init: Callable[[PyTree], PyTree], params: PyTree) -> PyTree:
    """``init(params)`` quantized, in one jitted function (`_jit_init`)."""
    return _compress(codec, init(params), None)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _expand(codec: _Codec, tree: PyTree, in_place: bool = True) -> PyTree:
    """Dequantize every [`QuantizedArray`][varjax.quantization.QuantizedArray] of ``tree``;
    ``in_place``: so that XLA may write new codes over them (`_expand_leaf`)."""

    def leaf(x: Any) -> Any:
        if not isinstance(x, QuantizedArray):
            return x
        return _expand_leaf(codec, x, in_place)

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, QuantizedArray))


# The per-leaf functions below are jitted on their own so that leaves of one shape share
# one trace (and one lowering) of their code; XLA inlines the calls, so the compiled step
# is the same. Traced once per leaf instead, the 58 leaves of adamw_8bit at 18.5M took
# 1.8 s to trace and lower, against 0.2 s for optax.adamw.


@functools.partial(jax.jit, static_argnums=(0, 2))
def _expand_leaf(codec: _Codec, x: QuantizedArray, in_place: bool = True) -> jax.Array:
    codes = x.codes
    if x.bits == 4:
        codes = unpack_4bit(codes, x.shape[-1] if x.shape else 1).reshape(x.shape)
    # Off the CPU the map is read without a gather only where XLA may then write the new
    # codes over these (in the pass that encodes, `_elementwise_codes`): that costs
    # arithmetic, the table a copy of the new codes. Decoded without a gather where they
    # cannot be written in place, XLA:GPU split the second pass of a 4-bit leaf (a
    # 7,629 x 16,384 adamw_4bit leaf, unpacked by a broadcast then: 4.53 against 1.13
    # B/param of temporaries, compiled for an H100).
    gather_free = in_place and _elementwise_codes(x)
    return _dequantized(
        codes, x.absmax, codec.code(x.signed), codec.block_size, jnp.float32, gather_free
    )


def _elementwise_codes(x: QuantizedArray) -> bool:
    """Whether ``x``'s stored codes map elementwise onto its values, so that XLA can write
    new codes over them: 8-bit codes, and 4-bit ones over an even last axis (a bitcast to
    ``uint4`` pairs); an odd last axis is padded, and unpacked through a slice."""
    return x.bits == 8 or (x.shape[-1] if x.shape else 1) % 2 == 0


@functools.partial(jax.jit, static_argnums=0)
def _absmax_leaf(block_size: int, x: jax.Array) -> jax.Array:
    return block_absmax(x, block_size)


@functools.partial(jax.jit, static_argnums=0)
def _encode_leaf(
    codec: _Codec,
    x: jax.Array,
    old: QuantizedArray,
    absmax: jax.Array,
    finite: jax.Array,
    key: jax.Array | None,
) -> QuantizedArray:
    codes = _codes_leaf(codec, x, old.signed, old.bits, absmax, key)
    return _selected(old, absmax, codes, finite, as_nibbles=True)


def _selected(
    old: QuantizedArray,
    absmax: jax.Array,
    codes: jax.Array,
    finite: jax.Array,
    as_nibbles: bool = False,
) -> QuantizedArray:
    """``old`` with the new ``absmax`` and ``codes`` where ``finite``, as it was where not;
    ``as_nibbles``: packed codes just encoded are selected before their packing."""
    if as_nibbles and old.bits == 4 and _elementwise_codes(old):
        # A select of the bytes, behind the bitcast that packs them, was a kernel of its
        # own, which XLA:GPU could not write over the old codes (one leaf of 16,384 x 4096
        # compiled for an H100: 1.13 against 0.16 B/param of temporaries). Not for codes
        # from the CPU's chunked pass: there it added a copy of them (0.25 B/param).
        codes = _packed(jnp.where(finite, _nibbles(codes), _nibbles(old.codes)))
    else:
        codes = jnp.where(finite, codes, old.codes)
    absmax = jnp.where(finite, absmax, old.absmax)
    return dataclasses.replace(old, codes=codes, absmax=absmax)


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


# Whether the two-pass update computes the new state it encodes apart from the new
# state its updates read (see `_whole_leaf_step`). Off: on an H100 at 251M (with the
# bucket lookup's two gathers) XLA still wrote the new moments in float32, now with a
# buffer of new codes too, and adamw_8bit went from 1.42x to 1.69x optax.adamw's step
# (benchmarks/results/quantized_step_time_gpu_h100_251M_separate*.md).
_SEPARATE_ENCODE = False


# Whether the first of two passes (which writes no codes) reads the maps from their
# tables off the CPU, the second without a gather (`_expand_leaf`); the decoded values then
# differ by at most 2 units in the last place between the passes, so a value may exceed
# the absmax of its block by as much (the encoder clips it).
_FIRST_PASS_BY_TABLE = True


# Whether update_fn's first pass runs in chunks of rows (`_chunked_first_pass`) for an
# elementwise inner transform; ``None``: on a CPU with one device. (Over several devices
# a chunk's dynamic slice of a sharded leaf would gather it; on a GPU, XLA fuses the
# whole-leaf first pass into one reduction kernel, which a loop of chunks only slows.)
_CHUNKED: bool | None = None


def _use_chunks() -> bool:
    if _CHUNKED is None:
        return jax.default_backend() == "cpu" and jax.device_count() == 1
    return _CHUNKED


def _leaves_with_stored(stored: PyTree, new: PyTree) -> tuple[list, list, Any]:
    """The leaves of a new inner state (a Flax NNX ``Variable`` counts as one), the stored leaves at
    the same places (a [`QuantizedArray`][varjax.quantization.QuantizedArray] where the leaf is kept
    quantized), and the new state's treedef."""
    leaves, treedef = jax.tree_util.tree_flatten(new, is_leaf=_is_value_holder)
    return leaves, treedef.flatten_up_to(stored), treedef


def _value(x: Any) -> Any:
    return x.get_value() if _is_value_holder(x) else x  # a Flax NNX Variable holds it


# Whether `_new_absmax` checks each quantized leaf's gradient inside the absmax of its
# moment (else every gradient leaf is checked in a pass of its own); ``None``: on every
# platform but the CPU. XLA:CPU fuses no select into a reduction: there the checked
# moment would be written out whole (4 bytes per element), to save a pass of 4.
_FOLD_GRADIENT_CHECK: bool | None = None


def _fold_gradient_check() -> bool:
    if _FOLD_GRADIENT_CHECK is None:
        return jax.default_backend() != "cpu"
    return _FOLD_GRADIENT_CHECK


def _new_absmax(
    codec: _Codec, stored: PyTree, new: PyTree, grads: PyTree
) -> tuple[list[jax.Array | None], list[jax.Array]]:
    """The block absmax of each leaf of the new inner state ``new`` that ``stored`` keeps
    quantized (``None`` for the others), in the order of ``new``'s leaves, and the
    leaves of ``grads`` whose finiteness they do not show.

    Only these reductions of the new state are used, so XLA can fuse the elementwise
    moment update into them and never write the new moments in float32; the step then
    computes them a second time to encode them (``_encode``).

    A gradient leaf is checked inside the reduction of a quantized leaf of its shape
    (the one at the end of the same path, as ``mu['w']`` for ``grads['w']``): the
    reduction reads ``x`` where ``g`` is finite and an infinity where it is not, so the
    absmax is unchanged for a finite gradient and infinite otherwise (an infinity,
    not a NaN, which XLA:CPU's max drops). The reduction reads that gradient anyway
    where the leaf's new moment is computed from it, so the separate pass over the
    gradient is saved (322 of 3,662 us of an 8-bit AdamW step on one 251M leaf on an
    H100). The gradient leaves it returns have no such partner and are checked
    apart.
    """
    leaves, stored_leaves, _ = _leaves_with_stored(stored, new)
    partner: dict[int, jax.Array] = {}
    unchecked = []
    if _fold_gradient_check():
        flat_new = jax.tree_util.tree_flatten_with_path(new, is_leaf=_is_value_holder)[0]
        free = [
            (i, path)
            for i, ((path, _), old) in enumerate(zip(flat_new, stored_leaves, strict=True))
            if isinstance(old, QuantizedArray)
        ]
        for g_path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
            found = next(
                (
                    (n, i)
                    for n, (i, path) in enumerate(free)
                    if stored_leaves[i].shape == jnp.shape(g)
                    and tuple(path[len(path) - len(g_path) :]) == tuple(g_path)
                ),
                None,
            )
            if found is None:
                unchecked.append(g)
            else:
                partner[found[1]] = g
                del free[found[0]]
    else:
        unchecked = jax.tree.leaves(grads)
    absmax = []
    for i, (x, old) in enumerate(zip(leaves, stored_leaves, strict=True)):
        if not isinstance(old, QuantizedArray):
            absmax.append(None)
            continue
        x = _value(x)
        if i in partner:
            x = jnp.where(jnp.isfinite(partner[i]), x, jnp.inf)
        absmax.append(_absmax_leaf(codec.block_size, x))
    return absmax, unchecked


# Elements of a leaf whose new moments the chunked first pass holds at once (256 KiB of
# float32 per moment): small enough for a core's cache, large enough that the loop's
# per-chunk overhead stays small.
_CHUNK_ELEMENTS = 1 << 16


def _rows(x: jax.Array) -> jax.Array:
    """``x`` as a 2-D array of its rows (the last axis kept): the block layout's view."""
    return x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(1, -1)


def _chunked_first_pass(
    codec: _Codec, inner: optax.GradientTransformationExtraArgs, inputs: tuple, encode: bool
) -> list[tuple[jax.Array, jax.Array | None] | None] | None:
    """The block absmax of each quantized leaf of the new inner state (``None`` for the
    other leaves), and with ``encode`` its new codes, computed a block of rows at a time
    for an elementwise ``inner``; ``None`` where ``inner`` is not elementwise (a
    global-norm clip, a factored moment).

    The inner update is traced and split into one program per parameter leaf
    ([`leafwise`][varjax.quantization.leafwise]); each leaf with quantized moments
    then runs in a loop over chunks of about `_CHUNK_ELEMENTS` elements, decoding the
    chunk's state, computing its new moments and keeping their block absmax (and
    codes). Its full-precision new moments never exist at once: XLA:CPU, which fuses
    no reduction with what computes its operand, writes them whole otherwise.
    """
    grads, stored, params, extra_args = inputs
    is_quantized = lambda x: isinstance(x, QuantizedArray)  # noqa: E731
    expanded = jax.eval_shape(functools.partial(_expand, codec), stored)

    # extra arguments that are no arrays (a loss function for a line search) are fixed
    extra_leaves, extra_tree = jax.tree.flatten(extra_args)
    is_array = [isinstance(x, jax.Array | np.ndarray | np.generic) for x in extra_leaves]
    arrays = [x for x, a in zip(extra_leaves, is_array, strict=True) if a]

    def update(grads, state, params, arrays):
        given = iter(arrays)
        leaves = [next(given) if a else x for x, a in zip(extra_leaves, is_array, strict=True)]
        return inner.update(grads, state, params, **jax.tree.unflatten(extra_tree, leaves))

    closed, out_tree = leafwise.trace(update, grads, expanded, params, arrays)
    found = leafwise.split(closed)
    if found is None:
        return None
    stored_flat = jax.tree.leaves(stored, is_leaf=is_quantized)
    n_grads = len(jax.tree.leaves(grads))
    # flat inputs as the trace saw them: a quantized scalar is decoded, since the
    # scalar equations read it; the others are decoded a chunk at a time
    flat = jax.tree.leaves((grads, None, params, arrays))
    state_flat = [
        _expand_leaf(codec, x) if is_quantized(x) and not x.shape else x for x in stored_flat
    ]
    flat = flat[:n_grads] + state_flat + flat[n_grads:]
    scalars = leafwise.evaluate_scalars(found, flat)
    n_updates = out_tree.children()[0].num_leaves
    stored_outputs = out_tree.children()[1].flatten_up_to(stored)
    by_group: dict[int, list[int]] = {}
    for k, old in enumerate(stored_outputs):
        if not is_quantized(old):
            continue
        group = found.group_of_output(n_updates + k)
        if group is None or group.shape != old.shape or not old.shape:
            return None
        by_group.setdefault(id(group), []).append(k)
    groups = {id(g): g for g in found.groups}
    result: list[tuple[jax.Array, jax.Array | None] | None] = [None] * len(stored_outputs)
    for key, ks in by_group.items():
        chunked = _ChunkedLeaf(codec, found, groups[key], scalars, flat, n_grads, stored_flat)
        outputs = chunked.run([n_updates + k for k in ks], [stored_outputs[k] for k in ks], encode)
        for k, value in zip(ks, outputs, strict=True):
            result[k] = value
    return result


@dataclasses.dataclass(frozen=True)
class _ChunkedLeaf:
    """One parameter leaf's program ([`Group`][varjax.quantization.leafwise.Group]) run
    over chunks of rows of its leaf, seen as ``(rows, width)``."""

    codec: _Codec
    found: leafwise.Split
    group: leafwise.Group
    scalars: dict
    flat: list
    n_grads: int
    stored_flat: list

    @property
    def rows_width(self) -> tuple[int, int]:
        shape = self.group.shape
        return (int(np.prod(shape[:-1])), shape[-1]) if len(shape) >= 2 else (1, shape[0])

    def inputs(self, start: jax.Array, rows: int) -> dict[int, jax.Array]:
        """The group's inputs at rows ``start`` to ``start + rows``, decoded."""
        width = self.rows_width[1]
        values = {}
        for i in self.group.inputs:
            stored = i - self.n_grads
            old = self.stored_flat[stored] if 0 <= stored < len(self.stored_flat) else None
            if isinstance(old, QuantizedArray):
                part = dataclasses.replace(
                    old,
                    codes=jax.lax.dynamic_slice_in_dim(_rows(old.codes), start, rows),
                    absmax=jax.lax.dynamic_slice_in_dim(_rows(old.absmax), start, rows),
                    shape=(rows, width),
                )
                values[i] = _expand_leaf(self.codec, part)
            else:
                values[i] = jax.lax.dynamic_slice_in_dim(_rows(self.flat[i]), start, rows)
        return values

    def chunk(self, start, rows, outputs, olds, encode):
        width = self.rows_width[1]
        new = leafwise.evaluate_group(
            self.found, self.group, self.scalars, self.inputs(start, rows), (rows, width)
        )
        out = []
        for j, old in zip(outputs, olds, strict=True):
            absmax = _absmax_leaf(self.codec.block_size, new[j])
            out.append(absmax)
            if encode:
                out.append(_codes_leaf(self.codec, new[j], old.signed, old.bits, absmax))
        return out

    def run(self, outputs, olds, encode):
        """``(absmax, codes or None)`` of each of ``outputs`` (flat output positions;
        ``olds``: their stored arrays), shaped as stored."""
        n_rows, width = self.rows_width
        # at least two chunks where there are two rows: XLA then runs the leaf inside a
        # loop, whose body holds its temporaries, rather than interleaving leaves
        rows = max(1, min(-(-n_rows // 2), _CHUNK_ELEMENTS // max(width, 1)))
        n_chunks = -(-n_rows // rows)
        if n_chunks == 1:
            parts = self.chunk(0, n_rows, outputs, olds, encode)
        else:

            def body(c, carry):
                # the last chunk is moved back to end at the last row: it computes some
                # rows again, which write the same values, rather than read past the end
                start = jnp.minimum(c * rows, n_rows - rows)
                new = self.chunk(start, rows, outputs, olds, encode)
                return [
                    jax.lax.dynamic_update_slice_in_dim(full, part, start, 0)
                    for full, part in zip(carry, new, strict=True)
                ]

            empty = []
            for old in olds:
                empty.append(jnp.zeros_like(_rows(old.absmax)))
                if encode:
                    empty.append(jnp.zeros_like(_rows(old.codes)))
            parts = jax.lax.fori_loop(0, n_chunks, body, empty)
        step = 2 if encode else 1
        return [
            (
                parts[step * n].reshape(old.absmax.shape),
                parts[step * n + 1].reshape(old.codes.shape) if encode else None,
            )
            for n, old in enumerate(olds)
        ]


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _codes_leaf(
    codec: _Codec,
    x: jax.Array,
    signed: bool,
    bits: int,
    absmax: jax.Array,
    key: jax.Array | None = None,
) -> jax.Array:
    """The stored codes of ``x`` with its block ``absmax`` (packed two per byte at 4 bits)."""
    codes, _ = quantize_blockwise(x, codec.code(signed), codec.block_size, key=key, absmax=absmax)
    return pack_4bit(codes) if bits == 4 else codes


def _encode(
    codec: _Codec,
    stored: PyTree,
    new: PyTree,
    absmax: list[jax.Array | None],
    finite: jax.Array,
    key: jax.Array | None,
    codes: list[jax.Array | None] | None = None,
) -> PyTree:
    """The stored state after a step: each leaf of ``new`` that ``stored`` keeps quantized
    encoded with its block ``absmax`` (from ``_new_absmax``), or taken from ``codes``
    where they were made already, the others as they are, where ``finite``; ``stored``
    itself where not. The select is elementwise, so XLA fuses it with the encoding."""
    leaves, stored_leaves, treedef = _leaves_with_stored(stored, new)
    codes = [None] * len(leaves) if codes is None else codes
    out = []
    for i, (x, old, amax, made) in enumerate(
        zip(leaves, stored_leaves, absmax, codes, strict=True)
    ):
        if not isinstance(old, QuantizedArray):
            out.append(jax.tree.map(lambda n, o: jnp.where(finite, n, o), x, old))
        elif made is not None:
            out.append(_selected(old, amax, made, finite))
        else:
            leaf_key = None if key is None else jax.random.fold_in(key, i)
            out.append(_encode_leaf(codec, _value(x), old, amax, finite, leaf_key))
    return jax.tree.unflatten(treedef, out)


def _whole_leaf_step(
    codec: _Codec, step: Callable, inputs: tuple, key: jax.Array | None
) -> tuple[PyTree, PyTree, jax.Array]:
    """The updates, the new stored state and the finite flag, each leaf computed whole."""
    updates, stored = inputs[0], inputs[1]
    # a first pass that only gives the absmax writes no codes (`_FIRST_PASS_BY_TABLE`)
    out, new_inner = step(inputs, not (_use_two_passes() and _FIRST_PASS_BY_TABLE))
    absmax, unchecked = _new_absmax(codec, stored, new_inner, updates)
    finite = all_finite(unchecked) & _all_absmax_finite([a for a in absmax if a is not None])
    if _use_two_passes():
        # Two passes over the same inputs, so that the full-precision new state is never
        # stored: the first keeps only the new absmax of each quantized leaf, the second,
        # on the stored state behind a barrier and the gradients and parameters times a
        # one from behind it (`_times`), so that XLA does not merge the two, computes the
        # state again and encodes it with that absmax.
        grads, stored, params, extra_args = inputs
        one = jnp.ones((), jnp.float32)
        stored, extra_args, absmax, finite, one = _barrier(
            (stored, extra_args, absmax, finite, one)
        )
        inputs = (_times(one, grads), stored, _times(one, params), extra_args)
        out, new_inner = step(inputs)
        if _SEPARATE_ENCODE:
            # the state to encode computed a third time, from the inputs behind a
            # barrier of their own, so that the updates' kernel and the encoding kernel
            # could each compute the moments they read (see _SEPARATE_ENCODE)
            _, new_inner = step(_barrier(inputs))
    return out, _encode(codec, inputs[1], new_inner, absmax, finite, key), finite


def _times(one: jax.Array, tree: PyTree) -> PyTree:
    """``tree``'s floating-point arrays times ``one`` (a one from behind a barrier): new
    values to XLA, so that it does not merge what is computed from them with what was
    computed before the barrier, yet computed inside the kernels that read them. Behind
    the barrier themselves, arrays computed in the step (the float32 copies of bfloat16
    gradients and weights that ``varjax.in_float32`` makes) were stored whole: compiled
    for an H100, 8 bytes a parameter of temporaries in a bfloat16 8-bit AdamW step."""

    def times(x: Any) -> Any:
        if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.inexact):
            return x * one.astype(x.dtype)
        return x

    return jax.tree.map(times, tree)


def _chunked_step(
    codec: _Codec, step: Callable, inputs: tuple, first: list, key: jax.Array | None
) -> tuple[PyTree, PyTree, jax.Array]:
    """As `_whole_leaf_step`, after `_chunked_first_pass` gave the quantized leaves'
    new absmax (``first``), and their new codes unless ``key`` asks for stochastic
    rounding."""
    absmax = [None if f is None else f[0] for f in first]
    finite = all_finite(inputs[0]) & _all_absmax_finite([a for a in absmax if a is not None])
    codes = [None if f is None else f[1] for f in first]
    inputs, codes, absmax, finite = _barrier((inputs, codes, absmax, finite))
    out, new_inner = step(inputs)
    if key is not None:
        # stochastic rounding draws over a whole leaf: the new state is computed whole
        # again, from a copy of the inputs of its own, so that each decoded moment has
        # one reader (the updates' kernel or this one), into which XLA:CPU fuses its
        # table lookup instead of writing it out
        _, new_inner = step(_barrier(inputs))
    # where the first pass made the codes, XLA drops the float32 values computed here
    return out, _encode(codec, inputs[1], new_inner, absmax, finite, key, codes), finite


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

    Examples:
      >>> all_finite({"a": jnp.ones(3), "b": jnp.asarray([1.0, jnp.inf])}).item()
      False
    """

    # integer and boolean leaves are finite (and ``x - x`` is undefined for booleans)
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)

    # The per-leaf results are joined under a square root, an operation that XLA
    # counts as expensive and so never copies into the fusions that read it. With a
    # chain of ``and``s (or of ``add``s) instead, XLA copied the whole chain into every
    # fusion that selects with the result, quadratic in the leaves: 58 leaves of
    # adamw_8bit at 18.5M on CPU gave 13,806 is-finite instructions of 51,661, and the
    # step compiled in 3.7 s.
    def cpu(*leaves):  # each sum is 0, or NaN where a leaf has a NaN or an infinity
        return jnp.isfinite(jnp.sqrt(sum(jnp.sum(x - x) for x in leaves)))

    def default(*leaves):
        bad = sum((~jnp.all(jnp.isfinite(x))).astype(jnp.float32) for x in leaves)
        return jnp.sqrt(bad) == 0

    return jax.lax.platform_dependent(*leaves, cpu=cpu, default=default)


def _static_int(name: str, value: Any, low: int) -> int:
    """``value`` as a Python int of at least ``low``, or a ``ValueError`` naming ``name``.

    It sets array shapes, so it must be known when the step is traced: inside
    ``optax.inject_hyperparams`` a number passed for it becomes a traced array
    unless ``static_args`` names it.
    """
    if isinstance(value, bool | float) or (
        isinstance(value, np.ndarray | jax.Array) and not jnp.issubdtype(value.dtype, jnp.integer)
    ):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        raise ValueError(
            f"{name} sets array shapes and must be a Python int, got a traced value; under "
            f"optax.inject_hyperparams pass static_args=({name!r},)"
        ) from None
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < low:
        raise ValueError(f"{name} must be >= {low}, got {number}")
    return number


def quantize_state(
    inner: optax.GradientTransformation,
    *,
    bits: int = 8,
    block_size: int | None = None,
    min_size: int | None = None,
    roles: roles_lib.RoleOverride = None,
    signed_map: np.ndarray | None = None,
    unsigned_map: np.ndarray | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Store ``inner``'s optimizer state block-wise quantized to 8 or 4 bits between steps
    (Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization"; Li et
    al., 2023, "Memory Efficient Optimizers with 4-bit States").

    Each leaf of the inner state is treated by its declared role
    ([`varjax.roles`][]): signed moments ([`SIGNED`][varjax.roles.Role.SIGNED]) are
    kept as codes of the signed map, non-negative ones
    ([`NON_NEGATIVE`][varjax.roles.Role.NON_NEGATIVE]) as codes of the unsigned map, each
    with one float32 absmax per ``block_size`` elements of its last axis. Copies of
    the parameters, counts, histories, keys and everything else stay as they are,
    and so do leaves under ``min_size`` elements. varjax's state types declare
    their roles where they are defined, and Optax's are declared in one table
    ([`varjax.quantization.optax_roles`][]: Adam, Lion, Adafactor, RMSProp,
    Adagrad, SGD momentum, AdaBelief, Yogi, LAMB, LARS, NovoGrad, SM3, Adan, and
    contrib's AdEMAMix, COCOB, D-Adaptation, Prodigy, schedule-free, Muon, Sophia,
    ...); ``optax.chain``, ``masked``, ``partition``, ``MultiSteps``,
    ``inject_hyperparams`` and ``apply_if_finite`` states are walked through. A large float leaf of
    a state type with no declared roles is kept in full precision, with an
    [`UndeclaredRoleWarning`][varjax.quantization.UndeclaredRoleWarning] that names it: keeping it
    is never wrong, only less compact, while a guess could quantize a copy of the parameters or give
    a non-negative moment the signed map.

    Each step dequantizes, runs ``inner.update`` and quantizes the new state.

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
    ([`varjax.adamw_8bit`][] and the others) do, to skip the whole step.

    Args:
      inner: the transform whose state is stored quantized; its updates are
        returned unchanged in meaning (cast to the gradients' dtypes).
      bits: 8 (bitsandbytes' dynamic maps, codes equal to its ``quantize_blockwise``, about 1.02
        bytes per element) or 4 (the maps of Li et al.,
        [`default_maps`][varjax.quantization.default_maps]: a dynamic map for signed moments and a
        linear map without zero for non-negative ones, two codes per byte, about 0.53 bytes per
        element; their rank-1 normalisation of second moments is not implemented).
      block_size: elements per absmax along the last axis, an int >= 1; ``None``
        gives 256 at 8 bits and 128 at 4 bits.
      min_size: leaves with fewer elements stay in full precision; ``None``
        gives 4096.
      roles: per-leaf override of the declared roles: a mapping from regular
        expressions to [`Role`][varjax.roles.Role] values, the first pattern
        that ``re.search`` finds in ``jax.tree_util.keystr(path)`` of a state
        leaf deciding (``{"embed": Role.EXACT}`` keeps every state leaf of a
        parameter whose path names ``embed`` in float32, as bitsandbytes advises
        for embeddings), or a function ``(key_path, declared_role) -> role``
        (``declared_role`` is ``None`` where none is declared; return it to keep
        it). A mapping also works inside ``optax.inject_hyperparams``, which
        takes every function argument for a schedule.
      signed_map: replaces the signed map (sorted, ``2**bits`` values in
        [-1, 1], largest 1).
      unsigned_map: replaces the unsigned map (sorted, ``2**bits`` values in
        [0, 1], largest 1).
      stochastic_rounding: round stochastically between the two entries around
        each value (unbiased), with a PRNG key kept in the state so that a
        restored checkpoint continues identically; nearest rounding otherwise.
      seed: the seed of that key.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`QuantizedState`][varjax.quantization.QuantizedState].

    Raises:
      ValueError: for bad arguments, naming them, and at ``update`` for a
        gradient tree whose structure or leaf shapes differ from the parameters
        given to ``init`` (naming the leaf).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from varjax import quantize_state
      >>> from varjax.roles import Role
      >>> tx = quantize_state(optax.adafactor(1e-3, min_dim_size_to_factor=32), min_size=64)
      >>> params = {"embed": jnp.ones((1000, 64)), "w": jnp.ones((64, 128))}
      >>> state = tx.init(params)
      >>> factored = state.inner_state[0]  # adafactor is a chain; its first block
      >>> factored.v_row["w"].codes.dtype, factored.v_row["w"].signed
      (dtype('uint8'), False)
      >>> updates, state = tx.update(params, state, params)
      >>> keep_embeddings = quantize_state(optax.adam(1e-3), roles={"embed": Role.EXACT})
      >>> keep_embeddings.init(params).inner_state[0].mu["embed"].dtype
      dtype('float32')
    """
    default_signed, default_unsigned = default_maps(bits)  # checks bits
    block_size = (256 if bits == 8 else 128) if block_size is None else block_size
    block_size = _static_int("block_size", block_size, 1)
    min_size = _static_int("min_size", 4096 if min_size is None else min_size, 0)
    seed = check_integer("seed", seed)
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
        roles_lib.resolve_override(roles),
        tuple(float(v) for v in signed_code),
        tuple(float(v) for v in unsigned_code),
    )
    compress = functools.partial(_compress, codec)
    expand = functools.partial(_expand, codec)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> QuantizedState:
        key = jax.random.key_data(jax.random.key(seed)) if stochastic_rounding else None
        # the initial state is rounded to nearest: it is zeros for the usual moments
        if _jit_init(params):
            inner_state = _initial_state(codec, inner.init, params)
        else:
            inner_state = compress(inner.init(params), None)
        return QuantizedState(inner_state, jnp.zeros([], jnp.int32), key, shape_witness(params))

    def update_fn(
        updates: PyTree, state: QuantizedState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, QuantizedState]:
        if state.spec is not None:
            check_same_structure(updates, state.spec.shapes(), "optimizer state")
        if state.key is None:
            key, rounding_key = None, None
        else:
            key, rounding_key = jax.random.split(jax.random.wrap_key_data(state.key))
            key = jax.random.key_data(key)

        def step(inputs: tuple, in_place: bool = True) -> tuple[PyTree, PyTree]:
            grads, quantized, params, extra_args = inputs
            # stochastic rounding's encoder reads three entries of the map per value:
            # with the state decoded by the runs too (then), XLA:GPU split its kernel (compiled
            # for an H100, one leaf of 16,384 x 4096: 8.07 B/param of temporaries, 6.07
            # with the state decoded from the tables and its new codes copied)
            decoded = expand(quantized, in_place and state.key is None)
            out, new_inner = inner.update(grads, decoded, params, **extra_args)
            return jax.tree.map(lambda o, g: o.astype(g.dtype), out, grads), new_inner

        inputs = (updates, state.inner_state, params, extra_args)
        first = None
        if _use_chunks():
            first = _chunked_first_pass(codec, inner, inputs, encode=state.key is None)
        if first is None:
            out, inner_state, finite = _whole_leaf_step(codec, step, inputs, rounding_key)
        else:
            out, inner_state, finite = _chunked_step(codec, step, inputs, first, rounding_key)
        # a select rather than lax.cond: XLA then fuses the step with what follows (on an
        # H200 at 251M, 5.14 ms a step against 5.99 ms)
        out = jax.tree.map(lambda o: jnp.where(finite, o, jnp.zeros_like(o)), out)
        skipped = state.skipped + (1 - finite.astype(jnp.int32))
        return out, QuantizedState(inner_state, skipped, key, state.spec)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
