"""Tolerances for float32 results against float64 references and peers.

Why not ``np.testing.assert_allclose(a, d, rtol=1e-5, atol=1e-8)``: a fixed
``atol`` ignores the scale of the array, and an element near zero after a
cancellation carries the rounding error of the *terms* it came from, not of its
own value. XLA:CPU picks vector widths, reduction orders and FMA contraction per
processor: on an AVX-512 EPYC, ``XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`` (no AVX,
no FMA) changes the last bits of ``jnp.std``, of a rescaling by it, of ``exp``,
``log1p`` and ``a * b + c``, and ``AVX2`` or ``--xla_cpu_prefer_vector_width=128``
those of the rescaling, while sums, norms and small matrix products stayed
bit-equal. So an element near a cancellation lands a few ulps of the array's
magnitude away on another CPU.

Error model (u = ``EPS32 / 2`` is float32's unit roundoff; Higham, *Accuracy
and Stability of Numerical Algorithms*, ch. 3-4):

- one rounding of ``x`` errs by at most ``u |x|``; a chain of ``n`` roundings
  with no cancellation by about ``n u`` relative: the element-wise ``rtol``;
- where the result is a sum or difference of terms of size up to ``S`` (an EMA
  of sign-changing gradients, ``w - mean(w)``, ``g + lamb * mu``), the error is
  ``n u S``, whatever the size of the result; a float32 sum of ``n`` terms errs
  by up to ``(n - 1) u sum|x_i|`` in the worst order and ``log2(n) u sum|x_i|``
  pairwise, and a reduced statistic (a mean, a norm, a standard deviation) then
  multiplies or shifts every element, so its error is a multiple of ``u`` times
  the array's largest magnitude.

Hence :func:`assert_close`'s ``atol = ulps * EPS32 * max|desired|`` per array
(over a sequence of steps, ``test_rectification.assert_sequences_close`` takes
the largest magnitude the leaf has reached so far, since a state carries the
rounding of the largest values it held). ``ulps`` is about half the roundings
on the longest chain whose errors survive, times the ratio of the
intermediates' size to the output's; an EMA with decay ``b`` forgets old errors
at rate ``b``, so its chain is about ``1 / (1 - b)`` steps long, not the whole
run. :func:`assert_close_normwise` checks ``||a - d||_2 <= rtol ||d||_2`` where
a reduced statistic rescales a whole array.
Both stay orders of magnitude below what a wrong algorithm gives (a missing
bias correction is a factor ``1 / (1 - b^t)``; ``ddof=0`` for ``ddof=1`` moves a
384-element standard deviation by 1.3e-3): the reference tests check a few
wrong variants in ``test_tolerances.py``.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23, twice float32's unit roundoff


def scale_of(desired) -> float:
    """The largest magnitude of an array (0 for an empty one)."""
    desired = np.asarray(desired, np.float64)
    return float(np.max(np.abs(desired))) if desired.size else 0.0


def assert_close(
    actual,
    desired,
    *,
    rtol: float,
    ulps: float,
    scale=None,
    atol: float = 0.0,
    err_msg="",
) -> None:
    """Element-wise ``|a - d| <= rtol |d| + ulps * EPS32 * scale + atol``.

    ``scale`` defaults to ``max|desired|`` (see the module docstring for the
    error model); pass the magnitude of the intermediates when they are larger
    than the result. ``atol`` is an absolute term for float64 peers and
    documented drifts, not for float32 rounding.
    """
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    scale = scale_of(desired) if scale is None else float(scale)
    total = ulps * EPS32 * scale + atol
    msg = f"{err_msg} (atol = {ulps} * EPS32 * {scale:.3g} + {atol:.3g} = {total:.3g})".strip()
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=total, err_msg=msg)


def relative_error(actual, desired) -> float:
    """``||a - d||_2 / ||d||_2`` (the absolute error when ``d`` is zero)."""
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    error = float(np.linalg.norm(actual - desired))
    norm = float(np.linalg.norm(desired))
    return error / norm if norm > 0 else error


def assert_close_normwise(actual, desired, *, rtol: float, err_msg="") -> None:
    """``||a - d||_2 <= rtol ||d||_2`` over the whole array (shapes must match)."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
    error = relative_error(actual, desired)
    assert error <= rtol, f"{err_msg}: norm-wise relative error {error:.3g} > rtol={rtol:.3g}"
