"""varjax/registry.py against what reads it and what it describes.

Every public name has one entry and every entry is public; ``varjax.__all__``,
the battery's cases, the benchmark's pairs and the comparison job's names and
multipliers are the registry's; each entry's docs page documents it, the
README's methods table lists it under its family, and it is tested: the test
modules its entry names (its reference and peer checks) mention it by name,
and an entry with battery cases is run by the battery. Text and import checks
only: nothing here compiles a step.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import sys

import jax.numpy as jnp
import optax
import pytest
from test_battery import ADAPTERS, CASES, INNER
from test_readme import _methods_tables

import varjax
from varjax import registry
from varjax.compare import cli, spec

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENTRY_IDS = [entry.name for entry in registry.REGISTRY]


def test_all_is_the_registry_and_its_modules() -> None:
    assert varjax.__all__ == sorted([*registry.names(), *registry.MODULES])
    assert len(set(registry.names())) == len(registry.REGISTRY), "a name has two entries"


def test_every_public_name_has_an_entry() -> None:
    """A name imported in varjax/__init__.py (not a module) without an entry fails."""
    public = {
        name
        for name, value in vars(varjax).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(registry.names()), {
        "imported without an entry": sorted(public - set(registry.names())),
        "an entry not imported": sorted(set(registry.names()) - public),
    }
    assert all(inspect.ismodule(getattr(varjax, name)) for name in registry.MODULES)


@pytest.mark.parametrize("entry", registry.REGISTRY, ids=ENTRY_IDS)
def test_entry_is_well_formed(entry: registry.Entry) -> None:
    assert entry.factory is getattr(varjax, entry.name)
    assert entry.kind in registry.KINDS
    if entry.kind != "optimizer":
        assert entry.rate_multiplier == 1.0 and not entry.baselines, entry.name
    for case in entry.battery:
        assert case.adapt in ADAPTERS and (case.inner is None or case.inner in INNER), case


@pytest.mark.parametrize("entry", registry.REGISTRY, ids=ENTRY_IDS)
def test_entry_is_tested(entry: registry.Entry) -> None:
    """The definition: its entry names at least one test module, each of which exists
    and mentions the name as a word; and each of its battery cases is in the battery."""
    assert entry.tests, f"{entry.name}: no test module named in its entry"
    for name in entry.tests:
        text = (ROOT / "tests" / name).read_text()
        assert re.search(rf"\b{entry.name}\b", text), f"{name} does not mention {entry.name}"
    ran = {case.name for case in CASES if case.entry == entry.name}
    assert ran == {case.name for case in entry.battery}


def test_battery_cases_are_the_registry_s() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)), "two cases share a name"
    assert names == [case.name for entry in registry.REGISTRY for case in entry.battery]


@pytest.mark.parametrize("entry", registry.REGISTRY, ids=ENTRY_IDS)
def test_docs_page_documents_the_entry(entry: registry.Entry) -> None:
    """``docs/<page>`` has ``::: varjax.<name>`` (or ``::: varjax.<module>.<name>``, the
    path of a name its module shadows, as ``varjax.multi_ema.multi_ema``)."""
    text = (ROOT / "docs" / entry.page).read_text()
    paths = set(re.findall(r"^::: ([\w.]+)$", text, flags=re.MULTILINE))
    assert {f"varjax.{entry.name}", f"varjax.{entry.module}.{entry.name}"} & paths, entry.page


def test_readme_table_lists_each_entry_under_its_family() -> None:
    (table,) = _methods_tables()
    listed: dict[str, set[str]] = {}
    for family, cell, _ in table[1:]:
        listed.setdefault(family, set()).update(re.findall(r"`(\w+)", cell))
    misplaced = [e.name for e in registry.REGISTRY if e.name not in listed.get(e.family, ())]
    assert not misplaced, misplaced


def test_benchmark_pairs_are_the_registry_s() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step_time
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    lines = [(e, line) for e in registry.REGISTRY for line in e.baselines]
    assert [pair[0] for pair in step_time.PAIRS] == [line.label or e.name for e, line in lines]
    assert len({pair[0] for pair in step_time.PAIRS}) == len(step_time.PAIRS)
    for _, line in lines:  # the baselines exist (building them is the benchmark's job)
        assert callable(step_time._optax(line.optax)), line.optax
    assert step_time._optax("optax.contrib.muon") is optax.contrib.muon


def test_compare_knows_the_registry_s_optimizers_and_multipliers() -> None:
    ready = {
        f"varjax.{e.name}"
        for e in registry.REGISTRY
        if e.kind == "optimizer" and "learning_rate" in inspect.signature(e.factory).parameters
    }
    assert {n for n in spec.known_optimizers() if n.startswith("varjax.")} == ready
    for entry in registry.REGISTRY:
        if entry.rate_multiplier != 1.0:
            assert spec.RATE_MULTIPLIERS[f"varjax.{entry.name}"] == entry.rate_multiplier
    help_text = " ".join(cli.build_parser().format_help().split())
    for name, factor in spec.RATE_MULTIPLIERS.items():
        assert factor in spec.RATE_REASONS, f"{name}: {factor} has no reason for --help"
        assert name in help_text, name


def test_contributing_cites_what_exists_and_its_example_runs() -> None:
    """CONTRIBUTING.md's paths and ``varjax.<name>`` names exist; its worked example (a
    transform and its entry) runs, and the entry is one the battery could run."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    for path in re.findall(r"`((?:varjax|tests|docs|benchmarks)/[\w/.]+\.(?:py|md))`", text):
        assert (ROOT / path).exists(), path
    transform, entry_source = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    namespace: dict = {}
    exec(compile(transform, "CONTRIBUTING.md", "exec"), namespace)
    for name in re.findall(r"\bvarjax\.(\w+)", text):  # or the example's new one
        assert hasattr(varjax, name) or name in namespace, name
    tx = namespace["scale_by_sign_momentum"]()
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": -jnp.ones(3)}, tx.init(params))
    assert updates["w"].tolist() == [-1.0, -1.0, -1.0]
    entry = eval(entry_source, {"Entry": registry.Entry, "Battery": registry.Battery})
    assert entry.kind in registry.KINDS and (ROOT / "docs" / entry.page).exists()
    assert all((ROOT / "tests" / name).exists() for name in entry.tests)
    assert all(case.adapt in ADAPTERS for case in entry.battery)
