"""Variance-reduced momentum: MARS and its relatives.

* :func:`mars_correction` - MARS's scaled gradient correction (Yuan et al., 2024,
  "MARS: Unleashing the Power of Variance Reduction for Training Large Models",
  Algorithm 1), a gradient transform to chain in front of any preconditioner,
  in its approximate (previous batch's gradient) and exact (gradient at the
  previous parameters on the current batch) forms.
* :func:`scale_by_mars` - the correction followed by the paper's AdamW, Lion or
  Shampoo instance; :func:`mars_value_and_grad` computes the two gradients the
  exact form needs.
* :func:`scale_by_storm` / :func:`storm` - STORM's recursive momentum (Cutkosky
  & Orabona, 2019), with the paper's adaptive step size in :func:`storm`.
* :func:`scale_by_qhm` - quasi-hyperbolic momentum (Ma & Yarats, 2019).
* :func:`implicit_gradient_transport` / :func:`igt_eval_params` - IGT (Arnold
  et al., 2019): gradients taken at an extrapolated point, true parameters kept
  in the state.
* :func:`multi_momentum` - one momentum buffer per data cluster (Tondji et al.,
  2021, "Variance Reduction in Deep Learning: More Momentum is All You Need").

Gradients that the update needs besides the current one arrive as Optax extra
arguments: ``previous_grads`` (exact MARS and STORM) and ``cluster``
(multi-momentum). ``optax.chain`` forwards them to every transform.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from varjax import roles
from varjax._base import (
    AdaptiveState,
    PyTree,
    ScalarOrSchedule,
    adam_direction,
    adaptive_step,
    cast_like,
    check_adam_hyperparameters,
    check_integer,
    check_interval,
    check_same_structure,
    clip_to_norm,
    ema,
    init_adaptive_state,
    resolve,
    store_after,
    trainable_leaves_only,
    zero_count,
)
from varjax.roles import Role

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

# The quintic Newton-Schulz coefficients of the official MARS-Shampoo (and of Muon).
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)


def _previous_gradients(
    exact: bool, extra_args: dict[str, Any], stored: PyTree | None, updates: PyTree, who: str
) -> PyTree:
    """The gradient a correction subtracts: supplied (exact) or stored (approximate)."""
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


# --------------------------------------------------------------------------
# MARS
# --------------------------------------------------------------------------


@roles.declare(count=Role.COUNT, previous_grads=Role.EXACT)
class MarsCorrectionState(NamedTuple):
    """State of :func:`mars_correction`; ``previous_grads`` is ``None`` in the exact form."""

    count: jax.Array
    previous_grads: PyTree | None


def mars_correction(
    b1: float = 0.95,
    gamma: ScalarOrSchedule = 0.025,
    *,
    exact: bool = False,
    max_norm: float | None = 1.0,
    norm_scope: Literal["tensor", "global"] = "tensor",
) -> optax.GradientTransformationExtraArgs:
    """MARS's scaled gradient correction, to chain in front of any preconditioner.

    ``c_t = g_t + gamma * b1 / (1 - b1) * (g_t - g_prev)``, then ``c_t`` rescaled
    to norm ``max_norm`` where its norm exceeds it (Yuan et al., 2024, Algorithm
    1). ``b1`` is the momentum decay of the preconditioner that follows; the
    correction only needs it for its scale.

    - Approximate form (``exact=False``, "MARS-approx", the paper's default in
      practice): ``g_prev`` is the previous step's gradient, kept in the state.
    - Exact form (``exact=True``): ``g_prev = grad f(x_{t-1}, xi_t)``, the gradient
      at the previous parameters on the current batch, passed as the extra
      argument ``previous_grads`` (:func:`mars_value_and_grad` computes it).

    On the first step ``g_prev`` is zero in both forms, as in the official
    code. The clip is per tensor (``norm_scope="tensor"``) as in the official
    code and pytorch-optimizer; ``"global"`` takes one norm over the whole tree,
    which is the paper's formula read literally. ``gamma`` may be a schedule
    (the paper's ``gamma_t``). :func:`scale_by_mars` writes the stored gradient
    after its moments, in place in a donated state; chained by hand, the
    correction cannot see the next transform's moments, and XLA may copy the
    old gradient first (on CPU, one extra parameter-sized buffer a step).

    Args:
      b1: the momentum decay of the preconditioner that follows, in [0, 1); it
        only sets the correction's scale ``gamma * b1 / (1 - b1)``.
      gamma: the weight of the correction, >= 0, or a schedule (0.025 as the
        official code; 0: ``c_t = g_t``).
      exact: take ``g_prev`` from the extra argument ``previous_grads``;
        ``False`` (default): the previous step's gradient, kept in the state.
      max_norm: ``c_t`` is rescaled to this norm where its norm exceeds it,
        > 0; ``None``: no clip.
      norm_scope: ``"tensor"`` (default): one norm per leaf; ``"global"``: one
        norm over the tree.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes
      ``previous_grads`` when ``exact=True``.

    Example:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.mars_correction(b1=0.9), optax.lion(1e-4, b1=0.9))
      >>> state = tx.init({"w": jnp.zeros(3)})
    """
    check_interval("b1", b1, 0.0, 1.0, high_closed=False)
    check_interval("gamma", gamma, 0.0)
    check_interval("max_norm", max_norm, 0.0, low_closed=False)
    if norm_scope not in ("tensor", "global"):
        raise ValueError(f"norm_scope must be 'tensor' or 'global', got {norm_scope!r}")

    def init_fn(params: PyTree) -> MarsCorrectionState:
        previous = None if exact else optax.tree.zeros_like(params)
        return MarsCorrectionState(count=zero_count(), previous_grads=previous)

    def update_fn(
        updates: PyTree, state: MarsCorrectionState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, MarsCorrectionState]:
        del params
        if state.previous_grads is not None:
            check_same_structure(updates, state.previous_grads, "optimizer state")
        previous = _previous_gradients(
            exact, extra_args, state.previous_grads, updates, "mars_correction"
        )
        first = state.count == 0
        scale = resolve(gamma, state.count) * b1 / (1 - b1)

        def correct(g: jax.Array, p: jax.Array) -> jax.Array:
            p = jnp.where(first, jnp.zeros_like(g), p.astype(g.dtype))
            return g + scale * (g - p)

        corrected = clip_to_norm(jax.tree.map(correct, updates, previous), max_norm, norm_scope)
        stored = None if exact else cast_like(updates, state.previous_grads)
        new_state = MarsCorrectionState(optax.safe_increment(state.count), stored)
        return cast_like(corrected, updates), new_state

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def newton_schulz(m: jax.Array, steps: int = 5, eps: float = 1e-8) -> jax.Array:
    """Approximate ``U V^T`` of the matrix ``m = U S V^T`` by quintic Newton-Schulz iterations.

    ``X <- a X + b (X X^T) X + c (X X^T)^2 X`` from ``X = m / (|m|_F + eps)``, on
    the wide orientation, with the coefficients of the official MARS-Shampoo
    and of Muon; the singular values land near 1 (roughly in [0.7, 1.2]), not
    exactly on it. Computed in float32 (float64 inputs stay float64).
    """
    steps = check_integer("steps", steps, 0)
    a, b, c = NEWTON_SCHULZ_COEFFS
    x = m.astype(jnp.promote_types(m.dtype, jnp.float32))
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (jnp.linalg.norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).astype(m.dtype)


def _orthogonalize(m: jax.Array, eps: float, ns_steps: int) -> jax.Array:
    """MARS-Shampoo's matrix step: ``newton_schulz(m)`` times sqrt(max(1, rows / cols))."""
    rows, cols = m.shape
    return newton_schulz(m, ns_steps, eps) * math.sqrt(max(1.0, rows / cols))


