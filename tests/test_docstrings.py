"""The examples in varjax's docstrings run and print what they show."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

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


SOURCES = sorted(Path(varjax.__file__).parent.rglob("*.py"))
SPHINX_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc|ref):`")
SINGULAR_EXAMPLE = re.compile(r"^\s*Example:\s*$", re.MULTILINE)


def _docstrings(source: Path) -> list[tuple[str, str]]:
    """Every docstring of a module (its own, its classes' and functions'), with where."""
    found = []
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                found.append((f"{source.name}:{getattr(node, 'name', '<module>')}", doc))
    return found


def _style_problems(where: str, doc: str) -> list[str]:
    """Sphinx roles, Napoleon's singular ``Example:`` heading, and doctests outside an
    ``Examples:`` section: what griffe's Google parser and mkdocstrings do not render
    (a bare ``>>>`` line is a Markdown block quote)."""
    problems = []
    if SPHINX_ROLE.search(doc):
        problems.append(f"{where}: a Sphinx role (write [`name`][varjax.name])")
    if SINGULAR_EXAMPLE.search(doc):
        problems.append(f"{where}: an 'Example:' heading (griffe reads 'Examples:')")
    for section in griffe.Docstring(doc, lineno=1).parse("google", warnings=False):
        if section.kind is not griffe.DocstringSectionKind.examples and ">>>" in str(section.value):
            problems.append(f"{where}: a doctest outside an 'Examples:' section")
    return problems


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_docstrings_are_written_for_griffe_and_mkdocstrings(source: Path) -> None:
    problems = [p for where, doc in _docstrings(source) for p in _style_problems(where, doc)]
    assert not problems, "\n".join(problems)


def test_the_style_check_catches_roles_example_headings_and_bare_doctests() -> None:
    doc = inspect.cleandoc(
        """See :func:`varjax.radam`.

        >>> 1 + 1
        2

        Example:
          >>> 2 + 2
          4
        """
    )
    problems = _style_problems("here", doc)
    assert len(problems) == 3, problems
    assert not _style_problems("here", "See [`radam`][varjax.radam].\n\nExamples:\n  >>> 1\n  1")


def _source_docstring(obj: object) -> str | None:
    """The docstring literal of the ``def`` or ``class`` that defines ``obj``."""
    tree = ast.parse(Path(inspect.getsourcefile(obj)).read_text())
    node: ast.AST = tree
    for part in obj.__qualname__.split("."):
        node = next(
            child
            for child in ast.iter_child_nodes(node)
            if isinstance(child, ast.ClassDef | ast.FunctionDef) and child.name == part
        )
    return ast.get_docstring(node, clean=False)


@pytest.mark.parametrize(("path", "obj"), PUBLIC, ids=[path for path, _ in PUBLIC])
def test_docstrings_are_static(path: str, obj: object) -> None:
    """A public function's or class's ``__doc__`` is the string literal in its source,
    as griffe's static analysis reads it (nothing is assembled or filled in at import)."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return
    if not getattr(obj, "__module__", "").startswith("varjax"):
        return
    assert obj.__doc__ == _source_docstring(obj), f"{path}'s docstring is built at run time"


@pytest.mark.parametrize(("path", "obj"), PUBLIC, ids=[path for path, _ in PUBLIC])
def test_args_section_documents_exactly_the_signature(path: str, obj: object) -> None:
    """Every public function and class documents each of its parameters in an
    ``Args:`` section, and nothing else (a name not in the signature, such as a
    ``warmup_steps`` that the function calls ``alpha_warmup_steps``, fails)."""
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
