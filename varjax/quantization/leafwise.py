"""An elementwise update split into one program per parameter leaf.

Adam, Lion, AdEMAMix and most optimizers update each element of each leaf from
the same element of the gradient, the parameters and the state, with scalars
(the step count, a schedule's value) shared by every leaf. `split` finds that
structure in the traced update: it returns the equations that compute scalars,
and the other equations grouped by the leaf they belong to, each group
elementwise over one shape. `evaluate_group` then runs one group on any slice of
its leaf (a block of rows), so that [`quantize_state`][varjax.quantize_state]
can process a leaf a chunk at a time instead of holding its full-precision
moments whole.

An update that is not elementwise (a global-norm clip, Adafactor's factored
moments, a matrix orthogonalisation, random draws) gives ``None``, and its
caller keeps the whole-array path.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np

# Primitives that act on each element alone (n-ary ones on operands of one shape or
# on scalars): a group of them computes any slice of its leaf from the same slice
# of its inputs.
ELEMENTWISE = frozenset(
    {
        "abs",
        "acos",
        "acosh",
        "add",
        "and",
        "asin",
        "asinh",
        "atan",
        "atan2",
        "atanh",
        "cbrt",
        "ceil",
        "clamp",
        "conj",
        "convert_element_type",
        "copy",
        "copy_p",
        "cos",
        "cosh",
        "digamma",
        "div",
        "eq",
        "erf",
        "erf_inv",
        "erfc",
        "exp",
        "exp2",
        "expm1",
        "floor",
        "ge",
        "gt",
        "imag",
        "integer_pow",
        "is_finite",
        "le",
        "lgamma",
        "log",
        "log1p",
        "logistic",
        "lt",
        "max",
        "min",
        "mul",
        "ne",
        "neg",
        "nextafter",
        "not",
        "or",
        "pow",
        "real",
        "reduce_precision",
        "rem",
        "round",
        "rsqrt",
        "select_n",
        "shift_left",
        "shift_right_arithmetic",
        "shift_right_logical",
        "sign",
        "sin",
        "sinh",
        "sqrt",
        "square",
        "stop_gradient",
        "sub",
        "tan",
        "tanh",
        "xor",
    }
)
# Call primitives whose body is inlined (their one sub-jaxpr under this parameter).
_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """The equations of one leaf: ``inputs`` and ``outputs`` are positions in the traced
    function's flat inputs and outputs; every non-scalar value has ``shape``."""

    eqns: tuple[jex.JaxprEqn, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """A traced function split into its scalar equations and per-leaf `Group`s."""

    jaxpr: jex.Jaxpr
    consts: tuple[Any, ...]
    scalar_eqns: tuple[jex.JaxprEqn, ...]
    groups: tuple[Group, ...]

    def group_of_output(self, position: int) -> Group | None:
        for group in self.groups:
            if position in group.outputs:
                return group
        return None


def trace(fn: Callable[..., Any], *args: Any) -> tuple[jex.ClosedJaxpr, Any]:
    """The jaxpr of ``fn(*args)`` with its jitted calls inlined (``args`` may be abstract),
    and the tree structure of its output."""
    with jax.disable_jit():
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    return closed, jax.tree.structure(out_shape)


def _is_scalar(atom: Any) -> bool:
    return np.ndim(atom.aval) == 0 if hasattr(atom.aval, "shape") else True


def _has_jaxpr(params: dict) -> bool:
    values = [v for p in params.values() for v in (p if isinstance(p, tuple | list) else (p,))]
    return any(isinstance(v, jex.Jaxpr | jex.ClosedJaxpr) for v in values)


def _followed(subst: dict, atom: Any) -> Any:
    """``atom`` after the chain of substitutions ``subst`` (see `_inlined`)."""
    while isinstance(atom, jex.Var) and atom in subst:
        atom = subst[atom]
    return atom


def _inlined(jaxpr: jex.Jaxpr) -> tuple[list[jex.JaxprEqn], dict] | None:
    """The equations of ``jaxpr`` with call primitives replaced by their bodies, and the
    substitution from the calls' output variables to the atoms that compute them."""
    subst: dict = {}
    eqns: list[jex.JaxprEqn] = []
    sub = functools.partial(_followed, subst)

    def add(eqn_list: Sequence[jex.JaxprEqn]) -> bool:
        for eqn in eqn_list:
            eqn = eqn.replace(invars=[sub(v) for v in eqn.invars])
            name = eqn.primitive.name
            if name in _CALLS and _CALLS[name] in eqn.params:
                body = eqn.params[_CALLS[name]]
                inner = body.jaxpr if hasattr(body, "jaxpr") else body
                if getattr(body, "consts", ()) or inner.constvars:
                    return False
                for var, atom in zip(inner.invars, eqn.invars, strict=True):
                    subst[var] = atom
                if not add(inner.eqns):
                    return False
                for var, atom in zip(eqn.outvars, inner.outvars, strict=True):
                    subst[var] = sub(atom)
                continue
            if _has_jaxpr(eqn.params):  # a loop, a branch, a custom derivative: not inlined
                return False
            eqns.append(eqn)
        return True

    return (eqns, subst) if add(jaxpr.eqns) else None


def split(closed: jex.ClosedJaxpr) -> Split | None:
    """``closed`` split into scalar equations and one elementwise group per leaf, or
    ``None`` where a non-scalar value is reduced, reshaped, gathered, drawn at random, or
    mixed with a value of another shape.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
      >>> tx = optax.adam(1e-3)
      >>> update = lambda g, s: tx.update(g, s)
      >>> closed, _ = trace(update, params, tx.init(params))
      >>> sorted(group.shape for group in split(closed).groups)
      [(3,), (4, 3)]
      >>> clipped = optax.chain(optax.clip_by_global_norm(1.0), tx)
      >>> update = lambda g, s: clipped.update(g, s)
      >>> split(trace(update, params, clipped.init(params))[0]) is None  # a global norm
      True
    """
    jaxpr = closed.jaxpr
    found = _inlined(jaxpr)
    if found is None:
        return None
    eqns, subst = found
    parent: dict = {}

    def root(var: Any) -> Any:
        while parent.get(var, var) is not var:
            parent[var] = parent.get(parent[var], parent[var])
            var = parent[var]
        return var

    def union(a: Any, b: Any) -> None:
        ra, rb = root(a), root(b)
        if ra is not rb:
            parent[ra] = rb

    scalar_eqns = []
    for eqn in eqns:
        arrays = [v for v in (*eqn.invars, *eqn.outvars) if isinstance(v, jex.Var)]
        arrays = [v for v in arrays if not _is_scalar(v)]
        if not arrays:
            scalar_eqns.append(eqn)
            continue
        name = eqn.primitive.name
        outputs_scalar = all(_is_scalar(v) for v in eqn.outvars)
        from_scalars = name == "broadcast_in_dim" and _is_scalar(eqn.invars[0])
        if outputs_scalar or not (name in ELEMENTWISE or from_scalars):
            return None
        shapes = {tuple(v.aval.shape) for v in arrays}
        if len(shapes) != 1:
            return None
        for var in arrays[1:]:
            union(arrays[0], var)

    inputs = {v: i for i, v in enumerate(jaxpr.invars)}
    outputs = [_followed(subst, v) for v in jaxpr.outvars]
    members: dict = {}
    scalar_ids = {id(eqn) for eqn in scalar_eqns}
    for eqn in eqns:
        if id(eqn) in scalar_ids:
            continue
        key = root(next(v for v in eqn.outvars if isinstance(v, jex.Var)))
        members.setdefault(key, []).append(eqn)
    groups = []
    for key, group_eqns in members.items():
        group_inputs = tuple(i for v, i in inputs.items() if not _is_scalar(v) and root(v) is key)
        group_outputs = tuple(
            j
            for j, v in enumerate(outputs)
            if isinstance(v, jex.Var) and not _is_scalar(v) and root(v) is key
        )
        shape = tuple(group_eqns[0].outvars[0].aval.shape)
        groups.append(Group(tuple(group_eqns), group_inputs, group_outputs, shape))
    # an output that is an input passed through, or a constant, belongs to no group
    covered = {j for g in groups for j in g.outputs}
    for j, v in enumerate(outputs):
        if j in covered or (isinstance(v, jex.Var) and _is_scalar(v)):
            continue
        if isinstance(v, jex.Var) and v in inputs:
            groups.append(Group((), (inputs[v],), (j,), tuple(v.aval.shape)))
            continue
        return None
    if any(not _is_scalar(v) for v in jaxpr.constvars):
        return None
    jaxpr_out = jaxpr.replace(outvars=outputs)
    return Split(jaxpr_out, tuple(closed.consts), tuple(scalar_eqns), tuple(groups))


def _read(env: dict, atom: Any) -> Any:
    return atom.val if isinstance(atom, jex.Literal) else env[atom]


def evaluate_scalars(found: Split, flat_inputs: Sequence[Any]) -> dict:
    """The values of every scalar variable, from the flat inputs (only scalar inputs are
    read)."""
    env: dict = {}
    for var, value in zip(found.jaxpr.constvars, found.consts, strict=True):
        env[var] = value
    for var, value in zip(found.jaxpr.invars, flat_inputs, strict=True):
        if _is_scalar(var):
            env[var] = value
    for eqn in found.scalar_eqns:
        _bind(eqn, env, None)
    return env


def _bind(eqn: jex.JaxprEqn, env: dict, shape: tuple[int, ...] | None) -> None:
    params = dict(eqn.params)
    if eqn.primitive.name == "broadcast_in_dim" and shape is not None:
        params["shape"] = shape
        if "sharding" in params:
            params["sharding"] = None
    out = eqn.primitive.bind(*[_read(env, v) for v in eqn.invars], **params)
    out = out if eqn.primitive.multiple_results else [out]
    for var, value in zip(eqn.outvars, out, strict=True):
        if isinstance(var, jex.Var):
            env[var] = value


def evaluate_group(
    found: Split,
    group: Group,
    scalars: dict,
    inputs: dict[int, Any],
    shape: tuple[int, ...],
) -> dict[int, Any]:
    """``group``'s outputs (by flat output position) from ``inputs`` (by flat input
    position), all of ``shape``: any slice of the group's leaf, for which the slices of
    the inputs at the same place are given. ``scalars`` is `evaluate_scalars`'s
    result."""
    env = dict(scalars)
    for position, value in inputs.items():
        env[found.jaxpr.invars[position]] = value
    for eqn in group.eqns:
        _bind(eqn, env, shape)
    return {j: _read(env, found.jaxpr.outvars[j]) for j in group.outputs}
