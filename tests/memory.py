"""A donating train step, and what XLA allocates for it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax


def donating_train_step(tx: optax.GradientTransformation) -> Callable[[Any, Any, Any], Any]:
    """``step(params, state, grads) -> (params, state)``: ``tx.update`` then
    ``optax.apply_updates``, jitted, donating the parameters and the state."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def donated_step_temporary_bytes(tx: optax.GradientTransformation, params) -> int:
    """Bytes of temporaries XLA allocates for :func:`donating_train_step` of ``tx``."""
    lowered = donating_train_step(tx).lower(params, tx.init(params), params)
    return lowered.compile().memory_analysis().temp_size_in_bytes
