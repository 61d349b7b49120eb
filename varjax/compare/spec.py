"""Optimizer specifications for ``python -m varjax compare``: parse, resolve, build.

A specification is a name, optionally followed by ``:`` and comma-separated
hyper-parameters, e.g. ``mars_adamw:learning_rate=3e-3,gamma=0.025``. Names are
looked up in ``varjax`` first, then ``optax`` (``radam`` is ``varjax.radam``);
qualified names (``optax.radam``, ``optax.contrib.muon``) pick the library.
Values are Python literals (``3e-3``, ``10``, ``True``, ``None``, ``(0.9, 0.99)``),
lower-case ``true``/``false``/``none``, or bare words, which are strings
(``norm_scope=global``).

Examples:
  >>> specs = parse_specs("radam,optax.adamw:learning_rate=1e-3,weight_decay=0.1")
  >>> [spec.label for spec in specs]
  ['varjax.radam', 'optax.adamw:learning_rate=0.001,weight_decay=0.1']
  >>> default_learning_rate("varjax.lion_8bit", 3e-3)
  0.001
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import optax
import optax.contrib

import varjax
from varjax import registry

__all__ = [
    "LEARNING_RATE_FREE",
    "OPTAX_RATE_MULTIPLIERS",
    "RATE_MULTIPLIERS",
    "RATE_REASONS",
    "OptimizerSpec",
    "SpecError",
    "build_optimizer",
    "default_learning_rate",
    "known_optimizers",
    "parse_specs",
    "parse_value",
    "resolve",
]

# The default learning rate of an optimizer is the task's AdamW rate times this factor:
# Optax's here, varjax's from its entries in varjax/registry.py.
OPTAX_RATE_MULTIPLIERS: dict[str, float] = {
    "optax.lion": 1 / 3,
    "optax.signum": 1 / 3,
    "optax.sign_sgd": 1 / 3,
    "optax.contrib.muon": 3.0,
    "optax.contrib.simplified_ademamix": 1 / 100,
    "optax.sgd": 100.0,
    "optax.noisy_sgd": 100.0,
}
RATE_MULTIPLIERS: dict[str, float] = {
    **OPTAX_RATE_MULTIPLIERS,
    **{
        f"varjax.{entry.name}": entry.rate_multiplier
        for entry in registry.REGISTRY
        if entry.rate_multiplier != 1.0
    },
}

# Why each multiplier (``--help`` lists them with the names that take them).
RATE_REASONS: dict[float, str] = {
    # sign updates are +-1 per element: Lion's rule of thumb is a 3-10x smaller rate
    1 / 3: "sign updates",
    # orthogonalised (Newton-Schulz) steps are smaller per element
    3.0: "orthogonalised updates",
    # the momentum sums gradients: about 1 / (1 - b1) = 100 times an EMA
    1 / 100: "summed momentum",
    # plain (momentum) SGD steps are not normalised per element
    100.0: "plain SGD-type steps",
    30.0: "implicit gradient transport (it diverges at 100)",
}

# Learning-rate-free methods: their own default learning rate (a multiplier, 1.0 or so) is kept.
LEARNING_RATE_FREE = frozenset(
    f"optax.contrib.{name}"
    for name in ("cocob", "dadapt_adamw", "dog", "dowg", "momo", "momo_adam", "prodigy")
)

LIBRARIES: dict[str, Any] = {"varjax": varjax, "optax": optax}


class SpecError(ValueError):
    """A specification that cannot be parsed, resolved or built; the message says why."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A resolved optimizer name and the hyper-parameters given for it.

    Examples:
      >>> OptimizerSpec("varjax.qhm", {"nu": 0.5, "weight_decay": 0}).label
      'varjax.qhm:nu=0.5,weight_decay=0'
    """

    name: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        """The specification as written back, with the qualified name."""
        if not self.kwargs:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_show(v)}" for k, v in self.kwargs.items())


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def parse_value(text: str) -> Any:
    """A hyper-parameter value: a Python literal, ``true``/``false``/``none``, or a word.

    Examples:
      >>> [parse_value(t) for t in ["3e-3", "10", "True", "false", "None", "(0.9, 0.99)", "global"]]
      [0.003, 10, True, False, None, (0.9, 0.99), 'global']
      >>> parse_value("1e-3x")
      Traceback (most recent call last):
      ...
      varjax.compare.spec.SpecError: cannot parse the value '1e-3x' (want a number, ...)
    """
    text = text.strip()
    lowered = {"true": True, "false": False, "none": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", text):
        return text
    raise SpecError(
        f"cannot parse the value {text!r} (want a number, True/False/None, a tuple or a word)"
    )


def _top_level_split(text: str) -> list[str]:
    """Split at the commas outside brackets: ``"a=(1, 2),b"`` -> ``["a=(1, 2)", "b"]``."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    return [*parts, "".join(current)]


