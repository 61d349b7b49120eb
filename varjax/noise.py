"""Noise-aware clipping and scaling: transforms that measure gradient noise and act on it.

So far: :func:`autoclip`, clipping to a percentile of the history of gradient norms.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax._base import check_interval

__all__ = ["AutoClipState", "autoclip", "percentile_of_history"]


class AutoClipState(NamedTuple):
    """State of :func:`autoclip`: the last ``window`` gradient norms (a ring buffer,
    filled from index 0) and how many norms have been recorded."""

    norms: jax.Array
    count: jax.Array


def percentile_of_history(norms: jax.Array, count: jax.Array, percentile: float) -> jax.Array:
    """The ``percentile`` (in [0, 100]) of the first ``min(count, len(norms))`` entries,
    interpolated linearly between order statistics as ``np.percentile`` does;
    ``inf`` while nothing is recorded.

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

    Example:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.autoclip(percentile=10.0), optax.adam(1e-3))
      >>> params = {"w": jnp.ones(3)}
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    """
    check_interval("percentile", percentile, 0.0, 100.0, low_closed=False)
    if int(window) != window or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")

    def init_fn(params: optax.Params) -> AutoClipState:
        del params
        return AutoClipState(jnp.zeros([int(window)], jnp.float32), jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates, state: AutoClipState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, AutoClipState]:
        del params
        norm = optax.global_norm(updates).astype(jnp.float32)
        finite = jnp.isfinite(norm)
        slot = state.count % state.norms.shape[0]
        norms = jnp.where(finite, state.norms.at[slot].set(norm), state.norms)
        count = state.count + finite.astype(jnp.int32)
        threshold = percentile_of_history(norms, count, percentile)
        scale = jnp.where(finite & (norm > threshold), threshold / norm, 1.0)
        clipped = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
        return clipped, AutoClipState(norms, count)

    return optax.GradientTransformation(init_fn, update_fn)
