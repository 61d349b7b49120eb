"""What each piece of optimizer state is: its *role*, declared once per state type.

A wrapper that changes how state is stored ([`varjax.quantize_state`][] keeps
moments in 8 or 4 bits) must know what every leaf holds: a signed moment can
take a signed quantization map, a non-negative one the unsigned map, while a
copy of the parameters, a step count or a history of gradient norms must stay
exactly as it is. Guessing that from field names goes wrong (``v`` is a second
moment in Adam and a parameter called ``v`` elsewhere), so each state type
declares the role of each of its fields, where it is defined::

    @roles.declare(count=Role.COUNT, mu=Role.SIGNED, nu=Role.NON_NEGATIVE)
    class MyAdamState(NamedTuple):
        count: jax.Array
        mu: optax.Updates
        nu: optax.Updates

Optax's state types are declared in one table, [`varjax.quantization.optax_roles`][]. A field whose
value is another transform's state (a wrapper's ``inner_state``) has the role
[`Role.NESTED`][varjax.roles.Role.NESTED], and the walk goes on inside it; plain tuples, lists and
dicts (``optax.chain``'s state, ``optax.partition``'s states) are walked through too.

Examples:
  >>> import jax.numpy as jnp, optax
  >>> from varjax.roles import Role, leaf_roles
  >>> state = optax.adam(1e-3).init({"w": jnp.zeros(3)})
  >>> [(jax.tree_util.keystr(path), role.name) for path, _, role in leaf_roles(state)]
  [('[0].count', 'COUNT'), ("[0].mu['w']", 'SIGNED'), ("[0].nu['w']", 'NON_NEGATIVE')]
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax

__all__ = [
    "Role",
    "RoleOverride",
    "declare",
    "declared_roles",
    "leaf_roles",
    "register_roles",
    "resolve_override",
]

PyTree = Any
KeyPath = tuple[Any, ...]
T = TypeVar("T", bound=type)


class Role(enum.Enum):
    """The role of a field of optimizer state.

    Examples:
      >>> Role("non_negative")
      <Role.NON_NEGATIVE: 'non_negative'>
    """

    SIGNED = "signed"
    """A moment of either sign (Adam's ``mu``, a momentum buffer): may be quantized
    with a signed map."""
    NON_NEGATIVE = "non_negative"
    """A moment that is never negative (Adam's ``nu``, Adagrad's sum of squares): may be
    quantized with an unsigned map, which spends every code on values >= 0."""
    PARAMETERS = "parameters"
    """A copy of the parameters (IGT's true parameters, schedule-free's ``z``,
    Prodigy's starting point): parameters rounded to 8 bits are another model, so
    these stay in full precision."""
    EXACT = "exact"
    """Other data kept exactly as it is: histories and windows (AutoClip's norms),
    running sums and estimates that steer the step size (D-Adaptation's),
    hyper-parameters, PRNG keys, flags, previous gradients that are differenced."""
    COUNT = "count"
    """A step count or other integer counter."""
    NESTED = "nested"
    """Another transform's state: its own declared roles apply inside it."""


_DECLARED: dict[type, Mapping[str, Role]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    if hasattr(cls, "_fields"):  # a NamedTuple
        return tuple(cls._fields)
    if dataclasses.is_dataclass(cls):
        return tuple(field.name for field in dataclasses.fields(cls))
    raise TypeError(f"{cls.__qualname__} is neither a NamedTuple nor a dataclass")


def register_roles(cls: type, **field_roles: Role) -> None:
    """Declare the role of every field of the state type ``cls``.

    Use it for a state type you do not define yourself; for your own, the
    decorator [`declare`][varjax.roles.declare] says the same where the type is defined.

    Args:
      cls: a state type, a ``NamedTuple`` or a dataclass registered as a pytree.
      field_roles: one [`Role`][varjax.roles.Role] per field of ``cls``, every field named,
        as keyword arguments.

    Raises:
      ValueError: when a field of ``cls`` has no role, a name is not a field of
        ``cls``, or a value is not a [`Role`][varjax.roles.Role].

    Examples:
      >>> from typing import NamedTuple
      >>> class TraceWithCount(NamedTuple):
      ...     count: jax.Array
      ...     trace: jax.Array
      >>> register_roles(TraceWithCount, count=Role.COUNT, trace=Role.SIGNED)
      >>> declared_roles(TraceWithCount)["trace"]
      <Role.SIGNED: 'signed'>
    """
    fields = _field_names(cls)
    missing = [name for name in fields if name not in field_roles]
    unknown = [name for name in field_roles if name not in fields]
    if missing or unknown:
        raise ValueError(
            f"the roles of {cls.__qualname__} must name each of its fields {fields} once: "
            f"missing {missing}, not fields {unknown}"
        )
    for name, role in field_roles.items():
        if not isinstance(role, Role):
            raise ValueError(f"the role of {cls.__qualname__}.{name} must be a Role, got {role!r}")
    _DECLARED[cls] = dict(field_roles)


def declare(**field_roles: Role) -> Callable[[T], T]:
    """Class decorator: [`register_roles`][varjax.roles.register_roles] for the state type it
    decorates.

    Args:
      field_roles: one [`Role`][varjax.roles.Role] per field of the decorated type, as
        keyword arguments.

    Examples:
      >>> from typing import NamedTuple
      >>> @declare(count=Role.COUNT, mu=Role.SIGNED)
      ... class MomentumState(NamedTuple):
      ...     count: jax.Array
      ...     mu: jax.Array
      >>> declared_roles(MomentumState)["count"]
      <Role.COUNT: 'count'>
    """

    def decorate(cls: T) -> T:
        register_roles(cls, **field_roles)
        return cls

    return decorate


def declared_roles(cls: type) -> Mapping[str, Role] | None:
    """The roles declared for the fields of ``cls``, or ``None`` when it has none.

    Args:
      cls: a state type.
    """
    return _DECLARED.get(cls)


def _children(node: Any) -> list[tuple[Any, Any]]:
    """The (key, child) pairs one level below ``node``, in pytree order."""
    pairs, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return [(path[0], child) for path, child in pairs]


def _is_state_type(node: Any) -> bool:
    """Whether ``node`` is a NamedTuple or dataclass instance (a state type)."""
    return hasattr(type(node), "_fields") or (
        dataclasses.is_dataclass(node) and not isinstance(node, type)
    )


def leaf_roles(
    state: PyTree, is_leaf: Callable[[Any], bool] | None = None
) -> list[tuple[KeyPath, Any, Role | None]]:
    """Every leaf of ``state`` with its key path and its declared role.

    The order is that of ``jax.tree_util.tree_flatten_with_path(state, is_leaf)``.
    A leaf outside any declared field has the role ``None``.

    Args:
      state: an optimizer state.
      is_leaf: as in ``jax.tree_util``: nodes to treat as leaves.

    Raises:
      ValueError: when a field declared with a role other than ``NESTED``
        holds another state type with declared roles (the two would disagree).
    """
    out: list[tuple[KeyPath, Any, Role | None]] = []

    def walk(node: Any, path: KeyPath, role: Role | None) -> None:
        if node is None or (is_leaf is not None and is_leaf(node)):
            if node is not None:
                out.append((path, node, role))
            return
        treedef = jax.tree.structure(node)
        if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # an array or other leaf
            out.append((path, node, role))
            return
        children = _children(node)
        declared = declared_roles(type(node))
        for key, child in children:
            child_role = role
            if role is None and declared is not None:
                child_role = (
                    declared[key.name] if isinstance(key, jax.tree_util.GetAttrKey) else None
                )
                if child_role is Role.NESTED:
                    child_role = None
            walk(child, (*path, key), child_role)

    walk(state, (), None)
    return out


def undeclared_owner(state: PyTree, path: KeyPath) -> str:
    """The name of the innermost state type on ``path`` in ``state`` (for messages)."""
    owner, node = "the state", state
    for key in path:
        if _is_state_type(node):
            owner = type(node).__qualname__
        node = dict(_children(node))[key]
    return owner


RoleOverride = Callable[[KeyPath, Role | None], Role | None] | Mapping[str, Role] | None
"""A per-leaf override of the declared roles: a function ``(key_path, declared_role)
-> role``, or a mapping from regular expressions to roles, the first pattern that
``re.search`` finds in ``jax.tree_util.keystr(key_path)`` deciding."""


@dataclasses.dataclass(frozen=True)
class _PatternOverride:
    """A mapping override in a hashable form (regular expression, role) pairs."""

    patterns: tuple[tuple[str, Role], ...]

    def __call__(self, path: KeyPath, role: Role | None) -> Role | None:
        text = jax.tree_util.keystr(path)
        for pattern, new_role in self.patterns:
            if re.search(pattern, text):
                return new_role
        return role


def resolve_override(override: RoleOverride) -> Callable[[KeyPath, Role | None], Role | None]:
    """An override as a hashable function ``(key_path, declared_role) -> role``.

    Args:
      override: ``None`` (keep the declared roles), a function, or a mapping
        from regular expressions to [`Role`][varjax.roles.Role] values.

    Raises:
      ValueError: when a mapping's key is not a valid regular expression or a
        value is not a [`Role`][varjax.roles.Role].
    """
    if override is None:
        return _PatternOverride(())
    if callable(override):
        return override
    if not isinstance(override, Mapping):
        raise ValueError(f"roles must be a function or a mapping, got {type(override).__name__}")
    for pattern, role in override.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"roles: {pattern!r} is not a regular expression ({error})") from None
        if not isinstance(role, Role):
            raise ValueError(f"roles: the role for {pattern!r} must be a Role, got {role!r}")
    return _PatternOverride(tuple(override.items()))
