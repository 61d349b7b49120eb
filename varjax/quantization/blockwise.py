"""Block-wise absmax quantization along the last axis.

An array is cut into blocks of ``block_size`` consecutive elements of its last
axis (the last block of each row padded), each block is divided by its absolute
maximum (kept in float32) and each element stored as the index of the nearest
value of a quantization map. Blocks never cross rows, so an array sharded along
any axis but the last stays sharded, and no block mixes data from two devices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

TINY = 1e-38  # absmax floor, as bitsandbytes: an all-zero block quantizes to code(0)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """``x`` (at least 1-D) as ``(*leading, n_blocks, block_size)``, the last axis zero-padded."""
    pad = -x.shape[-1] % block_size
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def _unblocked(blocks: jax.Array, length: int) -> jax.Array:
    """The inverse of ``_blocks``: the last two axes merged and cut to ``length``."""
    return blocks.reshape(*blocks.shape[:-2], -1)[..., :length]


def _block_absmax(x: jax.Array, block_size: int) -> jax.Array:
    """``max |x|`` over each block of the last axis of ``x`` (at least 1-D), shaped
    ``(*leading, n_blocks)``, as a reduce-window (the last block padded with zeros)."""
    window = (1,) * (x.ndim - 1) + (block_size,)
    padding = [(0, 0)] * (x.ndim - 1) + [(0, -x.shape[-1] % block_size)]
    return jax.lax.reduce_window(jnp.abs(x), 0.0, jax.lax.max, window, window, padding)


def _per_element(per_block: jax.Array, block_size: int, length: int) -> jax.Array:
    """``per_block`` (``(*leading, n_blocks)``) repeated over each block's elements and
    cut to ``length`` along the last axis."""
    return jnp.repeat(per_block, block_size, axis=-1)[..., :length]


def _take(table: np.ndarray | jax.Array, index: jax.Array, mode="promise_in_bounds") -> jax.Array:
    """``table[index]`` without the wrapping of negative indices that ``table[index]``
    adds; by default for indices known to be in range."""
    return jnp.asarray(table).at[index].get(mode=mode)


# Two layouts of the same arithmetic, equal bit for bit (tests/test_quantization.py).
# On GPU, XLA fuses a max over the last axis of a padded, blocked reshape with
# what computes ``x``. XLA:CPU (jax 0.10) does not: it writes ``x`` and the
# padded copy to fresh buffers first, whose page faults cost 8-bit Adam on CPU
# as much as the rest of its step at 18.5M parameters. There a reduce-window
# and a repeated per-block factor avoid both buffers; on an H100 they made the
# 8-bit step 1.4x slower, so each platform gets its own.


def _scaled_in_blocks(
    x: jax.Array, block_size: int, absmax: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``x / absmax`` of each block, clipped to [-1, 1], and the absmax (block layout);
    ``absmax`` is computed from ``x`` unless given."""
    blocks = _blocks(x, block_size)
    if absmax is None:
        absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, TINY))[..., None], -1.0, 1.0)
    return _unblocked(scaled, x.shape[-1]), absmax


