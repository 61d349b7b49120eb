"""Shared pieces of every varjax transform: validation, schedules, moments.

Each formula used by more than one method lives here once: the exponential
moving averages of the gradient and of its square, Adam's bias correction, the
AMSGrad running maximum, and the checks that turn bad hyper-parameters and
mismatched trees into clear errors.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varjax import roles
from varjax.roles import Role

Array = jax.Array
PyTree = Any
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]

__all__ = [
    "AdaptiveState",
    "ShapeWitness",
    "abs_squared",
    "adam_direction",
    "adaptive_step",
    "bias_correct",
    "cast_like",
    "check_adam_hyperparameters",
    "check_integer",
    "check_interval",
    "check_same_structure",
    "clip_to_norm",
    "ema",
    "ema_squared",
    "global_norm",
    "init_adaptive_state",
    "is_trainable",
    "nesterov_momentum",
    "one_minus_power",
    "resolve",
    "scalar_float",
    "shape_witness",
    "store_after",
    "trainable_leaves_only",
    "without_params_if_no_decay",
    "witness_shapes",
    "zero_count",
]


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _concrete_float(value: Any) -> float | None:
    """The value as a Python float, or None where it is a schedule or traced.

    `optax.inject_hyperparams` hands hyper-parameters to the factory as arrays,
    sometimes inside `jit`; those are checked when they are concrete and
    skipped when they are tracers.
    """
    if callable(value) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check_interval(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_closed: bool = True,
    high_closed: bool = True,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in the interval.

    Schedules (callables) and traced values are not checked here.

    Examples:
      >>> check_interval("b1", 0.9, 0.0, 1.0, high_closed=False)
      >>> check_interval("b1", 1.0, 0.0, 1.0, high_closed=False)
      Traceback (most recent call last):
      ...
      ValueError: b1 must be in [0.0, 1.0), got 1.0
    """
    number = _concrete_float(value)
    if number is None:
        return
    above = number >= low if low_closed else number > low
    below = number <= high if high_closed else number < high
    if not (above and below and not math.isnan(number)):
        left = "[" if low_closed else "("
        right = "]" if high_closed else ")"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")


def check_integer(
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    *,
    allow_none: bool = False,
) -> int | None:
    """``value`` as a Python ``int``; ``ValueError`` naming ``name`` unless it is an
    integer in ``[low, high]``.

    Python and NumPy integers, integral floats (``1e4``) and concrete integer
    arrays of shape ``()`` (``optax.inject_hyperparams`` hands numbers over as
    arrays) are integers; ``2.5``, ``True`` and ``False`` are not. ``None`` is
    returned as it is when ``allow_none``. A traced value (inside ``jit``)
    cannot be checked and is returned as it is; sizes that shape the state must
    then be ``static_args`` of ``inject_hyperparams``.

    Examples:
      >>> check_integer("window", np.int64(8), 1)
      8
      >>> check_integer("window", 2.5, 1)
      Traceback (most recent call last):
      ...
      ValueError: window must be an integer >= 1, got 2.5
    """
    bounds = (
        f" >= {low}"
        if high is None and low is not None
        else f" in [{low}, {high}]"
        if low is not None
        else f" <= {high}"
        if high is not None
        else ""
    )
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be an integer{bounds}, got None")
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (bool, np.bool_)) or (
        hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.bool_)
    ):
        raise ValueError(f"{name} must be an integer{bounds}, got {value!r}")
    integral = False
    if isinstance(value, numbers.Real) or hasattr(value, "dtype"):
        try:
            number = float(value)
            integral = math.isfinite(number) and number == int(number)
        except (TypeError, ValueError, OverflowError):
            integral = False
    if not integral or np.ndim(value) != 0:
        raise ValueError(f"{name} must be an integer{bounds}, got {value!r}")
    integer = int(number)
    if (low is not None and integer < low) or (high is not None and integer > high):
        raise ValueError(f"{name} must be an integer{bounds}, got {value!r}")
    return integer


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _unwrap_leaves(treedef: Any, reference: PyTree) -> list | None:
    """The leaves of ``reference`` at the leaf positions of ``treedef``, where each
    holds exactly one leaf (or is a MaskedNode); ``None`` where it does not."""
    try:
        pieces = treedef.flatten_up_to(reference)
    except (ValueError, TypeError):
        return None
    leaves = []
    for piece in pieces:
        inner = jax.tree.leaves(piece, is_leaf=_is_masked)
        if len(inner) != 1:
            return None
        leaves.append(inner[0])
    return leaves


