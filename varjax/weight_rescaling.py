"""Weight rescaling: keep the spread of the weights under control during training.

From Owen, Kumar, Roy Chowdhury and Güra (2025), "Variance Control via Weight
Rescaling in LLM Pre-training" (arXiv 2503.17500):

* [`layer_index_rescaling`][varjax.layer_index_rescaling] - Layer Index Rescaling (LIR), an
  initializer whose standard deviation shrinks with the depth of the decoder block, ``base_std /
  sqrt(layer_index * scale_factor)`` ([`lir_std`][varjax.weight_rescaling.lir_std]).
* [`target_variance_rescaling`][varjax.target_variance_rescaling] - Target Variance Rescaling (TVR),
  a transform to chain last that, every few steps, rescales each weight matrix whose standard
  deviation has grown past a threshold back to a target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    PyTree,
    check_integer,
    check_interval,
    check_same_structure,
    trainable_leaves_only,
    zero_count,
)
from varjax.roles import Role

__all__ = [
    "TargetVarianceRescalingState",
    "layer_index_rescaling",
    "lir_std",
    "target_variance_rescaling",
]


# --------------------------------------------------------------------------
# Layer Index Rescaling
# --------------------------------------------------------------------------


def lir_std(layer_index: int, base_std: float = 0.02, scale_factor: float = 1.0) -> float:
    """The standard deviation LIR gives decoder block ``layer_index`` (counted from 1):
    ``base_std / sqrt(layer_index * scale_factor)``.

    Examples:
      >>> lir_std(4, base_std=0.006)
      0.003
    """
    layer_index = check_integer("layer_index", layer_index, 1)
    check_interval("base_std", base_std, 0.0, low_closed=False)
    check_interval("scale_factor", scale_factor, 0.0, low_closed=False)
    return float(base_std) / math.sqrt(int(layer_index) * float(scale_factor))


def layer_index_rescaling(
    layer_index: int, base_std: float = 0.02, scale_factor: float = 1.0
) -> jax.nn.initializers.Initializer:
    """Layer Index Rescaling (Owen et al., 2025, "Variance Control via Weight Rescaling in LLM
    Pre-training"): a zero-mean normal initializer for the weights of decoder block ``layer_index``,
    with standard deviation [`lir_std`][varjax.weight_rescaling.lir_std].

    In the paper's code every linear layer of block ``l`` (query, key, value and
    output projections, and the MLP's gate, up and down projections) is drawn
    from ``N(0, (base_std / sqrt(l * scale_factor))^2)`` with its bias set to
    zero, while the embeddings and the output head keep ``N(0, base_std^2)``:
    use this as the ``kernel_init`` of the block's layers only. ``base_std`` is
    the model's ``initializer_range``; the code's default is 0.02, the paper's
    headline runs use 0.006. ``scale_factor`` (default 1.0) stretches the decay
    with depth. The draw is an untruncated normal.

    Args:
      layer_index: the block's position in the stack, counted from 1.
      base_std: the standard deviation of block 1, > 0.
      scale_factor: multiplies ``layer_index`` under the square root, > 0.

    Examples:
      >>> import jax
      >>> from flax import nnx
      >>> from varjax.weight_rescaling import layer_index_rescaling
      >>> layer = nnx.Linear(
      ...     64, 64, kernel_init=layer_index_rescaling(4, base_std=0.006), rngs=nnx.Rngs(0)
      ... )
      >>> init = layer_index_rescaling(16, base_std=0.02)
      >>> w = init(jax.random.key(0), (512, 512))
      >>> print(round(float(w.std()), 4))  # 0.02 / sqrt(16)
      0.005
    """
    return jax.nn.initializers.normal(stddev=lir_std(layer_index, base_std, scale_factor))


# --------------------------------------------------------------------------
# Target Variance Rescaling
# --------------------------------------------------------------------------


@roles.declare(count=Role.COUNT)
class TargetVarianceRescalingState(NamedTuple):
    """State of [`target_variance_rescaling`][varjax.target_variance_rescaling]: the number of
    updates made so far."""

    count: jax.Array


Mask = PyTree | Callable[[PyTree], PyTree] | None


def _selected_leaves(mask: Mask, params: PyTree) -> list[bool]:
    """One Python bool per leaf of ``params``: whether the leaf may be rescaled.

    By default the matrices and higher-rank arrays (``ndim >= 2``). A ``mask``
    tree, or the tree a callable ``mask`` returns for ``params``, may be a prefix
    of ``params``, as in ``optax.masked``; its values must be concrete.
    """
    if mask is None:
        return [jnp.ndim(p) >= 2 for p in jax.tree.leaves(params)]
    chosen = mask(params) if callable(mask) else mask
    spread = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), chosen, params)
    return jax.tree.leaves(spread)


def _rescale_leaf(
    update: jax.Array, param: jax.Array, target_std: Any, threshold: Any
) -> jax.Array:
    """The update that lands ``param`` on its rescaled weights, or ``update`` itself.

    The weights after this step are ``param + update`` in ``param``'s dtype (as
    ``optax.apply_updates`` computes them); their statistics and the rescaling are
    computed in float32 or wider, and the new update is cast back to
    ``update``'s dtype.
    """
    compute = jnp.promote_types(jnp.result_type(param), jnp.float32)
    weights = jnp.asarray(param + update).astype(jnp.result_type(param)).astype(compute)
    mean = jnp.mean(weights)
    std = jnp.std(weights, ddof=1)
    rescaled = (weights - mean) / std * target_std + mean
    new_update = (rescaled - param.astype(compute)).astype(jnp.result_type(update))
    return jnp.where(std / target_std > threshold, new_update, update)


def target_variance_rescaling(
    target_std: float = 0.02,
    every: int = 50,
    ratio_threshold: float = 1.2,
    mask: Mask = None,
) -> optax.GradientTransformation:
    """Target Variance Rescaling (Owen et al., 2025, "Variance Control via Weight
    Rescaling in LLM Pre-training"): every ``every`` steps, pull the standard
    deviation of each weight matrix back to ``target_std`` when it has grown past
    ``ratio_threshold * target_std``.

    Chain it last, after the learning rate and weight decay, for example
    ``optax.chain(optax.adamw(3e-4), target_variance_rescaling(0.01))``: it
    needs ``params`` and sees ``w = params + updates``, the weights this step
    lands on. On the steps whose number (counted from 1) is a multiple of
    ``every``, each selected leaf with ``std(w) / target_std > ratio_threshold``
    becomes ``w' = (w - mean(w)) / std(w) * target_std + mean(w)`` (mean and
    unbiased standard deviation, ``ddof=1``, over the whole array, in float32 or
    wider) and its update becomes ``w' - params``, so that
    ``optax.apply_updates`` gives the rescaled weights. The rescaling only
    shrinks: ``ratio_threshold`` must be at least 1, since below 1 it would also
    stretch weights whose spread is under the target, which the method does not
    do. Every other leaf, and every leaf on other steps, passes through
    bit-identically. A leaf whose statistics are not finite, or whose standard
    deviation is zero, is left alone.

    The defaults are the official code's (``target_std=0.02``, ``step_interval=50``,
    ``ratio_threshold=1.2``); the paper's headline run initialises with 0.006 and LIR
    ([`layer_index_rescaling`][varjax.layer_index_rescaling]) and rescales to ``target_std=0.01``.
    By default the leaves with ``ndim >= 2`` are rescaled (the linear layers' weights, and
    embeddings if they are parameters: mask them out to follow the paper, which rescales the decoder
    blocks' linear layers). ``mask``, a tree of bools or a callable from the params to one (a prefix
    of the params' tree, as in ``optax.masked``), replaces that choice.

    Differences from the official code (a PyTorch Lightning callback run after
    ``optimizer.step()``): here it is the last transform of the chain, with the
    same effect on the weights. The official code also zeroes the bias of each
    rescaled module; a leaf of a tree belongs to no module, so biases are left
    alone here. Under FSDP the official code all-reduces the mean and standard
    deviation; here ``jnp.mean`` and ``jnp.std`` of a sharded array under
    ``jit`` are already global. ``params + (w' - params)`` may differ from
    ``w'`` by a rounding in the last place, and in bfloat16 by bfloat16's
    rounding. The step test is a ``jax.lax.cond``, so steps that do not rescale
    cost one comparison (under ``vmap`` it becomes a select and both sides run).

    Args:
      target_std: the standard deviation rescaled weights get, > 0.
      every: rescale on every ``every``-th step, an integer >= 1.
      ratio_threshold: rescale a leaf when ``std / target_std`` exceeds it, >= 1.
      mask: which leaves may be rescaled; ``None`` selects those with ``ndim >= 2``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from varjax.weight_rescaling import target_variance_rescaling
      >>> tx = optax.chain(optax.sgd(1.0), target_variance_rescaling(0.02, every=1))
      >>> params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
      >>> grads = {"w": -jnp.asarray([[0.0, 1.0], [2.0, 3.0]]), "b": -jnp.ones(2)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)
      >>> print(round(float(new["w"].std(ddof=1)), 4), float(new["w"].mean()), new["b"])
      0.02 1.5 [1. 1.]
    """
    check_interval("target_std", target_std, 0.0, low_closed=False)
    every = check_integer("every", every, 1)
    check_interval("ratio_threshold", ratio_threshold, 1.0)

    def init_fn(params: PyTree) -> TargetVarianceRescalingState:
        del params
        return TargetVarianceRescalingState(count=zero_count())

    def rescale(updates: PyTree, params: PyTree) -> PyTree:
        leaves, treedef = jax.tree.flatten(updates)
        selected = _selected_leaves(mask, params)
        out = [
            _rescale_leaf(u, p, target_std, ratio_threshold) if chosen else u
            for u, p, chosen in zip(leaves, jax.tree.leaves(params), selected, strict=True)
        ]
        return jax.tree.unflatten(treedef, out)

    def keep(updates: PyTree, params: PyTree) -> PyTree:
        del params
        return updates

    def update_fn(
        updates: PyTree, state: TargetVarianceRescalingState, params: PyTree | None = None
    ) -> tuple[PyTree, TargetVarianceRescalingState]:
        if params is None:
            raise ValueError(
                "target_variance_rescaling needs params: pass them to update(), and chain "
                "it last so that it sees the weights the step lands on"
            )
        check_same_structure(updates, params, "params")
        if any(_selected_leaves(mask, params)):
            on_step = (state.count + 1) % every == 0
            updates = jax.lax.cond(on_step, rescale, keep, updates, params)
        return updates, TargetVarianceRescalingState(count=optax.safe_increment(state.count))

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))
