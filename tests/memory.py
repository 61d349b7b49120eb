"""What a compiled train step allocates, read from XLA's memory analysis."""

from __future__ import annotations

import jax
import optax


def donated_step_temporary_bytes(tx: optax.GradientTransformation, params) -> int:
    """Bytes of temporaries XLA allocates for a jitted ``update`` + ``apply_updates``
    step that donates the parameters and the state."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    return lowered.compile().memory_analysis().temp_size_in_bytes