def check_same_structure(
    updates: PyTree, reference: PyTree, what: str, *, shapes: bool = True
) -> None:
    """Raise ``ValueError`` unless ``updates`` has the tree structure and shapes of ``reference``.

    The message names the first leaf that is missing, extra or of another
    shape. An ``optax.MaskedNode`` in either tree (a leaf that a transform
    holds no state for, see ``trainable_leaves_only``) stands for one leaf
    of any shape; ``shapes=False`` checks the tree only. Runs at trace time
    only (structures and shapes are static), so it costs nothing inside `jit`.

    Examples:
      >>> check_same_structure({"a": jnp.ones(2)}, {"a": jnp.ones(2), "b": jnp.ones(1)}, "state")
      Traceback (most recent call last):
      ...
      ValueError: the gradient tree does not match the state: it has no leaf ['b'] ...
    """
    got_leaves, got = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_masked)
    want_leaves, want = jax.tree_util.tree_flatten_with_path(reference, is_leaf=_is_masked)
    if got != want:
        # the reference may wrap each leaf in a node of its own (a Flax NNX
        # ``Param`` around an array, where the gradients are plain arrays)
        wrapped = _unwrap_leaves(got, reference)
        if wrapped is not None:
            pairs = zip(got_leaves, wrapped, strict=True)
            want_leaves, want = [(path, x) for (path, _), x in pairs], got
    if got != want:
        got_paths = {jax.tree_util.keystr(path) for path, _ in got_leaves}
        want_paths = {jax.tree_util.keystr(path) for path, _ in want_leaves}
        missing = sorted(want_paths - got_paths)
        extra = sorted(got_paths - want_paths)
        if missing:
            problem = f"it has no leaf {missing[0]}"
        elif extra:
            problem = f"it has a leaf {extra[0]} that the {what} does not have"
        else:
            problem = "its nodes are of other types"
        raise ValueError(
            f"the gradient tree does not match the {what}: {problem} ({len(missing)} missing, "
            f"{len(extra)} extra); gradients have structure {got}, the {what} has structure {want}"
        )
    for (path, leaf), (_, ref) in zip(got_leaves, want_leaves, strict=True):
        if not shapes or _is_masked(leaf) or _is_masked(ref):
            continue
        if jnp.shape(leaf) != jnp.shape(ref):
            raise ValueError(
                f"the gradient tree does not match the {what}: the leaf at "
                f"{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}, "
                f"the {what} has shape {jnp.shape(ref)}"
            )


# --------------------------------------------------------------------------
# Schedules and dtypes
# --------------------------------------------------------------------------


def resolve(value: ScalarOrSchedule, count: Array) -> Array | float:
    """The value of a scalar-or-schedule hyper-parameter at step ``count``."""
    return value(count) if callable(value) else value


def cast_like(tree: PyTree, reference: PyTree) -> PyTree:
    """Cast every leaf of ``tree`` to the dtype of the matching leaf of ``reference``."""
    return jax.tree.map(lambda x, ref: jnp.asarray(x).astype(jnp.result_type(ref)), tree, reference)


# --------------------------------------------------------------------------
# Moments
# --------------------------------------------------------------------------


def ema(updates: PyTree, moments: PyTree, decay: Any) -> PyTree:
    """``decay * m + (1 - decay) * g`` leaf by leaf, kept in each moment's dtype."""
    return jax.tree.map(
        lambda g, m: ((1 - decay) * g + decay * m).astype(m.dtype), updates, moments
    )


