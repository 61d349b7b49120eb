"""Griffe extension used by mkdocstrings to build the varjax API pages (see mkdocs.yml).

The docs are read by static analysis, with three adjustments made here and
nowhere in the package:

* A function built at import by another function (the quantized and MARS
  aliases in ``varjax/alias.py``, ``adamw_8bit = _quantized(...)``) is an
  assignment to static analysis: it is documented from the function itself,
  its ``inspect.signature`` and ``__doc__``, by griffe's dynamic analysis.
* Napoleon's singular ``Example:`` heading is read as a Google ``Examples:``
  section, so that doctest lines render as code.
* A doctest block in the free text (as reST reads it) becomes a ``pycon``
  code block; Markdown would otherwise take its ``>>>`` for block quotes.
* Sphinx roles such as ``:func:`storm``` become cross-references to the object
  they name (plain code where it is not documented).
"""

from __future__ import annotations

import html
import inspect
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc):`(~?)([\w.]+)`")
_EXAMPLE_HEADING = re.compile(r"^Example:[ \t]*$", re.MULTILINE)


def _fence_doctests(text: str) -> str:
    """Wrap each unindented run of doctest lines (up to a blank line) in a code fence."""
    out: list[str] = []
    in_block = False
    for line in text.split("\n"):
        if not in_block and line.startswith(">>>"):
            if out and out[-1].strip():
                out.append("")
            out.append("```pycon")
            in_block = True
        elif in_block and not line.strip():
            out.append("```")
            in_block = False
        out.append(line)
    if in_block:
        out.append("```")
    return "\n".join(out)


def _runtime(path: str) -> Any:
    try:
        return griffe.dynamic_import(path)
    except (ImportError, AttributeError, ValueError):
        return None


def _canonical_path(value: Any) -> str | None:
    if inspect.ismodule(value):
        return value.__name__
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        return f"{module}.{qualname}"
    return None


def _resolve(name: str, module_path: str) -> str | None:
    """The canonical path of ``name`` as seen from module ``module_path``."""
    candidates = [f"{module_path}.{name}", name, f"varjax.{name}"]
    for candidate in candidates:
        value = _runtime(candidate)
        if value is not None:
            path = _canonical_path(value)
            if path and path.split(".", 1)[0] == "varjax":
                return path
    return None


class VarjaxDocstrings(griffe.Extension):
    """Functions built at import, examples sections, bare doctests, Sphinx roles."""

    def on_module_members(self, *, mod: griffe.Module, agent: Any, **kwargs: Any) -> None:
        if mod.path.split(".", 1)[0] != "varjax":
            return
        runtime = _runtime(mod.path)
        built = [
            name
            for name, member in mod.members.items()
            if not member.is_alias
            and member.is_attribute
            and inspect.isfunction(value := getattr(runtime, name, None))
            and value.__module__ == mod.path
            and value.__name__ == name
        ]
        if not built:
            return
        parser = getattr(agent, "docstring_parser", None)
        options = getattr(agent, "docstring_options", None)
        inspected = griffe.inspect(mod.path, docstring_parser=parser, docstring_options=options)
        for name in built:
            function = inspected[name]
            lineno = mod.members[name].lineno
            mod.set_member(name, function)
            function.lineno = function.endlineno = lineno
            self.on_instance(obj=function)

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None or obj.path.split(".", 1)[0] != "varjax":
            return
        text = _fence_doctests(_EXAMPLE_HEADING.sub("Examples:", docstring.value))
        module_path = obj.module.path

        def role(match: re.Match[str]) -> str:
            short, name = match.groups()
            title = name.rsplit(".", 1)[-1] if short else name
            code = f"<code>{html.escape(title)}</code>"
            target = _resolve(name, module_path)
            if target is None:
                return code
            # Optional: an object that no page renders stays plain code, not a warning.
            return f'<autoref identifier="{target}" optional>{code}</autoref>'

        docstring.value = _ROLE.sub(role, text)


__all__ = ["VarjaxDocstrings"]