def _mars_preconditioner(
    kind: str, b1: Any, b2: Any, eps: Any, amsgrad: bool, ns_steps: int
) -> optax.GradientTransformation:
    """The step MARS takes from the corrected gradient: AdamW, Lion or Shampoo."""

    def init_fn(params: PyTree) -> AdaptiveState:
        state = init_adaptive_state(params, amsgrad=amsgrad)
        return state if kind != "lion" else state._replace(nu=None)

    def update_fn(
        updates: PyTree, state: AdaptiveState, params: PyTree | None = None
    ) -> tuple[PyTree, AdaptiveState]:
        del params
        if kind == "lion":
            check_same_structure(updates, state.mu, "optimizer state")
            mu = ema(updates, state.mu, b1)
            out = jax.tree.map(jnp.sign, mu)
            return cast_like(out, updates), state._replace(
                count=optax.safe_increment(state.count), mu=mu
            )
        new_state, mu_hat, nu_hat = adaptive_step(updates, state, b1, b2)
        out = adam_direction(mu_hat, nu_hat, eps)
        if kind == "shampoo":  # the official code uses plain 1 - b1, not 1 - b1^t, here
            out = jax.tree.map(
                lambda o, m: _orthogonalize(m / (1 - b1), eps, ns_steps) if m.ndim == 2 else o,
                out,
                new_state.mu,
            )
        return cast_like(out, updates), new_state

    return trainable_leaves_only(optax.GradientTransformation(init_fn, update_fn))