def abs_squared(g: Array) -> Array:
    """``|g|^2`` element-wise, real for complex ``g``."""
    return jnp.square(g) if jnp.isrealobj(g) else jnp.square(jnp.abs(g))


def ema_squared(updates: PyTree, moments: PyTree, decay: Any) -> PyTree:
    """``decay * v + (1 - decay) * |g|^2`` leaf by leaf, kept in each moment's dtype."""
    return jax.tree.map(
        lambda g, v: ((1 - decay) * abs_squared(g) + decay * v).astype(v.dtype),
        updates,
        moments,
    )


def scalar_float(value: Any) -> Array:
    """A scalar in JAX's default float: float32, or float64 under ``jax_enable_x64``."""
    return jnp.asarray(value, jnp.result_type(float))


def signal_to_noise(signal: Array, variance: Array) -> Array:
    """``signal / variance`` where the variance is positive; ``inf`` where it is
    zero and the signal positive, 0 where both vanish (no NaN, no warning).

    Examples:
      >>> signal_to_noise(jnp.asarray([4.0, 1.0, 0.0]), jnp.asarray([2.0, 0.0, 0.0])).tolist()
      [2.0, inf, 0.0]
    """
    noisy = variance > 0
    ratio = jnp.where(noisy, signal / jnp.where(noisy, variance, 1.0), 0.0)
    return jnp.where(~noisy & (signal > 0), jnp.inf, ratio)


def one_minus_power(decay: Any, count: Array) -> Array:
    """``1 - decay**count`` without cancellation, as ``-expm1(count * log(decay))``.

    With ``decay`` a Python float its logarithm is taken on the host in float64;
    ``1 - 0.999**1`` computed directly in float32 is off by about 1e-5 relative.
    """
    t = scalar_float(count)
    if isinstance(decay, (int, float)):
        if decay == 0:
            return jnp.ones_like(t)
        return -jnp.expm1(t * math.log(decay))
    return -jnp.expm1(t * jnp.log(scalar_float(decay)))


def bias_correct(moments: PyTree, decay: Any, count: Array) -> PyTree:
    """Adam's bias correction ``m / (1 - decay**count)``.

    The correction is computed in float32 or wider by ``one_minus_power``
    (in bfloat16 it would round to zero for small counts) and the division happens
    in each moment's dtype.
    """
    correction = one_minus_power(decay, count)
    return jax.tree.map(lambda m: m / correction.astype(m.dtype), moments)


def store_after(values: PyTree, count: Array, *later: PyTree) -> PyTree:
    """``values`` (a gradient to keep in the state), computed after the trees ``later``.

    A transform that keeps the previous gradient reads it to build the new
    moments and replaces it by the current one. When the train step donates
    the state, the replacement goes into the old gradient's buffer, and XLA
    (on CPU, jax 0.10) first copies the old gradient to a fresh buffer, whose
    page faults cost more than the step itself: MARS-AdamW took 2.6x
    ``optax.adamw`` instead of 1.5x at 18.5M parameters. Each stored leaf is
    therefore a select between the gradient and the matching leaves of
    ``later`` (the new moments) on ``count >= 0``: always the gradient, since
    counts never go negative, but XLA cannot fold it, so the moments (which read
    the old gradient) are computed first and the store is written in place.
    """

    def select(value: Array, *deps: Array) -> Array:
        dependency = functools.reduce(jnp.add, [d.astype(value.dtype) for d in deps])
        return jnp.where(count >= 0, value, dependency)

    return jax.tree.map(select, values, *later)


def zero_count() -> Array:
    """A fresh step counter: an int32 scalar, as in Optax."""
    return jnp.zeros([], jnp.int32)


