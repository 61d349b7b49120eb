"""``quantize_state``: keep any transform's optimizer state in 8 bits between steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varjax.quantization.blockwise import dequantize_blockwise, quantize_blockwise
from varjax.quantization.codes import dynamic_map

PyTree = Any

# Inner-state fields that hold non-negative second moments (Optax and varjax
# names, plus PyTorch's): they get the unsigned map, everything else the signed one.
UNSIGNED_FIELDS = frozenset({"nu", "nu_max", "v", "exp_avg_sq", "max_exp_avg_sq"})


class SignedQuantized(NamedTuple):
    """A float leaf stored as uint8 codes of the signed dynamic map and float32 block absmax."""

    codes: jax.Array
    absmax: jax.Array


class UnsignedQuantized(NamedTuple):
    """A non-negative float leaf stored with the unsigned dynamic map."""

    codes: jax.Array
    absmax: jax.Array


class QuantizedState(NamedTuple):
    """State of :func:`quantize_state`: the inner state with large float leaves quantized,
    and the number of steps skipped for a non-finite gradient."""

    inner_state: PyTree
    skipped: jax.Array


def is_second_moment(path: tuple) -> bool:
    """Whether a state leaf sits under a field named like a second moment.

    Only attribute names count (the fields of Optax's and varjax's state
    NamedTuples), not dict keys, so a parameter called ``v`` is not mistaken
    for a second moment.
    """
    return any(
        isinstance(key, jax.tree_util.GetAttrKey) and key.name in UNSIGNED_FIELDS for key in path
    )


def _is_quantized(x: Any) -> bool:
    return isinstance(x, (SignedQuantized, UnsignedQuantized))


def quantize_state(
    inner: optax.GradientTransformation,
    *,
    block_size: int = 256,
    min_size: int = 4096,
    unsigned: Callable[[tuple], bool] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Store ``inner``'s optimizer state block-wise quantized to 8 bits between steps
    (Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization").

    Every floating-point leaf of the inner state with at least ``min_size``
    elements is kept as uint8 codes of the dynamic map plus one float32 absmax
    per ``block_size`` elements of its last axis (about 1.02 bytes per element
    at 256). Smaller leaves, step counts and other non-float leaves stay as
    they are. Each step dequantizes, runs ``inner.update`` and quantizes the
    new state. Leaves under a state field named like a second moment (``nu``,
    ``nu_max``, ``v``, ``exp_avg_sq``) get the unsigned map and the rest the
    signed one. Pass ``unsigned(key_path) -> bool`` to choose otherwise. An
    unsigned map clips negative values to zero, so only non-negative moments
    may use it. ``min_size=4096`` and
    ``block_size=256`` are bitsandbytes' defaults.

    A gradient with a NaN or Inf would poison a block's absmax and, with it,
    the whole block of state. Such a step is skipped instead: the updates are
    zero, the state is left unchanged and ``skipped`` is incremented, as
    ``optax.apply_if_finite`` does.

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
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    inner = optax.with_extra_args_support(inner)
    is_unsigned = unsigned or is_second_moment
    signed_map, unsigned_map = dynamic_map(signed=True), dynamic_map(signed=False)

    def should_quantize(x: Any) -> bool:
        return (
            isinstance(x, jax.Array | np.ndarray)
            and jnp.issubdtype(x.dtype, jnp.floating)
            and x.size >= max(min_size, 1)
        )

    def compress(tree: PyTree) -> PyTree:
        def leaf(path: tuple, x: Any) -> Any:
            if not should_quantize(x):
                return x
            if is_unsigned(path):
                return UnsignedQuantized(*quantize_blockwise(x, unsigned_map, block_size))
            return SignedQuantized(*quantize_blockwise(x, signed_map, block_size))

        return jax.tree_util.tree_map_with_path(leaf, tree)

    def expand(tree: PyTree) -> PyTree:
        def leaf(x: Any) -> Any:
            if isinstance(x, UnsignedQuantized):
                return dequantize_blockwise(x.codes, x.absmax, unsigned_map, block_size)
            if isinstance(x, SignedQuantized):
                return dequantize_blockwise(x.codes, x.absmax, signed_map, block_size)
            return x

        return jax.tree.map(leaf, tree, is_leaf=_is_quantized)

    def init_fn(params: PyTree) -> QuantizedState:
        return QuantizedState(compress(inner.init(params)), jnp.zeros([], jnp.int32))

    def update_fn(
        updates: PyTree, state: QuantizedState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, QuantizedState]:
        leaves = jax.tree.leaves(updates)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in leaves] or [True]))

        def step(quantized: PyTree) -> tuple[PyTree, PyTree]:
            out, new_inner = inner.update(updates, expand(quantized), params, **extra_args)
            out = jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates)
            return out, compress(new_inner)

        def skip(quantized: PyTree) -> tuple[PyTree, PyTree]:
            return jax.tree.map(jnp.zeros_like, updates), quantized

        out, inner_state = jax.lax.cond(finite, step, skip, state.inner_state)
        skipped = state.skipped + (1 - finite.astype(jnp.int32))
        return out, QuantizedState(inner_state, skipped)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def state_bytes(state: PyTree) -> int:
    """Bytes held by the arrays of an optimizer state (quantized or not).

    >>> import jax.numpy as jnp, optax
    >>> state_bytes(optax.adam(1e-3).init({"w": jnp.zeros(1000)}))  # mu, nu and a count
    8004
    """
    return sum(
        int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype")
    )