def _split(text: str) -> list[tuple[str, list[str]]]:
    """``"a:x=1,y=2,b"`` -> ``[("a", ["x=1", "y=2"]), ("b", [])]``."""
    items: list[tuple[str, list[str]]] = []
    for raw in _top_level_split(text):
        token = raw.strip()
        if not token:
            raise SpecError(f"empty item in the optimizer list {text!r}")
        if ":" in token:
            name, _, first = token.partition(":")
            items.append((name.strip(), [first.strip()] if first.strip() else []))
        elif "=" in token:
            if not items:
                raise SpecError(f"{token!r} comes before any optimizer name in {text!r}")
            items[-1][1].append(token)
        else:
            items.append((token, []))
    return items


def _parse_kwargs(name: str, assignments: list[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for assignment in assignments:
        key, eq, value = assignment.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise SpecError(f"{name}: expected key=value, got {assignment!r}")
        if key in kwargs:
            raise SpecError(f"{name}: {key} is given twice")
        try:
            kwargs[key] = parse_value(value)
        except SpecError as error:
            raise SpecError(f"{name}: {key}: {error}") from None
    return kwargs


def parse_specs(text: str) -> list[OptimizerSpec]:
    """Parse and resolve a comma-separated list of specifications (see the module doc).

    Names are resolved (unknown ones raise ``SpecError`` with close matches);
    hyper-parameters are only parsed here, ``build_optimizer`` checks them.

    Examples:
      >>> for spec in parse_specs("mars_adamw:gamma=0.05,exact=false,adamw_8bit"):
      ...     print(spec.name, spec.kwargs)
      varjax.mars_adamw {'gamma': 0.05, 'exact': False}
      varjax.adamw_8bit {}
      >>> try:
      ...     parse_specs("adamw8bit")
      ... except SpecError as error:
      ...     print(error)
      unknown optimizer 'adamw8bit'; close matches: varjax.adamw_8bit, ...
    """
    specs = []
    for name, assignments in _split(text):
        qualified, _ = resolve(name)
        specs.append(OptimizerSpec(qualified, _parse_kwargs(qualified, assignments)))
    labels = [spec.label for spec in specs]
    for label in labels:
        if labels.count(label) > 1:
            raise SpecError(f"{label} is listed twice")
    return specs


def _lookup(path: str) -> Any:
    """``"optax.contrib.muon"`` -> the object, or ``None``."""
    root, *rest = path.split(".")
    obj = LIBRARIES.get(root)
    for part in rest:
        obj = getattr(obj, part, None) if obj is not None and not part.startswith("_") else None
    return obj


def _takes_learning_rate(obj: Any) -> bool:
    if not callable(obj) or inspect.isclass(obj):
        return False
    try:
        return "learning_rate" in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False


def _is_optimizer(name: str, obj: Any) -> bool:
    """A ready optimizer: a factory taking ``learning_rate`` (not a ``scale_by_*`` block)."""
    return not name.rsplit(".", 1)[-1].startswith("scale_by") and _takes_learning_rate(obj)


@functools.cache
def known_optimizers() -> tuple[str, ...]:
    """Qualified names of the ready optimizers: varjax's registry entries of kind
    ``optimizer`` that take a ``learning_rate``, and those of optax and optax.contrib.

    Examples:
      >>> "varjax.mars_adamw" in known_optimizers(), "optax.adamw" in known_optimizers()
      (True, True)
      >>> "varjax.storm" in known_optimizers()  # its step size is k
      False
    """
    names = [
        f"varjax.{entry.name}"
        for entry in registry.REGISTRY
        if entry.kind == "optimizer" and _takes_learning_rate(entry.factory)
    ]
    for prefix, module in (("optax", optax), ("optax.contrib", optax.contrib)):
        for attr in sorted(dir(module)):
            if not attr.startswith("_") and _is_optimizer(attr, getattr(module, attr)):
                names.append(f"{prefix}.{attr}")
    return tuple(names)


def _close_matches(name: str) -> list[str]:
    """Known optimizers whose (unqualified) name is close to ``name``'s."""
    by_short: dict[str, list[str]] = {}
    for qualified in known_optimizers():
        by_short.setdefault(qualified.rsplit(".", 1)[-1], []).append(qualified)
    short = name.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(short, list(by_short), n=5, cutoff=0.6)
    return [q for s in close for q in by_short[s]]


def resolve(name: str) -> tuple[str, Callable[..., optax.GradientTransformation]]:
    """The qualified name and factory of ``name`` (``varjax`` first, then ``optax``).

    Examples:
      >>> resolve("radam")[0], resolve("adamw")[0], resolve("optax.radam")[0]
      ('varjax.radam', 'optax.adamw', 'optax.radam')
    """
    name = name.strip()
    candidates = (
        [name] if name.split(".")[0] in LIBRARIES else [f"{lib}.{name}" for lib in LIBRARIES]
    )
    for candidate in candidates:
        if candidate.startswith("varjax."):  # the registry's entries, nothing else
            entry = registry.ENTRIES.get(candidate.removeprefix("varjax."))
            obj = None if entry is None else entry.factory
            ready = candidate in known_optimizers()
        else:
            obj = _lookup(candidate)
            ready = _is_optimizer(candidate, obj)
        if obj is None:
            continue
        if not ready:
            raise SpecError(
                f"{candidate} is not a ready optimizer (it takes no learning_rate or is a "
                "scale_by_* building block); compare takes optimizers such as varjax.radam"
            )
        return candidate, obj
    close = _close_matches(name)
    hint = f"close matches: {', '.join(close)}" if close else "see varjax.__all__ and optax"
    raise SpecError(f"unknown optimizer {name!r}; {hint}")


def default_learning_rate(name: str, base: float) -> float | None:
    """The learning rate ``name`` gets when none is given; ``None``: the factory's own.

    Examples:
      >>> default_learning_rate("optax.adamw", 3e-3), default_learning_rate("optax.sgd", 3e-3)
      (0.003, 0.3)
    """
    if name in LEARNING_RATE_FREE:
        return None
    return float(f"{base * RATE_MULTIPLIERS.get(name, 1.0):.3g}")


def build_optimizer(
    spec: OptimizerSpec, base_learning_rate: float
) -> tuple[optax.GradientTransformation, dict[str, Any]]:
    """Build ``spec``'s optimizer; return it and the keyword arguments it was built with.

    Unknown keywords and values the factory rejects raise ``SpecError``
    naming the argument.

    Examples:
      >>> tx, kwargs = build_optimizer(OptimizerSpec("varjax.radam"), 3e-3)
      >>> kwargs
      {'learning_rate': 0.003}
      >>> build_optimizer(OptimizerSpec("varjax.radam", {"b1": 1.5}), 3e-3)
      Traceback (most recent call last):
      ...
      varjax.compare.spec.SpecError: varjax.radam:b1=1.5: b1 must be in [0.0, 1.0), got 1.5
      >>> build_optimizer(OptimizerSpec("varjax.radam", {"beta1": 0.9}), 3e-3)
      Traceback (most recent call last):
      ...
      varjax.compare.spec.SpecError: varjax.radam:beta1=0.9: no hyper-parameter 'beta1' (close: b1)...
    """  # noqa: E501 (a doctest's exception line)
    _, factory = resolve(spec.name)
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key in spec.kwargs:
        if key not in parameters and not takes_any:
            close = difflib.get_close_matches(key, list(parameters), n=3, cutoff=0.5)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise SpecError(
                f"{spec.label}: no hyper-parameter {key!r}{hint}; "
                f"{spec.name} takes {', '.join(parameters)}"
            )
    kwargs = dict(spec.kwargs)
    rate = default_learning_rate(spec.name, base_learning_rate)
    if "learning_rate" not in kwargs and rate is not None:
        kwargs = {"learning_rate": rate, **kwargs}
    try:
        tx = factory(**kwargs)
    except (ValueError, TypeError) as error:
        raise SpecError(f"{spec.label}: {error}") from None
    if not isinstance(tx, optax.GradientTransformation):
        raise SpecError(f"{spec.label}: {spec.name} did not return an optax.GradientTransformation")
    return tx, kwargs