@roles.declare(count=Role.COUNT, mu=Role.SIGNED, nu=Role.NON_NEGATIVE, nu_max=Role.NON_NEGATIVE)
class AdaptiveState(NamedTuple):
    """State of an Adam-like block: step count and the gradient's moments.

    ``nu_max`` is the AMSGrad running maximum of the bias-corrected second
    moment, or ``None`` when the max correction is off.
    """

    count: Array
    mu: PyTree
    nu: PyTree
    nu_max: PyTree | None


def init_adaptive_state(
    params: PyTree, *, amsgrad: bool = False, mu_dtype: Any = None
) -> AdaptiveState:
    """Zero moments shaped like ``params`` (``mu`` in ``mu_dtype`` when given)."""
    return AdaptiveState(
        count=zero_count(),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
        nu_max=optax.tree.zeros_like(params) if amsgrad else None,
    )


def adaptive_step(
    updates: PyTree, state: AdaptiveState, b1: Any, b2: Any
) -> tuple[AdaptiveState, PyTree, PyTree]:
    """One Adam moment step: the new state plus bias-corrected ``mu_hat`` and ``nu_hat``.

    When ``state.nu_max`` is present, ``nu_hat`` is the running maximum of the
    bias-corrected second moment: the AMSGrad correction (Reddi et al., 2018,
    "On the Convergence of Adam and Beyond"), taken after bias correction as
    Optax's ``scale_by_amsgrad`` does.
    """
    check_same_structure(updates, state.mu, "optimizer state")
    count = optax.safe_increment(state.count)
    mu = ema(updates, state.mu, b1)
    nu = ema_squared(updates, state.nu, b2)
    mu_hat = bias_correct(mu, b1, count)
    nu_hat = bias_correct(nu, b2, count)
    nu_max = state.nu_max
    if nu_max is not None:
        nu_max = jax.tree.map(jnp.maximum, nu_max, nu_hat)
        nu_hat = nu_max
    return AdaptiveState(count=count, mu=mu, nu=nu, nu_max=nu_max), mu_hat, nu_hat


def adam_direction(mu_hat: PyTree, nu_hat: PyTree, eps: Any, eps_root: Any = 0.0) -> PyTree:
    """Adam's step ``mu_hat / (sqrt(nu_hat + eps_root) + eps)`` leaf by leaf.

    Examples:
      >>> adam_direction(jnp.asarray(3.0), jnp.asarray(4.0), 0.0, eps_root=5.0).item()
      1.0
    """
    if isinstance(eps_root, (int, float)) and eps_root == 0:
        return jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    return jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)


def nesterov_momentum(mu: PyTree, updates: PyTree, b1: Any, count: Array) -> PyTree:
    """Nesterov's bias-corrected first moment at step ``count`` (1 on the first step).

    ``b1 * mu / (1 - b1**(count + 1)) + (1 - b1) * g / (1 - b1**count)``, with
    ``mu`` the first moment *after* this step's update: Dozat's (2016) NAdam, and
    exactly the convention of ``optax.scale_by_adam(nesterov=True)`` (and so of
    ``optax.nadam``, ``optax.radam(nesterov=True)``). Every varjax transform
    with ``nesterov=True`` takes its momentum from here.

    Examples:
      >>> m = nesterov_momentum(jnp.asarray(0.1), jnp.asarray(1.0), 0.9, jnp.asarray(1))
      >>> round(float(m), 4)  # 0.9 * 0.1 / 0.19 + 0.1 * 1 / 0.1
      1.4737
    """
    next_mu_hat = bias_correct(mu, b1, optax.safe_increment(count))
    grad_hat = bias_correct(updates, b1, count)
    return jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, next_mu_hat, grad_hat)


def global_norm(tree: PyTree) -> Array:
    """The norm of the whole tree, in float32 at least (float64 stays)."""
    return optax.global_norm(
        jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)
    )


