"""Quantization maps: the dynamic (tree) map of 8-bit optimizers and a linear map.

A map is a sorted float32 array of ``2**bits`` values in [-1, 1] (signed) or
[0, 1] (unsigned); a value is stored as the index of its nearest map entry.
"""

from __future__ import annotations

import numpy as np


def _linspace_float32(start: float, stop: float, num: int) -> np.ndarray:
    """``num`` evenly spaced float32 values with ``torch.linspace``'s arithmetic.

    The step is rounded to float32, each value is computed in float64 (the first
    half up from ``start``, the second half down from ``stop``) and rounded to
    float32, so the maps below equal bitsandbytes' value for value.
    """
    start32, stop32 = np.float32(start), np.float32(stop)
    if num == 1:
        return np.array([start32], np.float32)
    step = np.float64(np.float32((stop32 - start32) / np.float32(num - 1)))
    i = np.arange(num, dtype=np.float64)
    up = np.float64(start32) + step * i
    down = np.float64(stop32) - step * (num - 1 - i)
    return np.where(i < num // 2, up, down).astype(np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The dynamic tree quantization map (Dettmers, 2016; Dettmers et al., 2022).

    Each value is ``10**e * f``: a decimal exponent ``e`` from ``-(max_exponent_bits
    - 1)`` to 0 and a linear fraction ``f`` in (0.1, 1) whose resolution grows as
    the exponent grows, so small magnitudes keep relative precision. Signed maps
    mirror the values below zero (first moments); unsigned maps spend the sign bit
    on one more fraction bit (second moments). 0 and 1 are always in the map.
    Equal value for value to bitsandbytes' ``create_dynamic_map``.

    Args:
      signed: mirror the values below zero (first moments); ``False``: values
        in [0, 1] only, with one more fraction bit (second moments).
      max_exponent_bits: the number of decimal exponents, ``10**-(bits - 1)``
        to ``10**0``, in [1, total_bits - 1].
      total_bits: the code width; the map has ``2**total_bits`` entries.

    Returns:
      The sorted map, a float32 NumPy array of ``2**total_bits`` values in [-1, 1].

    Examples:
      >>> m = dynamic_map(signed=True)
      >>> m.shape, round(float(m.min()), 6), float(m.max())
      ((256,), -0.992969, 1.0)
    """
    if not 1 <= max_exponent_bits < total_bits:
        raise ValueError(
            f"max_exponent_bits must be in [1, total_bits - 1], got {max_exponent_bits}"
        )
    values: list[np.ndarray] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        edges = _linspace_float32(0.1, 1.0, items)
        means = (edges[:-1] + edges[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        values.append(scale * means)
        if signed:
            values.append(-scale * means)
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:  # all exponent bits zero and no indicator bit: a last linear range
        edges = _linspace_float32(0.1, 1.0, extra + 1)
        means = (edges[:-1] + edges[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
        values.append(scale * means)
        if signed:
            values.append(-scale * means)
    data = np.concatenate([*values, np.float32([0.0, 1.0])]).astype(np.float32)
    if data.size > 2**total_bits:
        raise ValueError(f"the map has {data.size} values, more than 2**{total_bits}")
    data = np.concatenate([data, np.zeros(2**total_bits - data.size, np.float32)])
    return np.sort(data)


def linear_map(signed: bool = True, total_bits: int = 8, *, zero: bool = True) -> np.ndarray:
    """``2**total_bits`` evenly spaced values over [-1, 1] (signed) or [0, 1] (unsigned).

    The signed map spaces ``2**total_bits - 1`` values symmetrically, so that 0 is
    exact, and repeats 0 to fill the last code: equal to bitsandbytes'
    ``create_linear_map`` at 8 bits. ``zero=False`` (unsigned only) drops 0 and
    spaces the values over (0, 1], ``k / 2**total_bits``: the 4-bit second-moment
    map of Li et al. (2023), "Memory Efficient Optimizers with 4-bit States", where
    a second moment quantized to zero would blow the update ``m / sqrt(v)`` up.

    Args:
      signed: values over [-1, 1] (with 0 exact); ``False``: over [0, 1].
      total_bits: the code width, >= 1; the map has ``2**total_bits`` entries.
      zero: keep 0 in the map; ``False`` (unsigned maps only) spaces the values
        over (0, 1].

    Returns:
      The sorted map, a float32 NumPy array of ``2**total_bits`` values.

    Examples:
      >>> linear_map(signed=True, total_bits=2)
      array([-1.,  0.,  0.,  1.], dtype=float32)
      >>> linear_map(signed=False, total_bits=2, zero=False)
      array([0.25, 0.5 , 0.75, 1.  ], dtype=float32)
    """
    if total_bits < 1:
        raise ValueError(f"total_bits must be >= 1, got {total_bits}")
    if not zero:
        if signed:
            raise ValueError("zero=False needs signed=False: a signed map keeps 0")
        return _linspace_float32(0.0, 1.0, 2**total_bits + 1)[1:]
    if not signed:
        return _linspace_float32(0.0, 1.0, 2**total_bits)
    values = _linspace_float32(-1.0, 1.0, 2**total_bits - 1)
    half = values.size // 2
    # linspace's rounding leaves the centre at +3.7e-9 at 8 bits (kept, as bitsandbytes)
    # and at -4.5e-8 at 4 bits, which would unsort the map: clamp it to zero
    values[half] = max(values[half], np.float32(0.0))
    return np.concatenate([values[:half], np.float32([0.0]), values[half:]])


def default_maps(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The (signed, unsigned) maps for optimizer state of ``bits`` bits.

    8 bits: bitsandbytes' dynamic maps (Dettmers et al., 2022). 4 bits: the
    choice of Li et al. (2023) and of their ``lpmm`` code: a dynamic map with 3
    exponent bits for first moments, and the linear map without zero for second
    moments.

    Args:
      bits: 8 or 4.

    Returns:
      ``(signed_map, unsigned_map)``, float32 NumPy arrays of ``2**bits`` values.

    Examples:
      >>> [m.size for m in default_maps(4)]
      [16, 16]
    """
    if bits == 8:
        return dynamic_map(signed=True), dynamic_map(signed=False)
    if bits == 4:
        return (
            dynamic_map(signed=True, max_exponent_bits=3, total_bits=4),
            linear_map(signed=False, total_bits=4, zero=False),
        )
    raise ValueError(f"bits must be 8 or 4, got {bits}")