def _scaled_in_windows(
    x: jax.Array, block_size: int, absmax: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """As ``_scaled_in_blocks``, in the CPU layout (no padded copy)."""
    if absmax is None:
        absmax = _block_absmax(x, block_size)
    inverse = _per_element(1.0 / jnp.maximum(absmax, TINY), block_size, x.shape[-1])
    return jnp.clip(x * inverse, -1.0, 1.0), absmax


# Whether a given absmax scales ``x`` per element (the CPU's layout) on every platform.
# The blocked reshape is for the reduction; with the absmax given, it kept XLA:GPU from
# fusing the second moment's encoding with the update: a donated 8-bit AdamW step on one
# leaf of 16,384 x 4096 compiled for an H100 with 5.06 B/param of temporaries blocked,
# 2.06 per element (the new codes only; benchmarks/README.md, "Compiling for the GPU
# without one, and the per-element scaling").
_GIVEN_ABSMAX_PER_ELEMENT = True


def _times_absmax_in_windows(values: jax.Array, absmax: jax.Array, block_size: int) -> jax.Array:
    return values * _per_element(absmax, block_size, values.shape[-1])


def _count_below(values: jax.Array, table: jax.Array) -> jax.Array:
    """How many entries of the sorted ``table`` lie strictly below each value.

    A branch-free binary search of ``log2(len(table))`` steps, each a gather from
    the small table. On an H100 this ran 7.6x faster than ``jnp.searchsorted``'s
    default (64M values: 1.0 ms against 7.8 ms), with identical results.
    """
    steps = max(1, (table.shape[0]).bit_length())
    padded = jnp.concatenate([table, jnp.full((2**steps - table.shape[0],), jnp.inf, table.dtype)])
    first = 2 ** (steps - 1)  # the first threshold is one scalar: no gather to constant-fold
    count = jnp.where(values > padded[first - 1], first, 0).astype(jnp.int32)
    for k in (2**j for j in reversed(range(steps - 1))):
        count = count + jnp.where(values > _take(padded, count + k - 1), k, 0)
    return count


def _midpoints(code: np.ndarray) -> np.ndarray:
    """Float32 midpoints of neighbouring entries, computed as ``(a + b) / 2`` in float32."""
    code = np.asarray(code, np.float32)
    return (code[:-1] + code[1:]) / np.float32(2)


_SMALLEST_EXPONENT = 127 - 40  # magnitudes below 2**-40 share the bucket of 0


@functools.lru_cache(maxsize=32)
def _bucket_table(code_bytes: bytes) -> tuple[int, np.ndarray, np.ndarray] | None:
    """Lookup tables for [`nearest_index`][varjax.quantization.nearest_index] over buckets of
    float32 bit patterns.

    A value's bucket is its sign, exponent and top ``m`` mantissa bits, so a bucket
    spans a relative width of at most ``2**-m``. With ``m`` chosen so that no
    bucket holds more than one midpoint, the nearest index of a value is the
    number of midpoints strictly below the bucket, plus one if the value exceeds
    the first midpoint at or above the bucket's start. Returns ``m`` and, per
    bucket, that count and that midpoint (``inf`` past the last), or ``None``
    when no ``m`` up to 12 works (the caller then uses the binary search). Both
    tables are read at the same index, so a lookup is two independent gathers.
    """
    midpoints = _midpoints(np.frombuffer(code_bytes, np.float32))
    mids = midpoints.astype(np.float64)
    for m in range(3, 13):
        low_key, high_key = _SMALLEST_EXPONENT << m, 127 << m  # 1.0 is the largest |value|
        keys = np.arange(low_key, high_key + 1, dtype=np.uint32)
        shift = np.uint32(23 - m)
        low = (keys << shift).view(np.float32).astype(np.float64)
        high = (((keys + np.uint32(1)) << shift) - np.uint32(1)).view(np.float32).astype(np.float64)
        low[0] = 0.0  # the first bucket also holds every smaller magnitude
        tables, fits = [], True
        for lo, hi in ((low, high), (-high, -low)):  # positive, then negative values
            below = np.searchsorted(mids, lo, side="left")  # midpoints < lo
            inside = np.searchsorted(mids, hi, side="right") - below  # lo <= midpoint <= hi
            fits &= bool(np.all(inside <= 1))
            tables.append(below)
        if fits:
            below = np.concatenate(tables)
            next_midpoint = np.concatenate([midpoints, np.float32([np.inf])])[below]
            return m, below.astype(np.uint8 if below.max() < 256 else np.int32), next_midpoint
    return None


def _count_below_by_buckets(scaled: jax.Array, code: np.ndarray) -> jax.Array:
    m, below, next_midpoint = _bucket_table(np.asarray(code, np.float32).tobytes())
    bits = jax.lax.bitcast_convert_type(scaled, jnp.uint32)
    low_key, high_key = _SMALLEST_EXPONENT << m, 127 << m
    key = jnp.clip((bits & 0x7FFFFFFF) >> (23 - m), low_key, high_key) - low_key
    key = key.astype(jnp.int32) + (bits >> 31).astype(jnp.int32) * (high_key - low_key + 1)
    above = (scaled > _take(next_midpoint, key)).astype(jnp.int32)
    return _take(below, key).astype(jnp.int32) + above


def _folded(code: np.ndarray) -> tuple[bool, np.ndarray]:
    """Whether the sorted ``code`` mirrors its negative entries (a signed dynamic map:
    one 0, each negative entry the negative of a positive one, at most one positive
    entry more) and then ``[0, *positive entries]``, else ``code`` itself. Entry
    ``n + h`` of a mirrored map is ``half[h]`` and entry ``n - h`` is ``-half[h]``,
    ``n`` the number of negative entries."""
    positive, negative = code[code > 0], code[code < 0]
    mirrored = bool(
        negative.size > 0
        and np.count_nonzero(code == 0) == 1
        and positive.size in (negative.size, negative.size + 1)
        and np.array_equal(-negative[::-1], positive[: negative.size])
    )
    return mirrored, np.concatenate([np.float32([0.0]), positive]) if mirrored else code


def _folded_value(scaled: jax.Array) -> jax.Array:
    """``scaled`` in float32 for counting the midpoints of a mirrored map's half: a
    negative value counts the mirrored midpoints at or below its magnitude, so it is
    taken as the next float32 above its magnitude (strictly below that)."""
    value = scaled.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(-value, jnp.int32) + 1
    return jnp.where(value < 0, jax.lax.bitcast_convert_type(bits, jnp.float32), value)


def _unfolded_count(scaled: jax.Array, count: jax.Array, negatives) -> jax.Array:
    """The count of the whole mirrored map's midpoints below ``scaled``, from ``count``
    over its half (``_folded_value``) and its number of ``negatives``."""
    return jnp.where(scaled < 0, jnp.maximum(negatives - count, 0), negatives + count)


# Runs of midpoints count as evenly spaced when each lies within this share of the run's
# step of its place on the line fitted through the run (float32 rounding of the map
# leaves them about 4e-6 of a step off in the 8-bit dynamic map's top decade).
_RUN_TOLERANCE = 2.0**-14
_MAX_SEGMENTS = 16


@functools.lru_cache(maxsize=32)
def _segments(code_bytes: bytes) -> tuple | None:
    """The count of midpoints below a value as a few affine pieces, for
    [`nearest_index`][varjax.quantization.nearest_index] off the CPU.

    A map whose negative entries mirror its positive ones (a signed dynamic map) is
    folded onto its non-negative half. The midpoints of that half (or of the whole
    map) are cut into segments: one midpoint kept exactly (a threshold), then a run
    of evenly spaced midpoints. A decade of the dynamic map is one segment: the
    midpoint between two decades, then the decade's own. Returns ``(mirrored,
    thresholds, slopes, offsets, tops, bases)``, float32 arrays over segments, or
    ``None`` when a run does not lie on a line or there are more than
    ``_MAX_SEGMENTS`` segments (the caller then uses the bucket tables).
    """
    mirrored, half = _folded(np.frombuffer(code_bytes, np.float32))
    mids = _midpoints(half).astype(np.float64)
    segments, j = [], 0
    while j < mids.size:
        # the threshold mids[j], then a run of mids[j + 1 : j + 1 + run], evenly spaced
        run = min(2, mids.size - j - 1)
        step = mids[j + run] - mids[j + run - 1] if run else 1.0
        while j + run + 1 < mids.size and (
            abs(mids[j + run + 1] - mids[j + run] - step) <= _RUN_TOLERANCE * step
        ):
            run += 1
        if run:
            first = mids[j + 1]
            step = (mids[j + run] - first) / (run - 1) if run > 1 else first - mids[j]
            off_line = np.abs(mids[j + 1 : j + run + 1] - (first + step * np.arange(run)))
            if not step > 0 or off_line.max() > _RUN_TOLERANCE * step:
                return None
        lowest = mids[j + 1] - step if run else mids[j]
        # in this segment the count is j + clip(ceil((value - lowest) / step), 1, run + 1)
        segments.append((mids[j], 1.0 / step, lowest / step, run + 1.0, float(j)))
        j += run + 1
    if len(segments) > _MAX_SEGMENTS:
        return None
    return (mirrored, *(np.asarray(column, np.float32) for column in zip(*segments, strict=True)))


def _count_below_by_segments(scaled: jax.Array, code: np.ndarray) -> jax.Array:
    """The count of midpoints below ``scaled`` from ``_segments``: a chain of compares
    and selects over a few constants, without a gather.

    Thresholds are compared exactly; inside a run the count comes from float32
    arithmetic, so a value within about 1e-5 of a step of a run's midpoint may get
    the neighbouring index (tests/test_quantization.py bounds where).
    """
    code = np.asarray(code, np.float32)
    mirrored, thresholds, slopes, offsets, tops, bases = _segments(code.tobytes())
    value = _folded_value(scaled) if mirrored else scaled.astype(jnp.float32)
    slope, offset, top, base = 0.0, 0.0, 1.0, -1.0  # below the first threshold: 0
    for s in range(thresholds.size):
        past = value > thresholds[s]
        slope = jnp.where(past, slopes[s], slope)
        offset = jnp.where(past, offsets[s], offset)
        top = jnp.where(past, tops[s], top)
        base = jnp.where(past, bases[s], base)
    count = base + jnp.clip(jnp.ceil(value * slope - offset), 1.0, top)
    if mirrored:
        count = _unfolded_count(scaled, count, np.float32(np.count_nonzero(code < 0)))
    return jnp.clip(count, 0, code.size - 1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _decade_thresholds(code_bytes: bytes) -> np.ndarray | None:
    """The midpoints of a dynamic map (``_decades``) between its decades, for
    ``_count_below_by_decades``: between 0 and the first decade, each decade and the
    next, and the last decade and the top entry; ``None`` when the map's decades are
    not each ``2**(i + shift)`` entries in a row from ``i = 0``."""
    found = _decades(code_bytes)
    if found is None:
        return None
    _, _, shift, lead, _, _ = found
    half = _folded(np.frombuffer(code_bytes, np.float32))[1]
    g = np.arange(half.size - 1) + lead  # the top entry is a decade of its own
    decade = np.maximum(_decade_of(g, shift), -1)  # below 0: the map's 0
    expected = np.concatenate([[-1]] + [[i] * 2 ** (i + shift) for i in range(decade.max() + 1)])
    if not np.array_equal(decade, expected):
        return None
    ends = np.flatnonzero(np.diff(np.append(decade, decade.max() + 1)))
    return _midpoints(half)[ends]


def _count_below_by_decades(scaled: jax.Array, code: np.ndarray) -> jax.Array:
    """The count of midpoints below ``scaled`` for a dynamic map, from its decades: the
    decade by exact compares with the midpoints between decades, then inside decade
    ``i`` the midpoints ``5**i * (18 g + 18 - 2**(i + shift + 4)) * scale`` (those of
    ``_entries_by_decades``) below the value, in float32.

    A value within a few 1e-5 of a gap of a midpoint may get the neighbouring index
    (tests/test_quantization.py bounds where); the thresholds are exact.
    """
    code = np.asarray(code, np.float32)
    mirrored, negatives, shift, lead, scale, _ = _decades(code.tobytes())
    thresholds = _decade_thresholds(code.tobytes())
    value = _folded_value(scaled) if mirrored else scaled.astype(jnp.float32)
    past = sum((value > t).astype(jnp.int32) for t in thresholds)  # 0 .. decades + 1
    i = jnp.clip(past - 1, 0, thresholds.size - 2)
    bit = lambda b: ((i >> b) & 1) == 1  # noqa: E731
    fifth = jnp.where(bit(0), np.float32(0.2), 1.0) * jnp.where(bit(1), np.float32(0.04), 1.0)
    fifth = fifth * jnp.where(bit(2), np.float32(0.0016), 1.0)  # 5**-i
    first = jax.lax.shift_left(1, i + shift)  # g of the decade's first entry
    # midpoint g lies below the value where g < q / 18
    q = value * np.float32(1 / np.float64(scale)) * fifth + (16 * first - 18).astype(jnp.float32)
    g = jnp.clip(jnp.ceil(q * np.float32(1 / 18)).astype(jnp.int32), first, 2 * first - 1)
    top = np.int32(_folded(code)[1].size - 1)
    count = jnp.where(past == 0, 0, jnp.where(past == thresholds.size, top, g - lead))
    if mirrored:
        count = _unfolded_count(scaled, count, negatives)
    return jnp.clip(count, 0, code.size - 1).astype(jnp.int32)


# Whether nearest_index encodes without gathers off the CPU, by decades or segments
# (measured: benchmarks/README.md, "An encoder without gathers").
_ENCODE_WITHOUT_GATHERS = True


def _gather_free_encoder(code: np.ndarray) -> Callable | None:
    """The count of midpoints below a value off the CPU: by decades for a dynamic map
    (``_count_below_by_decades``), else by segments (``_count_below_by_segments``);
    ``None`` (the bucket tables) for a map that fits neither."""
    if not _ENCODE_WITHOUT_GATHERS:
        return None
    code_bytes = np.asarray(code, np.float32).tobytes()
    if _decade_thresholds(code_bytes) is not None:
        return functools.partial(_count_below_by_decades, code=code)
    if _segments(code_bytes) is not None:
        return functools.partial(_count_below_by_segments, code=code)
    return None


def nearest_index(scaled: jax.Array, code: np.ndarray | jax.Array) -> jax.Array:
    """Index of the nearest entry of the sorted ``code`` to each value in [-1, 1]
    (ties to the lower entry).

    That is the number of midpoints between neighbouring entries that lie
    strictly below the value. For a map known at trace time (a NumPy array):

    * on the CPU, precomputed tables over the values' float32 bit patterns give
      it exactly, with two gathers at the same index;
    * elsewhere (GPU, TPU), without gathers: bitsandbytes' dynamic maps from
      their decades (``_count_below_by_decades``), other maps by a few affine
      pieces (``_count_below_by_segments``), so that XLA fuses the computation of
      the values into the kernel that encodes them: it does not fuse one into a
      gather's indices, and with the tables an 8-bit AdamW step on an H100 kept
      its new moments in float32 memory (8 bytes per parameter of its largest
      leaf). A value within about 2e-5 of a gap of a midpoint may then get the
      neighbouring entry: a share of about 1e-6 of uniform values
      (``benchmarks/results/encoder_check_*``, measured with the segments).

    For a map known only as a JAX array, a binary search with
    ``log2(len(code))`` gathers. On an H200 it took 0.78 ms for 64M values, 5.6
    times the time of a scaling pass.

    Args:
      scaled: values in [-1, 1] (block-scaled), any shape.
      code: the sorted map; a NumPy array (known at trace time: the fast
        table lookup) or a JAX array (binary search).

    Returns:
      int32 indices into ``code``, shaped like ``scaled``.

    Examples:
      >>> import numpy as np
      >>> code = np.asarray([-1.0, 0.0, 0.5, 1.0], np.float32)
      >>> nearest_index(jnp.asarray([-0.6, 0.25, 0.3, 0.9]), code).tolist()  # 0.25: a tie
      [0, 1, 2, 3]
    """
    if isinstance(code, np.ndarray):
        code_bytes = np.asarray(code, np.float32).tobytes()
        if _bucket_table(code_bytes) is not None:
            buckets = functools.partial(_count_below_by_buckets, code=code)
            encoder = _gather_free_encoder(code)
            if encoder is not None:
                return jax.lax.platform_dependent(scaled, cpu=buckets, default=encoder)
            return buckets(scaled)
    code = jnp.asarray(code, jnp.float32)
    return _count_below(scaled, (code[:-1] + code[1:]) / 2)


def stochastic_index(scaled: jax.Array, code: np.ndarray | jax.Array, key: jax.Array) -> jax.Array:
    """Index of one of the two entries of the sorted ``code`` around each value, the upper
    one with probability ``(value - lower) / (upper - lower)``: unbiased rounding,
    ``E[code[index]] = value`` for values inside the map's range.

    The entries are read as ``dequantize_blockwise`` reads them (``_entries``: off the
    CPU without a gather), so that a decoded value keeps its code
    and XLA:GPU can write the new codes over the old ones: compiled for an H100, a
    donated stochastic 8-bit AdamW step on one leaf of 16,384 x 4096 held 20.0 bytes
    per parameter of temporaries with the table.
    """
    nearest = nearest_index(scaled, code)
    last = jnp.shape(code)[0] - 1
    lower = jnp.clip(nearest - (_entries(nearest, code) > scaled).astype(jnp.int32), 0, last)
    lower_value = _entries(lower, code)
    gap = _entries(jnp.minimum(lower + 1, last), code) - lower_value
    fraction = jnp.where(gap > 0, (scaled - lower_value) / jnp.where(gap > 0, gap, 1.0), 0.0)
    return lower + (jax.random.uniform(key, scaled.shape) < fraction).astype(jnp.int32)


def quantize_blockwise(
    x: jax.Array,
    code: np.ndarray | jax.Array,
    block_size: int = 256,
    *,
    key: jax.Array | None = None,
    absmax: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Codes (uint8, shaped like ``x``) and per-block absmax (float32, ``(*leading, n_blocks)``).

    Each element becomes the index of the nearest entry of ``code`` (a sorted map) to ``clip(x /
    absmax, -1, 1)``, with ties going to the lower entry, as bitsandbytes' ``quantize_blockwise``;
    for a 1-D array, or one whose last axis is a multiple of ``block_size``, the codes and absmax
    equal bitsandbytes' (on the CPU; on other platforms but for values next to a midpoint,
    as [`nearest_index`][varjax.quantization.nearest_index] says). With a PRNG ``key``
    the rounding is stochastic instead
    ([`stochastic_index`][varjax.quantization.blockwise.stochastic_index]). A given
    ``absmax`` (as ``block_absmax`` of ``x``) is used instead of reducing ``x`` again, so
    the codes can be made in one elementwise pass after the reduction.

    Args:
      x: the values, any float array (scalars are taken as shape ``(1,)``).
      code: the sorted quantization map of at most 256 entries in [-1, 1]
        (``dynamic_map``, ``linear_map``).
      block_size: the number of elements of the last axis that share one
        absmax, >= 1 (256 as bitsandbytes' 8-bit optimizers).
      key: a PRNG key for unbiased stochastic rounding; ``None`` (default):
        round to the nearest entry.
      absmax: the blocks' absmax, as ``block_absmax`` gives it; ``None``
        (default): reduced from ``x``.

    Returns:
      ``(codes, absmax)``.

    Examples:
      >>> from varjax.quantization import dynamic_map
      >>> q, absmax = quantize_blockwise(jnp.linspace(-1.0, 1.0, 8), dynamic_map(), 4)
      >>> q.dtype, q.shape, absmax.shape
      (dtype('uint8'), (8,), (2,))
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not isinstance(code, np.ndarray):
        code = jnp.asarray(code, jnp.float32)
    shape = jnp.shape(x)
    x = jnp.atleast_1d(jnp.asarray(x, jnp.float32))
    given = () if absmax is None else (jnp.asarray(absmax, jnp.float32),)

    def blocks(x, *given):
        return _scaled_in_blocks(x, block_size, *given)

    def windows(x, *given):
        return _scaled_in_windows(x, block_size, *given)

    if given and _GIVEN_ABSMAX_PER_ELEMENT:
        scaled, absmax = windows(x, *given)
    elif key is None:
        scaled, absmax = jax.lax.platform_dependent(x, *given, cpu=windows, default=blocks)
    else:  # one layout everywhere (the layouts agree bit for bit, the draws by shape)
        scaled, absmax = blocks(x, *given)
    index = nearest_index(scaled, code) if key is None else stochastic_index(scaled, code, key)
    return index.astype(jnp.uint8).reshape(shape), absmax


def block_absmax(x: jax.Array, block_size: int = 256) -> jax.Array:
    """The absmax that [`quantize_blockwise`][varjax.quantization.quantize_blockwise] computes for
    ``x``, alone: float32, ``(*leading, n_blocks)``, equal bit for bit in either layout (a max is
    exact)."""
    x = jnp.atleast_1d(jnp.asarray(x, jnp.float32))
    return jax.lax.platform_dependent(
        x,
        cpu=functools.partial(_block_absmax, block_size=block_size),
        default=lambda x: jnp.max(jnp.abs(_blocks(x, block_size)), axis=-1),
    )


def pack_4bit(codes: jax.Array) -> jax.Array:
    """Two 4-bit codes per byte along the last axis (the last axis padded to even length):
    element ``2i`` in the low nibble, ``2i + 1`` in the high one.

    Args:
      codes: integer codes in [0, 15], any shape with at least one axis.

    Returns:
      uint8 bytes, the last axis half as long (rounded up).

    Examples:
      >>> pack_4bit(jnp.asarray([1, 2, 15], jnp.uint8)).tolist()
      [33, 15]
    """
    codes = jnp.atleast_1d(codes).astype(jnp.uint8)
    if codes.shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    return _packed(codes.astype(jnp.uint4))


def _packed(nibbles: jax.Array) -> jax.Array:
    """uint4 ``nibbles`` (an even last axis) as the bytes of ``pack_4bit``: a bitcast of
    pairs, which puts the first of each in the low nibble. It is elementwise for XLA,
    which can then write a step's new codes over the donated old ones."""
    pairs = nibbles.reshape(*nibbles.shape[:-1], -1, 2)
    return jax.lax.bitcast_convert_type(pairs, jnp.uint8)


def _nibbles(packed: jax.Array) -> jax.Array:
    """The uint4 codes of ``pack_4bit``'s bytes (their last axis twice as long): the
    inverse bitcast of ``_packed``."""
    pairs = jax.lax.bitcast_convert_type(packed, jnp.uint4)
    return pairs.reshape(*packed.shape[:-1], -1)


def unpack_4bit(packed: jax.Array, length: int) -> jax.Array:
    """The first ``length`` codes of the last axis of [`pack_4bit`][varjax.quantization.pack_4bit]'s
    output.

    Args:
      packed: the uint8 output of [`pack_4bit`][varjax.quantization.pack_4bit].
      length: the length of the last axis before packing.

    Returns:
      uint8 codes in [0, 15], the last axis ``length`` long.

    Examples:
      >>> packed = pack_4bit(jnp.asarray([1, 2, 15], jnp.uint8))
      >>> unpack_4bit(packed, 3).tolist()
      [1, 2, 15]
    """
    # a bitcast to uint4 pairs (the low nibble first), not shifts of a broadcast byte: XLA
    # writes new codes over old ones only through elementwise uses, and a broadcast is none
    # (compiled for an H100, a donated adamw_4bit step on one leaf of 16,384 x 4096 then
    # held 1.13 B/param of temporaries, the new codes' copies)
    return _nibbles(packed)[..., :length].astype(jnp.uint8)


# A decoded value off the CPU may differ from its map entry by this many units in the last
# place of the entry (the fits below reach 1 for the signed 8-bit dynamic map, 2 for the
# unsigned one); more than _MAX_RUNS runs and the table is read instead.
_DECODE_ULPS = 2
_MAX_RUNS = 16


def _run_values(offset: int, slope: int, shift: int, h: np.ndarray) -> np.ndarray:
    """``_entries_by_runs``' arithmetic in NumPy, for one run: ``offset + slope * h`` in
    uint32 (wrapping), read as int32, converted to float32 and scaled by ``2**-shift``."""
    n = np.uint32(offset) + np.uint32(slope) * np.asarray(h, np.uint32)
    return n.view(np.int32).astype(np.float32) * np.float32(2.0**-shift)


def _run_fit(values: np.ndarray, start: int) -> tuple[int, int, int] | None:
    """``(offset, slope, shift)`` with which ``_run_values`` gives ``values`` (the map
    entries from index ``start`` on) within ``_DECODE_ULPS`` units in the last place,
    its first entry exactly, with the slope near the line through the ends that is
    closest; ``None`` if none is close enough.

    ``shift`` puts the largest magnitude in [2**30, 2**31): the integers carry 7 bits
    more than float32 at the top of the run, enough for the decade of a dynamic map.
    """
    top = float(np.abs(values).max())
    shift = 30 - (int(np.floor(np.log2(top))) if top > 0 else 0)
    first = float(values[0]) * 2.0**shift
    if not 0 <= shift <= 126 or first != int(first):
        return None
    n = values.size
    guess = round((float(values[-1]) * 2.0**shift - first) / (n - 1)) if n > 1 else 0
    h = np.arange(start, start + n)
    allowed = _DECODE_ULPS * np.spacing(np.abs(values)).astype(np.float64)
    best, best_error = None, np.inf
    for slope in range(guess - 4, guess + 5):
        offset = (int(first) - slope * start) % 2**32
        decoded = _run_values(offset, slope % 2**32, shift, h).astype(np.float64)
        error = np.max(np.abs(decoded - values) / allowed)
        if error <= 1 and error < best_error:
            best, best_error = (offset, slope % 2**32, shift), error
    return best


@functools.lru_cache(maxsize=32)
def _runs(code_bytes: bytes) -> tuple | None:
    """The map as a few runs of entries that lie on a line, for
    ``_entries_by_runs``: ``(mirrored, negatives, starts, offsets, slopes, scales)``.

    A mirrored map (``_folded``) is cut on its half ``[0, *positive entries]``. Each
    run, from the entry at ``starts[r]`` on, is read as ``(offsets[r] + slopes[r] * h)
    * scales[r]`` for index ``h`` (``_run_values``), its integers within 2**31: a decade of
    the dynamic map is one run. ``None`` when more than ``_MAX_RUNS`` runs are needed.
    """
    code = np.frombuffer(code_bytes, np.float32)
    mirrored, half = _folded(code)
    runs, start = [], 0
    while start < half.size:
        fit, end = None, start + 1
        while end <= half.size and (trial := _run_fit(half[start:end], start)) is not None:
            fit, end = trial, end + 1
        if fit is None or len(runs) == _MAX_RUNS:
            return None
        runs.append((start, *fit))
        start = end - 1
    starts, offsets, slopes, shifts = zip(*runs, strict=True)
    return (
        mirrored,
        int(np.count_nonzero(code < 0)),
        np.asarray(starts, np.uint32),
        np.asarray(offsets, np.uint32),
        np.asarray(slopes, np.uint32),
        np.asarray([2.0**-s for s in shifts], np.float32),
    )


def _entries_by_table(index: jax.Array, code: np.ndarray | jax.Array) -> jax.Array:
    return _take(jnp.asarray(code, jnp.float32), index, mode="clip")


def _entries_by_runs(index: jax.Array, code: np.ndarray) -> jax.Array:
    """``code[index]`` from ``_runs``, within ``_DECODE_ULPS`` units in the last place:
    a chain of compares and selects over a few integer constants, without a gather.

    Integer arithmetic, a conversion and a power-of-two scale: the same values on every
    platform. XLA:GPU writes a kernel's output over an input it reads (a donated
    state's codes) only when each of its uses is elementwise, which a gather's indices
    are not: decoded from the table, the new codes of an 8-bit AdamW step went to a
    temporary and were then copied (2 bytes per parameter, compiled for an H100).
    """
    code = np.asarray(code, np.float32)
    mirrored, negatives, starts, offsets, slopes, scales = _runs(code.tobytes())
    index = jnp.clip(index.astype(jnp.int32), 0, code.size - 1)
    h = (jnp.abs(index - negatives) if mirrored else index).astype(jnp.uint32)
    offset, slope, scale = offsets[0], slopes[0], scales[0]
    for r in range(1, starts.size):
        past = h >= starts[r]
        offset = jnp.where(past, offsets[r], offset)
        slope = jnp.where(past, slopes[r], slope)
        scale = jnp.where(past, scales[r], scale)
    value = jax.lax.bitcast_convert_type(offset + slope * h, jnp.int32).astype(jnp.float32)
    value = value * scale
    return jnp.where(index < negatives, -value, value) if mirrored else value


def _decade_of(g: np.ndarray, shift: int) -> np.ndarray:
    """The decade ``floor(log2(g)) - shift`` of ``g = h + lead`` in NumPy (int32), below 0
    for the map's 0: ``_entries_by_decades`` computes it from the leading zeros of ``g``."""
    g = np.asarray(g, np.int32)
    return np.floor(np.log2(np.maximum(g, 1))).astype(np.int32) - np.int32(shift) - (g == 0)


def _decade_values(h: np.ndarray, shift: int, lead: int, scale: np.float32, top: np.float32):
    """``_entries_by_decades``' arithmetic in NumPy, for indices ``h`` of the folded map."""
    g = np.asarray(h, np.int32) + np.int32(lead)
    i = _decade_of(g, shift)
    whole = np.maximum(i, 0)
    n = _powers_of_five(whole) * (18 * g + 9 - (np.int32(16) << (whole + shift)))
    value = np.minimum(n.astype(np.float32) * scale, top)
    return np.where(i < 0, np.float32(0), value)


def _powers_of_five(i):
    """``5**i`` for integers ``i`` in [0, 7], from the bits of ``i``: products, no selects."""
    return (1 + 4 * (i & 1)) * (1 + 24 * ((i >> 1) & 1)) * (1 + 624 * ((i >> 2) & 1))


@functools.lru_cache(maxsize=32)
def _decades(code_bytes: bytes) -> tuple | None:
    """The map as bitsandbytes' dynamic map (``codes.dynamic_map``), for
    ``_entries_by_decades``: ``(mirrored, negatives, shift, lead, scale, top)``, or
    ``None`` when its (folded) entries are not that map's within ``_DECODE_ULPS``.

    Decade ``i`` of a dynamic map holds ``2**(i + shift)`` entries ``10**(i - E) *
    (0.1 + 0.9 * (j + 0.5) / 2**(i + shift))``. With ``g = h + lead`` for the index
    ``h`` (``g = 2**(i + shift) + j``) that is ``5**i * (18 g + 9 - 2**(i + shift +
    4)) * scale`` for ``scale = 10**-(E + 1) / 2**(shift + 1)``: an integer, one
    conversion and one product, the decade from the leading bit of ``g``.
    """
    code = np.frombuffer(code_bytes, np.float32)
    mirrored, half = _folded(code)
    nonzero = np.flatnonzero(half)
    if nonzero.size < 2 or half[nonzero[0]] <= 0:  # a dynamic map's (half) is not negative
        return None
    first, h = int(nonzero[0]), np.arange(half.size)
    allowed = _DECODE_ULPS * np.spacing(np.abs(half)).astype(np.float64)
    for shift in range(4):
        lead = 2**shift - first
        if lead < 0:
            continue
        # the first entry is (2**(shift + 1) + 9) * scale, scale a power of ten over
        # 2**(shift + 1)
        halves = 2 ** (shift + 1)
        exponent = np.round(np.log10(float(half[first]) * halves / (halves + 9)))
        scale = np.float32(10.0**exponent / halves)
        got = _decade_values(h, shift, lead, scale, half[-1]).astype(np.float64)
        if np.all(np.abs(got - half) <= allowed):
            return mirrored, int(np.count_nonzero(code < 0)), shift, lead, scale, half[-1]
    return None


def _entries_by_decades(index: jax.Array, code: np.ndarray) -> jax.Array:
    """``code[index]`` of a dynamic map from ``_decades``, within ``_DECODE_ULPS`` units in
    the last place: integer arithmetic, one conversion and one product, without a gather
    and with two selects (``_entries_by_runs`` needs three a run)."""
    code = np.asarray(code, np.float32)
    mirrored, negatives, shift, lead, scale, top = _decades(code.tobytes())
    index = jnp.clip(index.astype(jnp.int32), 0, code.size - 1)
    h = jnp.abs(index - negatives) if mirrored else index
    g = h + lead
    i = 31 - jax.lax.clz(g) - shift  # floor(log2(g)) - shift; below 0 for the map's 0
    whole = jnp.maximum(i, 0)
    n = _powers_of_five(whole) * (18 * g + 9 - jax.lax.shift_left(16, whole + shift))
    value = jnp.where(i < 0, 0.0, jnp.minimum(n.astype(jnp.float32) * scale, top))
    return jnp.where(index < negatives, -value, value) if mirrored else value


# Whether dequantize_blockwise reads a map without a gather off the CPU, by decades or
# runs (measured: benchmarks/README.md, "A decoder without gathers").
_DECODE_WITHOUT_GATHERS = True


def _gather_free_decoder(code: np.ndarray | jax.Array) -> Callable | None:
    """The decoder of ``code`` off the CPU: by decades for a dynamic map
    (``_entries_by_decades``), else by runs (``_entries_by_runs``); ``None`` (the
    table) for a map known only as a JAX array or that fits neither."""
    if not isinstance(code, np.ndarray) or not _DECODE_WITHOUT_GATHERS:
        return None
    code_bytes = np.asarray(code, np.float32).tobytes()
    # Not for the 4-bit maps, whose few runs cost little: with their decades XLA:GPU
    # stored the decoded first moment of many 4-bit leaves whole (compiled for an H100,
    # adamw_4bit on 4096 x 1024: 4.13 against 0.16 bytes a parameter of temporaries).
    if code.size > 16 and _decades(code_bytes) is not None:
        return functools.partial(_entries_by_decades, code=code)
    if _runs(code_bytes) is not None:
        return functools.partial(_entries_by_runs, code=code)
    return None


def _entries(index: jax.Array, code: np.ndarray | jax.Array) -> jax.Array:
    """``code[index]``, indices past the map's end reading its last entry: off the CPU,
    for a map known at trace time, without a gather (``_gather_free_decoder``)."""
    by_table = functools.partial(_entries_by_table, code=code)
    decoder = _gather_free_decoder(code)
    if decoder is None:
        return by_table(index)
    return jax.lax.platform_dependent(index, cpu=by_table, default=decoder)


def dequantize_blockwise(
    codes: jax.Array,
    absmax: jax.Array,
    code: np.ndarray | jax.Array,
    block_size: int = 256,
    dtype: jax.typing.DTypeLike = jnp.float32,
) -> jax.Array:
    """The values ``code[codes] * absmax`` of
    [`quantize_blockwise`][varjax.quantization.quantize_blockwise]'s output, in ``dtype``.

    ``block_size`` must be the one the codes were made with. On the CPU the map's
    entries are read from its table. Elsewhere (GPU, TPU), for a map known at trace
    time that is bitsandbytes' dynamic map (from its decimal decades) or lies on a few
    lines (the other default maps), they are computed without a gather, within 2 units
    in the last place of the entries, so that XLA can write a step's new codes over the
    donated old ones.

    Args:
      codes: the codes from [`quantize_blockwise`][varjax.quantization.quantize_blockwise].
      absmax: the per-block absmax from
        [`quantize_blockwise`][varjax.quantization.quantize_blockwise].
      code: the map the codes index, the one they were made with.
      block_size: the block size they were made with, >= 1.
      dtype: the dtype of the result (default float32).

    Returns:
      The values, shaped like ``codes``.

    Examples:
      >>> from varjax.quantization import dynamic_map
      >>> x = jnp.asarray([0.5, -1.0, 0.25, 2.0])
      >>> q, absmax = quantize_blockwise(x, dynamic_map(), 2)
      >>> restored = dequantize_blockwise(q, absmax, dynamic_map(), 2)
      >>> [round(v, 3) for v in restored.tolist()]  # the signed map stops at -0.993
      [0.501, -0.993, 0.242, 2.0]
    """
    return _dequantized(codes, absmax, code, block_size, dtype)


def _dequantized(
    codes: jax.Array,
    absmax: jax.Array,
    code: np.ndarray | jax.Array,
    block_size: int,
    dtype: jax.typing.DTypeLike,
    gather_free: bool = True,
) -> jax.Array:
    """``dequantize_blockwise``; ``gather_free=False`` reads the map's table on every
    platform."""
    shape = jnp.shape(codes)
    n = shape[-1] if shape else 1
    if absmax.shape[-1] != -(-n // block_size):
        raise ValueError(
            f"absmax has {absmax.shape[-1]} blocks, codes of length {n} in blocks of "
            f"{block_size} need {-(-n // block_size)}"
        )
    # codes past a short map read its last entry
    index = jnp.atleast_1d(codes).astype(jnp.int32)
    values = _entries(index, code) if gather_free else _entries_by_table(index, code)
    # per element on every platform: the blocked reshape pads a last axis that is not a
    # multiple of block_size, and XLA:GPU could then not write a step's new codes over
    # the old ones (4096 x 1088, adamw_8bit: 2.07 against 0.09 B/param of temporaries,
    # compiled for an H100)
    values = _times_absmax_in_windows(values, absmax, block_size)
    return values.reshape(shape).astype(dtype)