@jax.tree_util.register_pytree_node_class
class ShapeWitness:
    """The tree structure, shapes and dtypes of the parameters, held as static data.

    A pytree node with no leaves: it costs no bytes, passes through ``jit``,
    ``optax.MultiSteps`` and Orbax (which saves nothing for it and rebuilds it
    from the restore target), and lets a state that keeps nothing else shaped
    like the parameters check the gradient tree against them
    (``check_same_structure`` of the gradients and ``shapes``). A leaf
    without state (``optax.MaskedNode()``) is kept as one.
    """

    def __init__(self, treedef: Any, leaves: tuple[tuple[tuple[int, ...], str] | None, ...]):
        self.treedef = treedef
        self.leaves = leaves

    @classmethod
    def of(cls, params: PyTree) -> ShapeWitness:
        leaves, treedef = jax.tree.flatten(params, is_leaf=_is_masked)
        described = tuple(
            None if _is_masked(x) else (tuple(jnp.shape(x)), str(jnp.result_type(x)))
            for x in leaves
        )
        return cls(treedef, described)

    def shapes(self) -> PyTree:
        """The parameters' tree with a ``jax.ShapeDtypeStruct`` per leaf."""
        return self.treedef.unflatten(
            [optax.MaskedNode() if x is None else jax.ShapeDtypeStruct(*x) for x in self.leaves]
        )

    def tree_flatten(self) -> tuple[tuple[()], tuple[Any, tuple]]:
        return (), (self.treedef, self.leaves)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, tuple], children: tuple[()]) -> ShapeWitness:
        del children
        return cls(*aux)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ShapeWitness)
            and self.treedef == other.treedef
            and self.leaves == other.leaves
        )

    def __hash__(self) -> int:
        return hash((self.treedef, self.leaves))

    def __repr__(self) -> str:
        return f"ShapeWitness({self.treedef})"


def shape_witness(params: PyTree) -> ShapeWitness:
    """A ``ShapeWitness`` of ``params``: their tree and shapes, in no bytes."""
    return ShapeWitness.of(params)


def witness_shapes(witness: ShapeWitness) -> PyTree:
    """The shapes a ``shape_witness`` stands for, as ``jax.ShapeDtypeStruct`` leaves."""
    return witness.shapes()


def clip_to_norm(
    tree: PyTree,
    max_norm: Any,
    scope: str = "global",
    *,
    non_finite: str = "pass",
    norm: Array | None = None,
) -> PyTree:
    """Rescale ``tree`` to norm ``max_norm`` where its norm exceeds it.

    The norm is taken over the whole tree (``scope="global"``) or per leaf
    (``"tensor"``), in float32 at least (float64 stays); each leaf keeps its
    dtype. Where a norm is not finite, ``non_finite="pass"`` leaves the values
    to the arithmetic (a NaN norm passes them unchanged, an infinite one
    zeroes the finite entries), ``"zero"`` returns zeros. ``max_norm=None``
    returns ``tree`` unchanged. ``norm``: the global norm of ``tree``, when the
    caller has it already (``scope="global"`` only).

    Examples:
      >>> clip_to_norm({"a": jnp.asarray([3.0, 4.0])}, 1.0)["a"].tolist()
      [0.6000000238418579, 0.800000011920929]
    """
    if max_norm is None:
        return tree
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope must be 'global' or 'tensor', got {scope!r}")

    def wide(x: Array) -> Array:
        return x.astype(jnp.promote_types(x.dtype, jnp.float32))

    def rescale(x: Array, norm: Array) -> Array:
        factor = jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)
        out = wide(x) * factor
        if non_finite == "zero":
            out = jnp.where(jnp.isfinite(norm), out, 0.0)
        return out.astype(x.dtype)

    if scope == "global":
        if norm is None:
            norm = global_norm(tree)
        return jax.tree.map(lambda x: rescale(x, norm), tree)
    return jax.tree.map(lambda x: rescale(x, jnp.linalg.norm(wide(x))), tree)


def check_adam_hyperparameters(b1: Any, b2: Any, eps: Any) -> None:
    """Validate the hyper-parameters every Adam-like block shares."""
    check_interval("b1", b1, 0.0, 1.0, high_closed=False)
    check_interval("b2", b2, 0.0, 1.0, high_closed=False)
    check_interval("eps", eps, 0.0)


