"""What the variance-reduced transforms share: the previous gradient of the exact forms."""

from __future__ import annotations

from typing import Any

from varjax._base import PyTree, check_same_structure


def previous_gradients(
    exact: bool, extra_args: dict[str, Any], stored: PyTree | None, updates: PyTree, who: str
) -> PyTree:
    """The gradient a correction subtracts: supplied (exact) or stored (approximate).

    Examples:
      >>> g = {"w": 1.0}
      >>> previous_gradients(True, {"previous_grads": {"w": 0.5}}, None, g, "storm")
      {'w': 0.5}
      >>> previous_gradients(True, {}, None, g, "storm")
      Traceback (most recent call last):
      ...
      ValueError: storm(exact=True) needs the gradient at the previous parameters ...
    """
    if not exact:
        return stored
    if "previous_grads" not in extra_args:
        raise ValueError(
            f"{who}(exact=True) needs the gradient at the previous parameters on the current "
            "batch: call update(grads, state, params, previous_grads=...) "
            "(varjax.mars_value_and_grad computes both)"
        )
    previous = extra_args["previous_grads"]
    check_same_structure(previous, updates, "gradient tree (previous_grads)")
    return previous