def scale_by_mars(
    b1: float = 0.95,
    b2: float = 0.99,
    eps: float = 1e-8,
    gamma: ScalarOrSchedule = 0.025,
    *,
    preconditioner: Literal["adamw", "lion", "shampoo"] = "adamw",
    exact: bool = False,
    max_norm: float | None = 1.0,
    norm_scope: Literal["tensor", "global"] = "tensor",
    amsgrad: bool = False,
    ns_steps: int = 5,
) -> optax.GradientTransformationExtraArgs:
    """MARS (Yuan et al., 2024): :func:`mars_correction` followed by one of the paper's
    preconditioners, applied to the corrected gradient ``c_t``
    (``m_t = b1 m + (1 - b1) c_t``).

    - ``"adamw"``: ``m_hat / (sqrt(v_hat) + eps)`` with ``v_t = b2 v + (1 - b2) c_t^2``
      (the official code's second moment is that of ``c_t``, not of ``g_t``).
    - ``"lion"``: ``sign(m_t)``, one momentum (not Lion's two betas; see
      :func:`mars_correction` to put the correction in front of ``optax.lion``).
    - ``"shampoo"``: for matrices, ``U V^T`` of ``m_t / (1 - b1)`` by ``ns_steps``
      quintic Newton-Schulz iterations (coefficients 3.4445, -4.7750, 2.0315,
      as the official code; computed in float32 where the official code uses
      bfloat16), times ``sqrt(max(1, rows / cols))``; other leaves take the
      ``"adamw"`` step.

    Defaults are the official ones (``b1=0.95, b2=0.99, gamma=0.025``).
    ``amsgrad=True`` takes the running maximum after bias correction, as Optax
    does; the official code takes it before.

    Args:
      b1: decay of the momentum of the corrected gradient, in [0, 1).
      b2: decay of the second moment of ``c_t``, in [0, 1) (unused by ``"lion"``).
      eps: added to ``sqrt(v_hat)``, >= 0; also the Newton-Schulz
        normalisation's ``eps``.
      gamma: the weight of the gradient correction, >= 0, or a schedule.
      preconditioner: ``"adamw"`` (default), ``"lion"`` or ``"shampoo"``.
      exact: the exact form, with ``previous_grads`` passed to ``update``;
        ``False`` (default): the approximate form.
      max_norm: ``c_t`` is rescaled to this norm where its norm exceeds it,
        > 0; ``None``: no clip.
      norm_scope: ``"tensor"`` (default): one norm per leaf; ``"global"``: one
        norm over the tree.
      amsgrad: use the running maximum of the bias-corrected second moment.
      ns_steps: Newton-Schulz iterations of ``"shampoo"``, an integer >= 1.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.scale_by_mars(preconditioner="lion"),
      ...                  optax.scale_by_learning_rate(3e-4))
      >>> state = tx.init({"w": jnp.zeros((4, 3))})
    """
    check_adam_hyperparameters(b1, b2, eps)
    if preconditioner not in ("adamw", "lion", "shampoo"):
        raise ValueError(
            f"preconditioner must be 'adamw', 'lion' or 'shampoo', got {preconditioner!r}"
        )
    ns_steps = check_integer("ns_steps", ns_steps, 1)
    chained = optax.chain(
        mars_correction(b1, gamma, exact=exact, max_norm=max_norm, norm_scope=norm_scope),
        _mars_preconditioner(preconditioner, b1, b2, eps, amsgrad, ns_steps),
    )
    if exact:  # no gradient is stored
        return trainable_leaves_only(chained)

    def update_fn(
        updates: PyTree, state: tuple, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, tuple]:
        out, (correction, moments) = chained.update(updates, state, params, **extra_args)
        new_moments = [tree for tree in (moments.mu, moments.nu) if tree is not None]
        stored = store_after(correction.previous_grads, correction.count, *new_moments)
        return out, (correction._replace(previous_grads=stored), moments)

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(chained.init, update_fn))


