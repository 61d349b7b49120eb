"""Statistics of gradient samples, shared by the transforms that measure gradient noise.

A step's gradient samples come from one of two sources:

- micro-batch gradients stacked on a leading axis, handed over as the extra
  argument ``microbatch_grads`` (``jax.vmap`` of the gradient function over
  micro-batches gives them);
- one sample per device along a named axis (``axis_name``) inside
  ``shard_map`` or ``pmap``, where the updates on each device are its sample
  and the statistics are taken with collectives.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class Moments(NamedTuple):
    """One leaf's per-element mean and unbiased variance over ``n`` samples."""

    mean: jax.Array
    variance: jax.Array
    n: int


def is_moments(x: Any) -> bool:
    return isinstance(x, Moments)


def _device_count(axis_name: str) -> int:
    n = jax.lax.psum(1, axis_name)
    if n < 2:
        raise ValueError(f"axis {axis_name!r} has {n} device(s); the statistics need 2")
    return n


def check_stacked(samples: PyTree, updates: PyTree, owner: str) -> None:
    """Check at trace time that ``samples`` stacks ``n >= 2`` gradients like ``updates``
    on a new leading axis, with one ``n`` for every leaf.

    Raises ``ValueError`` naming ``owner`` and the first leaf that does not fit,
    e.g. when the micro-batch axis is missing, or when the gradients were
    averaged over it before the call.
    """
    if samples is None:
        raise ValueError(f"{owner} needs the extra argument microbatch_grads")
    hint = (
        f"{owner}: microbatch_grads must hold n >= 2 micro-batch gradients stacked on a new "
        "leading axis, each leaf of shape (n, *gradient.shape) with one n for every leaf "
        "(jax.vmap of the gradient function over the micro-batches gives them)"
    )
    got, want = jax.tree.structure(samples), jax.tree.structure(updates)
    if got != want:
        raise ValueError(f"{hint}; its tree structure {got} is not that of the gradients {want}")
    n = None
    for (path, sample), grad in zip(
        jax.tree_util.tree_leaves_with_path(samples), jax.tree.leaves(updates), strict=True
    ):
        shape, grad_shape = tuple(jnp.shape(sample)), tuple(jnp.shape(grad))
        where = f"the leaf at {jax.tree_util.keystr(path)} has shape {shape}"
        if len(shape) != len(grad_shape) + 1 or shape[1:] != grad_shape:
            raise ValueError(f"{hint}; {where} for a gradient of shape {grad_shape}")
        if shape[0] < 2:
            raise ValueError(f"{hint}; {where}: it needs >= 2 samples on the leading axis")
        if n is not None and shape[0] != n:
            raise ValueError(f"{hint}; {where}, but an earlier leaf has n = {n}")
        n = shape[0]


def _stacked(samples: PyTree, updates: PyTree, owner: str) -> PyTree:
    check_stacked(samples, updates, owner)
    return jax.tree.map(
        lambda g: jnp.asarray(g).astype(jnp.promote_types(jnp.result_type(g), jnp.float32)),
        samples,
    )


def sample_moments(
    updates: PyTree, samples: PyTree | None, axis_name: str | None, owner: str
) -> PyTree:
    """Per-element mean and unbiased variance of the samples, one ``Moments`` a leaf.

    With ``axis_name`` the samples are ``updates`` across the named axis;
    otherwise they are the leading axis of ``samples``. Statistics are taken
    in float32 at least.
    """
    if axis_name is not None:
        n = _device_count(axis_name)

        def across_devices(g: jax.Array) -> Moments:
            g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
            mean = jax.lax.pmean(g, axis_name)
            variance = jax.lax.psum(jnp.square(g - mean), axis_name) / (n - 1)
            return Moments(mean, variance, n)

        return jax.tree.map(across_devices, updates)

    def across_samples(g: jax.Array) -> Moments:
        return Moments(jnp.mean(g, axis=0), jnp.var(g, axis=0, ddof=1), g.shape[0])

    return jax.tree.map(across_samples, _stacked(samples, updates, owner))


def half_means(
    updates: PyTree, samples: PyTree | None, axis_name: str | None, owner: str
) -> tuple[PyTree, PyTree]:
    """The mean gradients of the first and the second half of the samples (the
    first ``n // 2`` and the other ``n - n // 2``), each in float32 at least.

    With ``axis_name`` the halves are the devices of index below ``n // 2`` and
    the others, as two all-reduce groups.

    Examples:
      >>> samples = {"w": jnp.arange(5.0)[:, None]}
      >>> first, second = half_means({"w": jnp.zeros(1)}, samples, None, "example")
      >>> float(first["w"][0]), float(second["w"][0])  # samples 0-1 and 2-4
      (0.5, 3.0)
    """
    if axis_name is not None:
        n = _device_count(axis_name)
        in_first = jax.lax.axis_index(axis_name) < n // 2

        def half(g: jax.Array, first: bool) -> jax.Array:
            g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
            mine = in_first if first else ~in_first
            size = n // 2 if first else n - n // 2
            return jax.lax.psum(jnp.where(mine, g, 0.0), axis_name) / size

        return (
            jax.tree.map(lambda g: half(g, True), updates),
            jax.tree.map(lambda g: half(g, False), updates),
        )
    stacked = _stacked(samples, updates, owner)
    first = jax.tree.map(lambda g: jnp.mean(g[: g.shape[0] // 2], axis=0), stacked)
    second = jax.tree.map(lambda g: jnp.mean(g[g.shape[0] // 2 :], axis=0), stacked)
    return first, second