# --------------------------------------------------------------------------
# Integer and boolean parameter leaves
# --------------------------------------------------------------------------


def is_trainable(leaf: Any) -> bool:
    """Whether an optimizer steps this leaf: a floating or complex array.

    Integer and boolean leaves (step counters, masks, embedding indices kept
    among the parameters) get a zero update of their own dtype and no state.
    """
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _trainable_part(tree: PyTree, dtypes_from: PyTree) -> PyTree:
    """``tree`` with ``optax.MaskedNode()`` where the leaf of ``dtypes_from`` is not trainable."""
    return jax.tree.map(
        lambda x, ref: x if is_trainable(ref) else optax.MaskedNode(), tree, dtypes_from
    )


def trainable_leaves_only(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` on the floating (and complex) leaves; zero updates for the others.

    Integer and boolean leaves of the parameters are not handed to ``inner``:
    its state holds ``optax.MaskedNode()`` in their place (no bytes), and their
    update is ``zeros_like(param)`` of the parameter's own dtype, so that
    ``optax.apply_updates`` leaves them exactly as they are. Which leaves are
    trainable is read from the parameters' dtypes (from the gradients' when
    ``update`` gets ``params=None``). On a tree of floating leaves only, this
    is ``inner`` itself: the same state, the same updates. Every varjax
    optimizer and building block is wrapped in it; wrap a hand-made chain that
    ends in an Optax transform the same way (an Optax transform multiplies an
    integer leaf by a float).

    Args:
      inner: any transform.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` forwarding extra arguments
      to ``inner``.
    """
    inner = optax.with_extra_args_support(inner)

    def all_trainable(tree: PyTree) -> bool:
        return all(is_trainable(leaf) for leaf in jax.tree.leaves(tree))

    def init_fn(params: PyTree) -> optax.OptState:
        if all_trainable(params):
            return inner.init(params)
        return inner.init(_trainable_part(params, params))

    def update_fn(
        updates: PyTree, state: optax.OptState, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, optax.OptState]:
        dtypes_from = updates if params is None else params
        if all_trainable(dtypes_from):
            return inner.update(updates, state, params, **extra_args)
        if params is not None:
            check_same_structure(updates, params, "parameters")
        masked_params = None if params is None else _trainable_part(params, params)
        structure = jax.tree.structure(dtypes_from)
        extra_args = {  # gradients passed beside the updates lose the same leaves
            name: _trainable_part(value, dtypes_from)
            if jax.tree.structure(value) == structure
            else value
            for name, value in extra_args.items()
        }
        out, state = inner.update(
            _trainable_part(updates, dtypes_from), state, masked_params, **extra_args
        )
        out = jax.tree.map(
            lambda u, ref: jnp.zeros_like(ref) if _is_masked(u) and not _is_masked(ref) else u,
            out,
            dtypes_from,
            is_leaf=_is_masked,
        )
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def without_params_if_no_decay(
    tx: optax.GradientTransformation, weight_decay: Any
) -> optax.GradientTransformation:
    """``tx`` (a weight decay such as ``optax.add_decayed_weights``), passing the updates
    through when ``update`` gets ``params=None`` and ``weight_decay`` is a known zero.

    Optax's own ``add_decayed_weights`` asks for ``params`` even at zero decay;
    a varjax optimizer without weight decay accepts ``params=None``, as
    ``optax.adam`` does. A schedule or a traced decay still needs ``params``.
    """
    known_zero = not callable(weight_decay) and _concrete_float(weight_decay) == 0.0

    def update_fn(
        updates: PyTree, state: optax.OptState, params: PyTree | None = None
    ) -> tuple[PyTree, optax.OptState]:
        if params is None and known_zero:
            return updates, state
        return tx.update(updates, state, params)

    return optax.GradientTransformation(tx.init, update_fn)