def mars_value_and_grad(
    loss_fn: Callable[..., jax.Array], *, has_aux: bool = False
) -> Callable[..., tuple[Any, PyTree, PyTree]]:
    """The loss and the two gradients exact MARS (and STORM) needs, in one jitted call.

    Returns ``f(params, previous_params, *args) -> (value, grads, previous_grads)``
    where ``value, grads = value_and_grad(loss_fn)(params, *args)`` and
    ``previous_grads = grad(loss_fn)(previous_params, *args)``: the gradient at
    the previous parameters on the *same* batch. On the first step pass
    ``params`` as ``previous_params`` (the transforms ignore it then).

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs)``, a scalar loss (or
        ``(loss, aux)`` with ``has_aux``) of a pytree of parameters. For a Flax
        NNX model, ``nnx.split`` it and ``nnx.merge`` inside the loss (see the
        Flax NNX page of the docs).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``value`` is then that pair.

    Returns:
      The jitted ``f(params, previous_params, *args, **kwargs)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, varjax
      >>> def loss(p, x, y):
      ...     return jnp.mean((x @ p["w"] - y) ** 2)
      >>> grads_fn = varjax.mars_value_and_grad(loss)
      >>> tx = varjax.mars_adamw(1e-3, exact=True)
      >>> params = {"w": jnp.zeros((3, 2))}
      >>> state, previous = tx.init(params), params
      >>> x, y = jnp.ones((8, 3)), jnp.ones((8, 2))
      >>> for _ in range(3):
      ...     value, grads, previous_grads = grads_fn(params, previous, x, y)
      ...     updates, state = tx.update(grads, state, params, previous_grads=previous_grads)
      ...     previous, params = params, optax.apply_updates(params, updates)
      >>> bool(loss(params, x, y) < 1.0)
      True
    """
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
    grad = jax.grad(loss_fn, has_aux=has_aux)

    @jax.jit
    def both(params: PyTree, previous_params: PyTree, *args: Any, **kwargs: Any):
        value, grads = value_and_grad(params, *args, **kwargs)
        previous = grad(previous_params, *args, **kwargs)
        return value, grads, previous[0] if has_aux else previous

    return both


# --------------------------------------------------------------------------
# STORM
# --------------------------------------------------------------------------


@roles.declare(count=Role.COUNT, direction=Role.SIGNED, previous_grads=Role.EXACT)
class StormState(NamedTuple):
    """State of :func:`scale_by_storm`.

    ``direction`` is ``d_{t-1}``; ``previous_grads`` the stored gradient of the
    approximate form (``None`` in the exact form).
    """

    count: jax.Array
    direction: PyTree
    previous_grads: PyTree | None


@roles.declare(
    count=Role.COUNT,
    direction=Role.SIGNED,
    previous_grads=Role.EXACT,
    squared_norms=Role.EXACT,
    step_size=Role.EXACT,
)
class AdaptiveStormState(NamedTuple):
    """State of :func:`storm`: :class:`StormState`'s fields and the adaptive step's
    running ``sum G_i^2`` (``squared_norms``) and ``eta_{t-1}`` (``step_size``)."""

    count: jax.Array
    direction: PyTree
    previous_grads: PyTree | None
    squared_norms: jax.Array
    step_size: jax.Array


