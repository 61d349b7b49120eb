"""The Python examples of the README and of the Flax NNX page run as written, and the
README's methods table renders as one table."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import varjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NNX_PAGE = ROOT / "docs" / "flax_nnx.md"


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


BLOCKS = python_blocks(README)


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
        "low-precision weights",
        "noise-aware clipping",
        "noise-aware scaling",
        "weight rescaling",
        "diagnostics",
    }
    listed = set(re.findall(r"`(\w+)", " ".join(row[1] for row in table[1:])))
    public = {name for name in varjax.__all__ if name != "quantization"}
    public |= set(varjax.quantization.__all__) - {"QuantizedArray", "QuantizedState"}
    assert public <= listed, sorted(public - listed)


@pytest.fixture(scope="module")
def nnx_page() -> dict:
    """The Flax NNX page's blocks run in order in one namespace, as a reader runs
    them; each block asserts the effect it claims (the loss falls, a reading is
    finite, a factor moved)."""
    namespace: dict = {}
    for i, source in enumerate(python_blocks(NNX_PAGE)):
        exec(compile(source, f"{NNX_PAGE}, block {i}", "exec"), namespace)
    return namespace


def test_readme_nnx_section_links_the_page() -> None:
    text = README.read_text()
    section = text[text.index("## Use it in a Flax NNX training step") : text.index("## Methods")]
    assert "(docs/flax_nnx.md)" in section
    assert "flax_nnx.md" in (ROOT / "mkdocs.yml").read_text()


@pytest.mark.xdist_group("flax_nnx")
def test_flax_nnx_page_runs(nnx_page) -> None:
    assert len(python_blocks(NNX_PAGE)) >= 8
    for recipe in ["mars_step", "pure_loss", "igt_step", "cluster_step", "gsnr_step"]:
        assert callable(nnx_page[recipe]), recipe


@pytest.mark.xdist_group("flax_nnx")
def test_flax_nnx_exact_mars_previous_parameters_do_not_alias(nnx_page) -> None:
    """Kept across ``optimizer.update``, ``nnx.state(model)`` is the updated model
    (exact MARS then gets previous == current, no correction at all); the page's
    snapshot is the parameters before the update, bit for bit as an explicit copy."""
    mlp, batches, mars_step = nnx_page["MLP"], nnx_page["batches"], nnx_page["mars_step"]

    def run(kind: str) -> tuple[list, int]:
        model = mlp(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, varjax.mars_adamw(3e-3, exact=True), wrt=nnx.Param)
        previous = nnx.as_pure(nnx.state(model, nnx.Param))
        aliased = 0
        for x, y in batches[:20]:
            if kind == "page":
                _, previous = mars_step(model, optimizer, previous, x, y)
            else:
                before = nnx.state(model, nnx.Param)  # "naive": the live variables
                if kind == "copy":
                    before = jax.tree.map(jnp.copy, before)
                mars_step(model, optimizer, previous, x, y)
                previous = before
            now = jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param)))
            aliased += all(
                np.array_equal(a, b)
                for a, b in zip(jax.tree.leaves(nnx.as_pure(previous)), now, strict=True)
            )
        return now, aliased

    naive, copied, page = run("naive"), run("copy"), run("page")
    assert naive[1] == 20  # every step: the "previous" parameters are the current ones
    assert copied[1] == page[1] == 0
    for a, b in zip(copied[0], page[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(naive[0], page[0], strict=True))
