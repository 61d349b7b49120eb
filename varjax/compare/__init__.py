"""``python -m varjax compare``: train a small model with several optimizers and compare them.

Every optimizer starts from the same initialisation and sees the same batches
for each seed; the run prints a table (learning rate, final losses, steps to
reach the AdamW baseline's final validation loss, time per step,
optimizer-state bytes per parameter) and writes ``results.json``,
``results.csv``, ``results.md`` and ``curves.png``; ``--tune`` first tries a
learning-rate grid per optimizer and adds ``sensitivity.png``.

The comparison needs Flax (its models) and Matplotlib (its plots), which the
optimizers do not: they come with ``pip install 'varjax[compare]'``. This
package imports without them; ``main`` says in one line what is missing.

Modules: ``spec`` (parse and build optimizer
specifications), ``tasks`` (models and data),
``train`` (the jitted, scanned training loop),
``tune`` (the learning-rate grid),
``report`` (table, files, plots, progress bar) and
``cli`` (the command line).

Examples:
  >>> from varjax.compare import parse_specs
  >>> [spec.name for spec in parse_specs("adamw,radam")]
  ['optax.adamw', 'varjax.radam']
  >>> missing_dependencies()
  []
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

from varjax.compare.spec import OptimizerSpec, SpecError, build_optimizer, parse_specs

__all__ = [
    "NEEDS",
    "OptimizerSpec",
    "SpecError",
    "build_optimizer",
    "main",
    "missing_dependencies",
    "parse_specs",
]

# what the comparison job imports beyond the library's own dependencies
NEEDS = ("flax", "matplotlib")


def missing_dependencies(names: Sequence[str] = NEEDS) -> list[str]:
    """The modules of ``names`` that cannot be imported here (without importing them)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m varjax [compare] [options]``; returns the exit status (1 when the
    comparison's dependencies are missing, with one line on standard error)."""
    missing = missing_dependencies()
    if missing:
        print(
            f"python -m varjax: the comparison job needs {' and '.join(missing)} "
            "(varjax itself does not): pip install 'varjax[compare]', "
            "or in a clone of varjax: pip install -e '.[compare]'",
            file=sys.stderr,
        )
        return 1
    from varjax.compare import cli

    return cli.main(argv)
