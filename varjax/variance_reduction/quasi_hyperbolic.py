"""Quasi-hyperbolic momentum (Ma & Yarats, 2019)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from varjax import roles
from varjax._base import (
    PyTree,
    cast_like,
    check_interval,
    check_same_structure,
    ema,
    trainable_leaves_only,
)
from varjax.roles import Role

# --------------------------------------------------------------------------
# QHM
# --------------------------------------------------------------------------


@roles.declare(momentum=Role.SIGNED)
class QHMState(NamedTuple):
    """State of [`scale_by_qhm`][varjax.scale_by_qhm]: the momentum buffer."""

    momentum: PyTree


def scale_by_qhm(b: float = 0.999, nu: float = 0.7) -> optax.GradientTransformation:
    """Quasi-hyperbolic momentum (Ma & Yarats, 2019, "Quasi-hyperbolic momentum and
    Adam for deep learning"): ``(1 - nu) g_t + nu m_t`` with ``m_t = b m + (1 - b) g_t``.

    ``nu=0`` is SGD, ``nu=1`` an EMA (normalised) momentum, ``nu=b`` Nesterov's
    momentum. Defaults are the paper's recommendation (``nu=0.7, b=0.999``);
    pytorch-optimizer's ``QHM`` calls ``b`` ``momentum`` and defaults to plain SGD.

    Args:
      b: decay of the momentum (an EMA), in [0, 1].
      nu: weight of the momentum against the raw gradient, in [0, 1] (0: SGD).

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.scale_by_qhm(), optax.scale_by_learning_rate(1.0))
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    check_interval("b", b, 0.0, 1.0)
    check_interval("nu", nu, 0.0, 1.0)

    def init_fn(params: PyTree) -> QHMState:
        return QHMState(momentum=optax.tree.zeros_like(params))

    def update_fn(
        updates: PyTree, state: QHMState, params: PyTree | None = None
    ) -> tuple[PyTree, QHMState]:
        del params
        check_same_structure(updates, state.momentum, "optimizer state")
        momentum = ema(updates, state.momentum, b)
        out = jax.tree.map(lambda g, m: (1 - nu) * g + nu * m, updates, momentum)
        return cast_like(out, updates), QHMState(momentum)

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))
