"""Variance-reduced momentum: MARS and its relatives.

* [`mars_correction`][varjax.mars_correction] - MARS's scaled gradient correction (Yuan et al.,
  2024, "MARS: Unleashing the Power of Variance Reduction for Training Large Models", Algorithm 1),
  a gradient transform to chain in front of any preconditioner, in its approximate (previous batch's
  gradient) and exact (gradient at the previous parameters on the current batch) forms.
* [`scale_by_mars`][varjax.scale_by_mars] - the correction followed by the paper's AdamW, Lion or
  Shampoo instance; [`mars_value_and_grad`][varjax.mars_value_and_grad] computes the two gradients
  the exact form needs.
* [`scale_by_storm`][varjax.scale_by_storm] / [`storm`][varjax.storm] - STORM's recursive momentum
  (Cutkosky & Orabona, 2019), with the paper's adaptive step size in [`storm`][varjax.storm].
* [`scale_by_qhm`][varjax.scale_by_qhm] - quasi-hyperbolic momentum (Ma & Yarats, 2019).
* [`implicit_gradient_transport`][varjax.implicit_gradient_transport] /
  [`igt_eval_params`][varjax.igt_eval_params] - IGT (Arnold et al., 2019): gradients taken at an
  extrapolated point, true parameters kept in the state.
* [`multi_momentum`][varjax.multi_momentum] - one momentum buffer per data cluster (Tondji et al.,
  2021, "Variance Reduction in Deep Learning: More Momentum is All You Need").

Gradients that the update needs besides the current one arrive as Optax extra
arguments: ``previous_grads`` (exact MARS and STORM) and ``cluster``
(multi-momentum). ``optax.chain`` forwards them to every transform.

Each method lives in a module of its own (``mars``, ``recursive_momentum``,
``quasi_hyperbolic``, ``gradient_transport``, ``cluster_momentum``); every name
is imported here, so ``varjax.variance_reduction.scale_by_mars`` and the rest
work as before.

Examples:
  >>> import jax.numpy as jnp, optax, varjax
  >>> tx = optax.chain(varjax.variance_reduction.mars_correction(b1=0.9), optax.sgd(0.1))
  >>> updates, state = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
  >>> [round(u, 4) for u in updates["w"].tolist()]  # the corrected gradient, clipped to norm 1
  [-0.0707, -0.0707]
"""

from varjax.variance_reduction.cluster_momentum import MultiMomentumState, multi_momentum
from varjax.variance_reduction.gradient_transport import (
    IGTState,
    igt_eval_params,
    implicit_gradient_transport,
)
from varjax.variance_reduction.gradient_transport import (
    anytime_average as anytime_average,  # for varjax.igt
)
from varjax.variance_reduction.mars import (
    NEWTON_SCHULZ_COEFFS as NEWTON_SCHULZ_COEFFS,
)
from varjax.variance_reduction.mars import (
    MarsCorrectionState,
    mars_correction,
    mars_value_and_grad,
    newton_schulz,
    scale_by_mars,
)
from varjax.variance_reduction.quasi_hyperbolic import QHMState, scale_by_qhm
from varjax.variance_reduction.recursive_momentum import (
    AdaptiveStormState,
    StormState,
    scale_by_storm,
    storm,
)

__all__ = [
    "AdaptiveStormState",
    "IGTState",
    "MarsCorrectionState",
    "MultiMomentumState",
    "QHMState",
    "StormState",
    "igt_eval_params",
    "implicit_gradient_transport",
    "mars_correction",
    "mars_value_and_grad",
    "multi_momentum",
    "newton_schulz",
    "scale_by_mars",
    "scale_by_qhm",
    "scale_by_storm",
    "storm",
]
