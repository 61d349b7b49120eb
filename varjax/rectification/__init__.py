"""Rectification and adaptive-step corrections of Adam.

Building blocks in Optax's ``scale_by_*`` convention (they output the update
direction *before* the learning rate and its sign flip) and wrappers that
correct any adaptive transform:

* [`rectify`][varjax.rectify] / [`scale_by_radam`][varjax.scale_by_radam] - RAdam's variance
  rectification.
* [`scale_by_adopt`][varjax.scale_by_adopt] - ADOPT, the second moment taken one step late.
* [`scale_by_grams`][varjax.scale_by_grams] - Grams, Adam's magnitude with the gradient's sign.
* [`cautious`][varjax.cautious] - cautious masking of any transform's update.
* [`scale_by_diffgrad`][varjax.scale_by_diffgrad] - diffGrad's friction on the first moment.
* [`scale_by_adamp`][varjax.scale_by_adamp] - AdamP's projection for scale-invariant weights.
* [`scale_by_adam_atan2`][varjax.scale_by_adam_atan2] - eps-free Adam through ``atan2``.

The Adam-like blocks take ``amsgrad=True`` for the AMSGrad max correction of
the second moment (one shared implementation in ``varjax._base``).

Each method lives in a module of its own (``radam``, ``adopt``, ``adam_steps``,
``adamp``, ``cautious_masking``); every name is imported here, so
``varjax.rectification.scale_by_radam`` and the rest work as before.

Examples:
  >>> import jax.numpy as jnp
  >>> from varjax.rectification import rectification
  >>> [bool(rectification(jnp.asarray(t), 0.999, 5.0)[1]) for t in (5, 6)]
  [False, True]
"""

from varjax.rectification.adam_steps import (
    ScaleByDiffGradState,
    scale_by_adam_atan2,
    scale_by_diffgrad,
    scale_by_grams,
)
from varjax.rectification.adamp import scale_by_adamp
from varjax.rectification.adopt import ScaleByAdoptState, scale_by_adopt
from varjax.rectification.cautious_masking import CautiousState, cautious
from varjax.rectification.radam import RectifyState, rectification, rectify, scale_by_radam

# At the top level the name varjax.rectification is this function, which shadows the
# package; its documented (and canonical) path stays varjax.rectification.rectification.
rectification.__module__ = __name__

__all__ = [
    "CautiousState",
    "RectifyState",
    "ScaleByAdoptState",
    "ScaleByDiffGradState",
    "cautious",
    "rectification",
    "rectify",
    "scale_by_adam_atan2",
    "scale_by_adamp",
    "scale_by_adopt",
    "scale_by_diffgrad",
    "scale_by_grams",
    "scale_by_radam",
]
