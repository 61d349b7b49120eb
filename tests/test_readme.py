"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

import varjax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("source", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(source: str) -> None:
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)


def _methods_tables() -> list[list[list[str]]]:
    """The tables of the README's "Methods" section as rows of cell texts, parsed as
    GitHub and mkdocs render them (CommonMark with the tables extension)."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(README.read_text())
    tables, in_methods, row = [], False, None
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            title = tokens[i + 1].content
            if token.tag == "h2":
                in_methods = title == "Methods"
            elif in_methods:
                break  # the section's own subsections come after the table
        elif not in_methods:
            continue
        elif token.type == "table_open":
            tables.append([])
        elif token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:
            row.append(token.content)
        elif token.type == "tr_close":
            tables[-1].append(row)
            row = None
    return tables


def test_methods_table_is_one_table_with_every_family_and_public_name() -> None:
    """A blank line inside the table ends it, and the rows after it render as a
    paragraph of text: the table must parse as one, with every family and name."""
    tables = _methods_tables()
    assert len(tables) == 1, [table[0] for table in tables]
    (table,) = tables
    assert table[0] == ["family", "public names", "paper"]
    assert all(len(row) == 3 for row in table), [row for row in table if len(row) != 3]
    families = {row[0] for row in table[1:]}
    assert families == {
        "rectification",
        "multi-EMA",
        "variance reduction",
        "quantized state",
        "noise-aware clipping",
        "noise-aware scaling",
        "weight rescaling",
        "diagnostics",
    }
    listed = set(re.findall(r"`(\w+)", " ".join(row[1] for row in table[1:])))
    public = {name for name in varjax.__all__ if name != "quantization"}
    public |= set(varjax.quantization.__all__) - {"QuantizedArray", "QuantizedState"}
    assert public <= listed, sorted(public - listed)
