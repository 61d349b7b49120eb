"""MARS (Yuan et al., 2024): the scaled gradient correction and its preconditioners."""

from __future__ import annotations

import math
from collections.abc import Callable
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
from varjax.variance_reduction._common import previous_gradients

# The quintic Newton-Schulz coefficients of the official MARS-Shampoo (and of Muon).
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)

# --------------------------------------------------------------------------
# MARS
# --------------------------------------------------------------------------


@roles.declare(count=Role.COUNT, previous_grads=Role.EXACT)
class MarsCorrectionState(NamedTuple):
    """State of [`mars_correction`][varjax.mars_correction]; ``previous_grads`` is ``None`` in the
    exact form."""

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
      argument ``previous_grads`` ([`mars_value_and_grad`][varjax.mars_value_and_grad] computes it).

    On the first step ``g_prev`` is zero in both forms, as in the official
    code. The clip is per tensor (``norm_scope="tensor"``) as in the official
    code and pytorch-optimizer; ``"global"`` takes one norm over the whole tree,
    which is the paper's formula read literally. ``gamma`` may be a schedule
    (the paper's ``gamma_t``). [`scale_by_mars`][varjax.scale_by_mars] writes the stored gradient
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
      max_norm: ``c_t`` is rescaled to this norm where its norm exceeds
        it, > 0; ``None``: no clip.
      norm_scope: ``"tensor"`` (default): one norm per leaf; ``"global"``: one
        norm over the tree.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes
      ``previous_grads`` when ``exact=True``.

    Examples:
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
        previous = previous_gradients(
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
    """MARS (Yuan et al., 2024): [`mars_correction`][varjax.mars_correction] followed by one of the
    paper's preconditioners, applied to the corrected gradient ``c_t`` (``m_t = b1 m + (1 - b1)
    c_t``).

    - ``"adamw"``: ``m_hat / (sqrt(v_hat) + eps)`` with ``v_t = b2 v + (1 - b2) c_t^2``
      (the official code's second moment is that of ``c_t``, not of ``g_t``).
    - ``"lion"``: ``sign(m_t)``, one momentum (not Lion's two betas; see
      [`mars_correction`][varjax.mars_correction] to put the correction in front of ``optax.lion``).
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
      max_norm: ``c_t`` is rescaled to this norm where its norm exceeds
        it, > 0; ``None``: no clip.
      norm_scope: ``"tensor"`` (default): one norm per leaf; ``"global"``: one
        norm over the tree.
      amsgrad: use the running maximum of the bias-corrected second moment.
      ns_steps: Newton-Schulz iterations of ``"shampoo"``, an integer >= 1.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
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

    Examples:
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