def _storm(
    correction_weight: Callable[[StormState], jax.Array], exact: bool, who: str
) -> tuple[Callable, Callable]:
    """STORM's recursion ``d_t = g_t + (1 - a_t)(d_{t-1} - g_prev)``, ``d_1 = g_1``."""

    def init_fn(params: PyTree) -> StormState:
        return StormState(  # distinct buffers: a train step may donate the state
            count=zero_count(),
            direction=optax.tree.zeros_like(params),
            previous_grads=None if exact else optax.tree.zeros_like(params),
        )

    def direction_fn(
        updates: PyTree, state: StormState | AdaptiveStormState, extra_args: dict
    ) -> PyTree:
        check_same_structure(updates, state.direction, "optimizer state")
        previous = _previous_gradients(exact, extra_args, state.previous_grads, updates, who)
        keep = jnp.where(state.count == 0, 0.0, 1.0 - correction_weight(state))
        return jax.tree.map(
            lambda g, d, p: g + keep.astype(g.dtype) * (d.astype(g.dtype) - p.astype(g.dtype)),
            updates,
            state.direction,
            previous,
        )

    return init_fn, direction_fn


def _stored_gradient(
    updates: PyTree, state: StormState | AdaptiveStormState, direction: PyTree, exact: bool
) -> PyTree | None:
    """The approximate form's next ``g_prev``, written after ``d_t`` (:func:`store_after`)."""
    if exact:
        return None
    return store_after(cast_like(updates, state.previous_grads), state.count, direction)


def scale_by_storm(
    correction: ScalarOrSchedule = 0.1, *, exact: bool = True
) -> optax.GradientTransformationExtraArgs:
    """STORM's recursive momentum (Cutkosky & Orabona, 2019, "Momentum-Based
    Variance Reduction in Non-Convex SGD"), with a fixed or scheduled ``a``.

    ``d_t = g_t + (1 - a)(d_{t-1} - g_prev)`` with ``d_1 = g_1``, where ``g_prev``
    is ``grad f(x_{t-1}, xi_t)`` (``exact=True``, passed as ``previous_grads``)
    or the previous step's gradient (``exact=False``). The approximate form is
    exactly plain SGD: ``d_t - g_t = (1 - a)(d_{t-1} - g_{t-1}) = 0``. MARS
    avoids the collapse with ``gamma < 1`` and an EMA after the correction.
    ``correction`` is ``a``; a schedule is called with the 0-based step count.

    Args:
      correction: ``a``, the weight of the new gradient in the recursion, in
        [0, 1], or a schedule (1: SGD).
      exact: take ``g_prev`` from the extra argument ``previous_grads``
        (default); ``False``: the previous step's gradient, which makes STORM
        plain SGD.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax, varjax
      >>> tx = optax.chain(varjax.scale_by_storm(0.1), optax.scale_by_learning_rate(0.01))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> g = {"w": jnp.ones(3)}
      >>> updates, state = tx.update(g, state, params, previous_grads=g)
    """
    check_interval("correction", correction, 0.0, 1.0)
    init_fn, direction_fn = _storm(
        lambda s: jnp.asarray(resolve(correction, s.count)), exact, "scale_by_storm"
    )

    def update_fn(
        updates: PyTree, state: StormState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, StormState]:
        del params
        direction = direction_fn(updates, state, extra_args)
        new_state = state._replace(
            count=optax.safe_increment(state.count),
            direction=cast_like(direction, state.direction),
            previous_grads=_stored_gradient(updates, state, direction, exact),
        )
        return cast_like(direction, updates), new_state

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def storm(
    k: ScalarOrSchedule = 0.1, w: float = 0.1, c: float = 100.0, *, exact: bool = True
) -> optax.GradientTransformationExtraArgs:
    """STORM with the paper's adaptive step (Cutkosky & Orabona, 2019, Algorithm 1).

    ``eta_t = k / (w + sum_{i<=t} G_i^2)^(1/3)`` with ``G_i`` the global norm of
    the ``i``-th gradient, ``a_{t+1} = c eta_t^2`` and the update
    ``-eta_t d_t`` (the learning rate is built in: use ``k`` to scale it).
    ``a`` is capped at 1 (the paper assumes ``c eta^2 <= 1``). ``w=0.1`` and
    ``c=100`` are the paper's CIFAR-10 settings; tune ``k`` like a learning rate
    (it may be a schedule, called with the 0-based step count).

    Args:
      k: the step-size scale, > 0, or a schedule; tune it like a learning rate.
      w: the offset under the cube root, > 0 (0.1 as the paper's CIFAR-10 runs).
      c: sets ``a_{t+1} = c eta_t^2``, >= 0 (100 as the paper's runs).
      exact: take ``g_prev`` from the extra argument ``previous_grads``
        (default); ``False``: the previous step's gradient.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose updates include the
      step size and sign (apply them directly).

    Example:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.storm(k=0.1)
      >>> params = {"w": jnp.ones(3)}
      >>> g = {"w": jnp.ones(3)}
      >>> updates, state = tx.update(g, tx.init(params), params, previous_grads=g)
    """
    check_interval("k", k, 0.0, low_closed=False)
    check_interval("w", w, 0.0, low_closed=False)
    check_interval("c", c, 0.0)
    storm_init, direction_fn = _storm(
        lambda s: jnp.minimum(1.0, c * s.step_size**2), exact, "storm"
    )

    def init_fn(params: PyTree) -> AdaptiveStormState:
        return AdaptiveStormState(
            *storm_init(params),
            squared_norms=jnp.zeros([], jnp.float32),
            step_size=jnp.zeros([], jnp.float32),
        )

    def update_fn(
        updates: PyTree, state: AdaptiveStormState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, AdaptiveStormState]:
        del params
        direction = direction_fn(updates, state, extra_args)
        squared_norm = optax.global_norm(jax.tree.map(lambda g: g.astype(jnp.float32), updates))
        squared_norms = state.squared_norms + squared_norm**2
        step_size = resolve(k, state.count) / jnp.cbrt(w + squared_norms)
        new_state = AdaptiveStormState(
            count=optax.safe_increment(state.count),
            direction=cast_like(direction, state.direction),
            previous_grads=_stored_gradient(updates, state, direction, exact),
            squared_norms=squared_norms,
            step_size=step_size,
        )
        out = jax.tree.map(lambda d: -step_size.astype(d.dtype) * d, direction)
        return cast_like(out, updates), new_state

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))


