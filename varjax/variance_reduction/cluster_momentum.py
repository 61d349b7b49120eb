"""One momentum per data cluster (Tondji et al., 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    PyTree,
    cast_like,
    check_integer,
    check_interval,
    check_same_structure,
    trainable_leaves_only,
)
from varjax.roles import Role

# --------------------------------------------------------------------------
# Multi-momentum over data clusters
# --------------------------------------------------------------------------


@roles.declare(momenta=Role.SIGNED)
class MultiMomentumState(NamedTuple):
    """State of [`multi_momentum`][varjax.multi_momentum]: one momentum per cluster, stacked on a
    leading axis."""

    momenta: PyTree


def multi_momentum(
    num_clusters: int,
    decay: float = 0.9,
    nu: float = 1.0,
    weights: Sequence[float] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """One momentum buffer per data cluster (Tondji et al., 2021, "Variance Reduction in
    Deep Learning: More Momentum is All You Need").

    The batch's cluster id ``k`` arrives as the extra argument ``cluster`` (an int, traced or not).
    Only buffer ``k`` takes the gradient, ``m_k = decay m_k + (1 - decay) g``; the step is built
    from all buffers, ``(1 - nu) g + nu * sum_j w_j m_j`` (``w`` uniform unless ``weights`` is
    given, e.g. the clusters' data fractions). ``nu=1`` is SGD with momentum over clusters, ``nu <
    1`` QHM; inside [`implicit_gradient_transport`][varjax.implicit_gradient_transport] (with
    ``gamma=decay``) it is the paper's IGT combination.

    Not yet checked against the paper's algorithm: only its abstract was
    reachable here, so the buffer update (the ``1 - decay`` damping, which buffer
    takes the gradient) and the combination follow the abstract's description of
    one momentum per cluster, and the float64 test reference restates them.

    Args:
      num_clusters: the number of data clusters (and momentum buffers), an
        integer >= 1.
      decay: decay of each cluster's momentum, in [0, 1).
      nu: weight of the combined momenta against the raw gradient, in [0, 1]
        (1, default: momentum only).
      weights: the weight of each cluster's momentum in the combination, >= 0,
        ``num_clusters`` of them; ``None``: uniform, ``1 / num_clusters``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``cluster``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.multi_momentum(num_clusters=4),
      ...                  optax.scale_by_learning_rate(0.1))
      >>> params = {"w": jnp.zeros(3)}
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params, cluster=2)
    """
    num_clusters = check_integer("num_clusters", num_clusters, 1)
    check_interval("decay", decay, 0.0, 1.0, high_closed=False)
    check_interval("nu", nu, 0.0, 1.0)
    if weights is None:
        weights = (1.0 / num_clusters,) * num_clusters
    if len(weights) != num_clusters:
        raise ValueError(
            f"weights must have num_clusters={num_clusters} entries, got {len(weights)}"
        )
    for k, weight in enumerate(weights):
        check_interval(f"weights[{k}]", weight, 0.0)
    cluster_weights = jnp.asarray(weights, jnp.float32)

    def init_fn(params: PyTree) -> MultiMomentumState:
        return MultiMomentumState(
            jax.tree.map(
                lambda p: jnp.zeros((num_clusters, *jnp.shape(p)), jnp.result_type(p)), params
            )
        )

    def update_fn(
        updates: PyTree, state: MultiMomentumState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, MultiMomentumState]:
        del params
        if "cluster" not in extra_args:
            raise ValueError("multi_momentum needs the batch's cluster id: update(..., cluster=k)")
        check_same_structure(
            updates, jax.tree.map(lambda m: m[0], state.momenta), "optimizer state"
        )
        k = jnp.asarray(extra_args["cluster"], jnp.int32)
        momenta = jax.tree.map(
            lambda g, m: m.at[k].set((decay * m[k] + (1 - decay) * g).astype(m.dtype)),
            updates,
            state.momenta,
        )

        def combine(g: jax.Array, m: jax.Array) -> jax.Array:
            w = cluster_weights.reshape((-1,) + (1,) * g.ndim).astype(m.dtype)
            return (1 - nu) * g + nu * jnp.sum(w * m, axis=0)

        out = jax.tree.map(combine, updates, momenta)
        return cast_like(out, updates), MultiMomentumState(momenta)

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))
