"""Block-wise absmax quantization along the last axis.

An array is cut into blocks of ``block_size`` consecutive elements of its last
axis (the last block of each row padded), each block is divided by its absolute
maximum (kept in float32) and each element stored as the index of the nearest
value of a quantization map. Blocks never cross rows, so an array sharded along
any axis but the last stays sharded, and no block mixes data from two devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TINY = 1e-38  # absmax floor, as bitsandbytes: an all-zero block quantizes to code(0)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """``x`` as ``(*leading, n_blocks, block_size)``, the last axis zero-padded."""
    x = jnp.atleast_1d(x)
    n = x.shape[-1]
    pad = -n % block_size
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], (n + pad) // block_size, block_size)


def nearest_index(scaled: jax.Array, code: jax.Array) -> jax.Array:
    """Index of the nearest entry of the sorted ``code`` to each value (ties to the lower).

    That is the number of midpoints between neighbouring entries that lie
    strictly below the value. It is found by a branch-free binary search of
    ``log2(len(code))`` steps, each a gather from the small midpoint table.
    On an H100 this ran 7.6x faster than ``jnp.searchsorted``'s default
    (64M values: 1.0 ms against 7.8 ms), with identical results.
    """
    size = code.shape[0]
    steps = max(1, (size - 1).bit_length())
    midpoints = (code[:-1] + code[1:]) / 2
    pad = jnp.full((2**steps - midpoints.shape[0],), jnp.inf, midpoints.dtype)
    table = jnp.concatenate([midpoints, pad])
    index = jnp.zeros(scaled.shape, jnp.int32)
    for k in (2**j for j in reversed(range(steps))):
        index = index + jnp.where(scaled > table[index + k - 1], k, 0)
    return index


def quantize_blockwise(
    x: jax.Array, code: np.ndarray | jax.Array, block_size: int = 256
) -> tuple[jax.Array, jax.Array]:
    """Codes (uint8, shaped like ``x``) and per-block absmax (float32, ``(*leading, n_blocks)``).

    Each element becomes the index of the nearest entry of ``code`` (a sorted map)
    to ``clip(x / absmax, -1, 1)``, with ties going to the lower entry, as
    bitsandbytes' ``quantize_blockwise``; for a 1-D array, or one whose last axis
    is a multiple of ``block_size``, the codes and absmax equal bitsandbytes'.

    >>> from varjax.quantization import dynamic_map
    >>> q, absmax = quantize_blockwise(jnp.linspace(-1.0, 1.0, 8), dynamic_map(), 4)
    >>> q.dtype, q.shape, absmax.shape
    (dtype('uint8'), (8,), (2,))
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    code = jnp.asarray(code, jnp.float32)
    shape = jnp.shape(x)
    blocks = _blocks(jnp.asarray(x, jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, TINY))[..., None], -1.0, 1.0)
    index = nearest_index(scaled, code).astype(jnp.uint8)
    n = shape[-1] if shape else 1
    index = index.reshape(*index.shape[:-2], -1)[..., :n].reshape(shape)
    return index, absmax


def dequantize_blockwise(
    codes: jax.Array,
    absmax: jax.Array,
    code: np.ndarray | jax.Array,
    block_size: int = 256,
    dtype=jnp.float32,
) -> jax.Array:
    """The values ``code[codes] * absmax`` of :func:`quantize_blockwise`'s output, in ``dtype``.

    ``block_size`` must be the one the codes were made with.

    >>> from varjax.quantization import dynamic_map
    >>> x = jnp.asarray([0.5, -1.0, 0.25, 2.0])
    >>> q, absmax = quantize_blockwise(x, dynamic_map(), 2)
    >>> restored = dequantize_blockwise(q, absmax, dynamic_map(), 2)
    >>> [round(v, 3) for v in restored.tolist()]  # the signed map stops at -0.993
    [0.501, -0.993, 0.242, 2.0]
    """
    code = jnp.asarray(code, jnp.float32)
    shape = jnp.shape(codes)
    n = shape[-1] if shape else 1
    if absmax.shape[-1] != -(-n // block_size):
        raise ValueError(
            f"absmax has {absmax.shape[-1]} blocks, codes of length {n} in blocks of "
            f"{block_size} need {-(-n // block_size)}"
        )
    values = _blocks(code[codes.astype(jnp.int32)], block_size) * absmax[..., None]
    return values.reshape(*values.shape[:-2], -1)[..., :n].reshape(shape).astype(dtype)
