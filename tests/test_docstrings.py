"""The examples in varjax's docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import griffe
import pytest

import varjax

MODULES = [
    info.name
    for info in pkgutil.walk_packages(varjax.__path__, prefix="varjax.")
    if not info.name.endswith("__main__")
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# an enum and a warning class: their call signatures are the standard library's; a
# NamedTuple state, whose fields griffe lists under Attributes, not as parameters
ARGS_EXEMPT = {"Role", "UndeclaredRoleWarning", "QuantizedState"}


def _public_callables() -> list[tuple[str, object]]:
    found = []
    for prefix, module in [("varjax", varjax), ("varjax.quantization", varjax.quantization)]:
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not inspect.ismodule(obj) and name not in ARGS_EXEMPT:
                found.append((f"{prefix}.{name}", obj))
    return found


PUBLIC = _public_callables()


def _documented_parameters(doc: str) -> list[str] | None:
    """The names in the docstring's ``Args:`` section as griffe's Google parser (the
    one behind the API pages' parameter tables) reads them; ``None`` without one."""
    sections = griffe.Docstring(doc, lineno=1).parse("google", warnings=False)
    found = [s for s in sections if s.kind is griffe.DocstringSectionKind.parameters]
    if not found:
        return None
    return [parameter.name for section in found for parameter in section.value]


@pytest.mark.parametrize(("path", "obj"), PUBLIC, ids=[path for path, _ in PUBLIC])
def test_args_section_documents_exactly_the_signature(path: str, obj: object) -> None:
    """Every public function and class documents each of its parameters in an
    ``Args:`` section, and nothing else (a name not in the signature, such as a
    ``warmup_steps`` that the function calls ``alpha_warmup_steps``, fails). The
    run-time docstring is checked: the quantized and MARS aliases of
    varjax/alias.py are built at import, and that text is what users and the API
    pages see."""
    parameters = list(inspect.signature(obj).parameters)
    documented = _documented_parameters(inspect.getdoc(obj) or "")
    if not parameters:
        return
    assert documented is not None, f"{path} has no Args: section"
    assert len(documented) == len(set(documented)), f"{path} documents a name twice"
    assert not set(parameters) - set(documented), f"{path}: not in Args: " + str(
        sorted(set(parameters) - set(documented))
    )
    assert not set(documented) - set(parameters), (
        f"{path}: Args: names what it does not take "
        + str(sorted(set(documented) - set(parameters)))
    )
    assert documented == parameters, f"{path}: Args: should follow the signature's order"


@pytest.mark.parametrize(("path", "obj"), PUBLIC, ids=[path for path, _ in PUBLIC])
def test_public_callables_have_an_example(path: str, obj: object) -> None:
    assert ">>> " in (inspect.getdoc(obj) or ""), f"{path} has no example"


def test_the_args_check_catches_a_wrong_name() -> None:
    def ademamix_like(alpha_warmup_steps: int, b3_warmup_steps: int) -> None:
        """Warm-ups.

        Args:
          warmup_steps: the steps of both warm-ups.
          b3_warmup_steps: the steps of the b3 warm-up.
        """

    assert _documented_parameters(inspect.getdoc(ademamix_like)) == [
        "warmup_steps",
        "b3_warmup_steps",
    ]
    with pytest.raises(AssertionError, match="alpha_warmup_steps"):
        test_args_section_documents_exactly_the_signature("ademamix_like", ademamix_like)
