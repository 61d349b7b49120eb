"""One Orbax round trip for the tests that check a restored state continues identically."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def orbax_round_trip(directory: pathlib.Path, tree: Any) -> Any:
    """Save ``tree`` with Orbax's ``StandardCheckpointer`` under ``directory`` and restore
    it against its own shapes and dtypes."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, tree)
    checkpointer.wait_until_finished()
    return checkpointer.restore(directory, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