# --------------------------------------------------------------------------
# QHM
# --------------------------------------------------------------------------


@roles.declare(momentum=Role.SIGNED)
class QHMState(NamedTuple):
    """State of :func:`scale_by_qhm`: the momentum buffer."""

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

    Example:
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


# --------------------------------------------------------------------------
# IGT
# --------------------------------------------------------------------------


@roles.declare(count=Role.COUNT, true_params=Role.PARAMETERS, inner_state=Role.NESTED)
class IGTState(NamedTuple):
    """State of :func:`implicit_gradient_transport`: the true parameters ``theta_t``."""

    count: jax.Array
    true_params: PyTree
    inner_state: optax.OptState


def anytime_average(count: jax.Array) -> jax.Array:
    """IGT's anytime-average decay ``gamma_t = t / (t + 1)`` at the 0-based step ``t``."""
    t = jnp.asarray(count, jnp.float32)
    return t / (t + 1)


def implicit_gradient_transport(
    inner: optax.GradientTransformation, gamma: float | None = None
) -> optax.GradientTransformationExtraArgs:
    """Implicit gradient transport (Arnold et al., 2019, "Reducing the variance in
    online optimization by transporting past gradients") around a full optimizer.

    ``inner`` maps the gradient to the step on the *true* parameters ``theta``
    (learning rate included) and should average gradients with decay ``gamma``,
    as ``igt`` does. The parameters the caller holds, where gradients are taken,
    are the extrapolated point
    ``theta_t + gamma / (1 - gamma) * (theta_t - theta_{t-1})``, so that old
    gradients in the average are transported to the current iterate. With
    ``gamma=None`` the decay is the anytime average ``t / (t + 1)`` (extrapolation
    by ``t``); a float gives Heavyball-IGT. Read ``theta`` for evaluation with
    :func:`igt_eval_params`, as with ``optax.contrib.schedule_free``.

    Args:
      inner: the full optimizer for the true parameters, learning rate
        included, that averages gradients with decay ``gamma``; extra
        arguments of ``update`` are forwarded to it.
      gamma: the decay, in [0, 1), that sets the extrapolation
        ``gamma / (1 - gamma)``; ``None`` (default): the anytime average
        ``t / (t + 1)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``params`` (the extrapolated point the caller holds).

    Example:
      >>> import jax.numpy as jnp, optax, varjax
      >>> gamma = 0.9
      >>> inner = optax.chain(varjax.multi_ema((gamma,), (1.0,), (False,)),
      ...                     optax.scale_by_learning_rate(0.1))
      >>> tx = varjax.implicit_gradient_transport(inner, gamma)
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)
      >>> theta = varjax.igt_eval_params(state)
    """
    if gamma is not None:
        check_interval("gamma", gamma, 0.0, 1.0, high_closed=False)
    inner = optax.with_extra_args_support(inner)

    def extrapolation(count: jax.Array) -> jax.Array:
        if gamma is None:
            return jnp.asarray(count, jnp.float32)  # t / (t+1) / (1 / (t+1))
        return jnp.asarray(gamma / (1 - gamma), jnp.float32)

    def init_fn(params: PyTree) -> IGTState:
        # a copy, not the caller's buffers: a train step may donate params and state together
        true_params = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
        return IGTState(zero_count(), true_params, inner.init(params))

    def update_fn(
        updates: PyTree, state: IGTState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, IGTState]:
        if params is None:
            raise ValueError("implicit_gradient_transport needs params in update()")
        check_same_structure(updates, state.true_params, "optimizer state")
        step, inner_state = inner.update(
            updates, state.inner_state, state.true_params, **extra_args
        )
        theta = state.true_params
        new_theta = optax.apply_updates(theta, step)
        count = optax.safe_increment(state.count)
        s = extrapolation(count)
        query = jax.tree.map(
            lambda new, old: new + (s * (new.astype(jnp.float32) - old)).astype(new.dtype),
            new_theta,
            theta,
        )
        out = jax.tree.map(lambda q, p: (q - p).astype(p.dtype), query, params)
        return out, IGTState(count, cast_like(new_theta, theta), inner_state)

    return trainable_leaves_only(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def igt_eval_params(state: optax.OptState) -> PyTree:
    """The true parameters ``theta_t`` kept by :func:`implicit_gradient_transport` in ``state``
    (found anywhere inside chains, ``inject_hyperparams`` or other wrappers).

    Args:
      state: an optimizer state holding exactly one :class:`IGTState`, e.g.
        ``igt(...).init(params)`` after some updates, or the pure state of a
        ``flax.nnx.Optimizer`` (``nnx.as_pure(optimizer.opt_state)``).

    Returns:
      The true parameters, a pytree like the parameters.

    Example:
      >>> import jax.numpy as jnp, varjax
      >>> tx = varjax.igt(0.1)
      >>> params = {"w": jnp.ones(2)}
      >>> updates, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> varjax.igt_eval_params(state)["w"]  # theta = 1 - 0.1 g
      Array([0.9, 0.9], dtype=float32)
    """
    found = [
        leaf
        for leaf in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, IGTState))
        if isinstance(leaf, IGTState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one IGT state in the optimizer state, found {len(found)}")
    return found[0].true_params


# --------------------------------------------------------------------------
# Multi-momentum over data clusters
# --------------------------------------------------------------------------


@roles.declare(momenta=Role.SIGNED)
class MultiMomentumState(NamedTuple):
    """State of :func:`multi_momentum`: one momentum per cluster, stacked on a leading axis."""

    momenta: PyTree


def multi_momentum(
    num_clusters: int,
    decay: float = 0.9,
    nu: float = 1.0,
    weights: Sequence[float] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """One momentum buffer per data cluster (Tondji et al., 2021, "Variance Reduction in
    Deep Learning: More Momentum is All You Need").

    The batch's cluster id ``k`` arrives as the extra argument ``cluster`` (an
    int, traced or not). Only buffer ``k`` takes the gradient,
    ``m_k = decay m_k + (1 - decay) g``; the step is built from all buffers,
    ``(1 - nu) g + nu * sum_j w_j m_j`` (``w`` uniform unless ``weights`` is
    given, e.g. the clusters' data fractions). ``nu=1`` is SGD with momentum
    over clusters, ``nu < 1`` QHM; inside :func:`implicit_gradient_transport`
    (with ``gamma=decay``) it is the paper's IGT combination.

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

    Example:
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
