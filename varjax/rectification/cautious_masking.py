"""Cautious masking (Liang et al., 2024) around any transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    PyTree,
    ShapeWitness,
    cast_like,
    check_same_structure,
    shape_witness,
    trainable_leaves_only,
    witness_shapes,
)
from varjax.roles import Role

# --------------------------------------------------------------------------
# Cautious masking
# --------------------------------------------------------------------------


@roles.declare(inner_state=Role.NESTED, shapes=Role.EXACT)
class CautiousState(NamedTuple):
    """State of [`cautious`][varjax.cautious]: the inner transform's state, and ``shapes``, a
    ``varjax._base.ShapeWitness`` (the parameters' tree and shapes as static
    data: no leaves, no bytes) that the gradient tree is checked against before
    the inner transform sees it."""

    inner_state: optax.OptState
    shapes: ShapeWitness


def cautious(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Cautious masking (Liang et al., 2024, "Cautious Optimizers: Improving
    Training with One Line of Code") around any transform.

    Entries of the inner update whose sign disagrees with the gradient are
    zeroed, and the rest rescaled per tensor by ``n / (n_kept + 1)`` so the
    mean step size is kept: ``u * mask * n / (sum(mask) + 1)`` with
    ``mask = (u * g > 0)``, as in the paper's code and pytorch-optimizer (timm
    divides by ``mean(mask)`` instead).

    ``inner`` must output the update *before* the learning rate's sign flip
    (a ``scale_by_*`` transform such as ``optax.scale_by_adam``); chain the
    learning rate after the wrapper.

    Args:
      inner: the transform whose update is masked, before the learning rate
        (``optax.scale_by_adam()``, ``optax.scale_by_lion()``, a varjax block).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` that forwards extra
      arguments to ``inner``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.cautious(optax.scale_by_lion()),
      ...                  optax.scale_by_learning_rate(1e-4))
      >>> state = tx.init({"w": jnp.ones(3)})
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> CautiousState:
        return CautiousState(inner_state=inner.init(params), shapes=shape_witness(params))

    def update_fn(
        updates: PyTree, state: CautiousState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, CautiousState]:
        check_same_structure(updates, witness_shapes(state.shapes), "optimizer state")
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        check_same_structure(updates, inner_updates, "inner transform's updates")

        def mask(u: jax.Array, g: jax.Array) -> jax.Array:
            # sign product, not u * g > 0: the product of tiny values underflows to 0
            keep = (jnp.sign(u) * jnp.sign(g) > 0).astype(u.dtype)
            return u * keep * (keep.size / (jnp.sum(keep) + 1)).astype(u.dtype)

        inner_state = cast_like(inner_state, state.inner_state)
        return jax.tree.map(mask, inner_updates, updates), CautiousState(inner_state, state.shapes)

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))
