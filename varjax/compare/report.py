"""Reporting for ``python -m varjax compare``: summary rows, table, CSV, JSON, plot, progress.

Examples:
  >>> from varjax.compare.train import Curve, OptimizerRun
  >>> def run(valid, ms):
  ...     curve = Curve(0, [0, 10, 20], [4.0, 3.0, 2.0], valid)
  ...     return OptimizerRun([curve], ms, 1.0, 800, 100)
  >>> rows = summarize({"adamw": run([4.0, 3.0, 2.5], 2.0), "fast": run([4.0, 2.4, 2.0], 3.0)},
  ...                  baseline="adamw")
  >>> [(row.optimizer, row.steps_to_baseline) for row in rows]
  [('adamw', 20), ('fast', 10)]
  >>> print(format_table(rows))  # doctest: +NORMALIZE_WHITESPACE
  optimizer         lr  train loss, last 10 steps  valid loss  steps to adamw  ms/step  state B/param
  adamw (baseline)  -   2.0000                     2.5000      20              2.00     8.00
  fast              -   2.0000                     2.0000      10              3.00     8.00
"""  # noqa: E501 (a doctest's table, not wrapped)

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from varjax.compare.train import OptimizerRun
from varjax.compare.tune import Tuning

__all__ = [
    "ProgressBar",
    "Row",
    "format_sensitivity",
    "format_table",
    "plot_curves",
    "plot_sensitivity",
    "summarize",
    "write_csv",
    "write_json",
]


@dataclasses.dataclass(frozen=True)
class Row:
    """One optimizer's line of the table (losses: mean and standard deviation over seeds).

    ``train_mean`` is the mean training loss over the last ``train_window`` steps (the
    last evaluation interval); ``valid_mean`` the validation loss after the last step;
    ``tuned``: the learning rate is the best of a ``--tune`` grid.
    """

    optimizer: str
    baseline: bool
    learning_rate: float | None
    tuned: bool
    train_window: int
    train_mean: float
    train_std: float
    valid_mean: float
    valid_std: float
    steps_to_baseline: int | None
    ms_per_step: float
    state_bytes_per_param: float
    seeds: int


def mean_curve(run: OptimizerRun, which: str) -> np.ndarray:
    """The mean over seeds of the ``"train"`` or ``"valid"`` curve."""
    return np.mean([getattr(curve, which) for curve in run.curves], axis=0)


def steps_to_reach(run: OptimizerRun, target: float) -> int | None:
    """The first evaluated step whose mean validation loss is at most ``target``."""
    for step, loss in zip(run.curves[0].steps, mean_curve(run, "valid"), strict=True):
        if loss <= target:
            return step
    return None


def summarize(
    runs: Mapping[str, OptimizerRun],
    baseline: str,
    learning_rates: Mapping[str, float | None] | None = None,
    tuned: frozenset[str] | set[str] = frozenset(),
) -> list[Row]:
    """Table rows, in the order of ``runs``; ``baseline`` names the AdamW run; ``tuned``
    the optimizers whose learning rate came from a grid."""
    target = float(mean_curve(runs[baseline], "valid")[-1])
    rows = []
    for name, run in runs.items():
        steps = run.curves[0].steps
        train = np.array([curve.train[-1] for curve in run.curves])
        valid = np.array([curve.valid[-1] for curve in run.curves])
        rows.append(
            Row(
                optimizer=name,
                baseline=name == baseline,
                learning_rate=(learning_rates or {}).get(name),
                tuned=name in tuned,
                train_window=steps[-1] - steps[-2] if len(steps) > 1 else 0,
                train_mean=float(train.mean()),
                train_std=float(train.std()),
                valid_mean=float(valid.mean()),
                valid_std=float(valid.std()),
                steps_to_baseline=steps_to_reach(run, target),
                ms_per_step=run.ms_per_step,
                state_bytes_per_param=run.state_bytes_per_param,
                seeds=len(run.curves),
            )
        )
    return rows


def _loss(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.4f}" if seeds == 1 else f"{mean:.4f} ± {std:.4f}"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.3g}"


def _columns(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *lines]
    )


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table, one line per optimizer; the baseline is marked. The training
    loss is the mean over the last evaluation interval, the validation loss the final one."""
    baseline = next(row.optimizer for row in rows if row.baseline)
    header = [
        "optimizer",
        "tuned lr" if any(row.tuned for row in rows) else "lr",
        f"train loss, last {rows[0].train_window} steps",
        "valid loss",
        f"steps to {baseline}",
        "ms/step",
        "state B/param",
    ]
    lines = [
        [
            row.optimizer + (" (baseline)" if row.baseline else ""),
            _rate(row.learning_rate),
            _loss(row.train_mean, row.train_std, row.seeds),
            _loss(row.valid_mean, row.valid_std, row.seeds),
            "-" if row.steps_to_baseline is None else str(row.steps_to_baseline),
            f"{row.ms_per_step:.2f}",
            f"{row.state_bytes_per_param:.2f}",
        ]
        for row in rows
    ]
    return _columns(header, lines)


def format_sensitivity(tunings: Mapping[str, Tuning | None]) -> str:
    """Final validation loss (mean over seeds) at each rate of each optimizer's grid, by
    the rate's factor from the optimizer's default; the best is marked ``*``.

    Examples:
      >>> from varjax.compare.tune import GridPoint
      >>> grid = [GridPoint(1e-3, 2.5, [2.5], 2.4), GridPoint(3e-3, 2.1, [2.1], 2.0)]
      >>> print(format_sensitivity({"adamw": Tuning(1e-3, grid, 3e-3, 100, 4.8)}))
      optimizer  default lr  x1      x3
      adamw      0.001       2.5000  2.1000*
    """
    tuned = {name: t for name, t in tunings.items() if t is not None}
    if not tuned:
        return ""
    factors = sorted(
        {f"{p.learning_rate / t.default_rate:.2g}" for t in tuned.values() for p in t.points},
        key=float,
    )
    header = ["optimizer", "default lr", *(f"x{f}" for f in factors)]
    lines = []
    for name, tuning in tuned.items():
        cells = dict.fromkeys(factors, "")
        for point in tuning.points:
            mark = "*" if point.learning_rate == tuning.best_rate else ""
            cells[f"{point.learning_rate / tuning.default_rate:.2g}"] = f"{point.valid:.4f}{mark}"
        lines.append([name, _rate(tuning.default_rate), *cells.values()])
    return _columns(header, lines)


def write_csv(rows: Sequence[Row], path: pathlib.Path) -> None:
    """The table as CSV (empty ``steps_to_baseline`` where the target was never reached)."""
    fields = [field.name for field in dataclasses.fields(Row)]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            values = dataclasses.asdict(row)
            writer.writerow({k: "" if v is None else v for k, v in values.items()})


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(record: Mapping[str, Any], path: pathlib.Path) -> None:
    """``record`` as JSON; non-finite losses become ``null``, unknown objects ``repr``."""
    path.write_text(json.dumps(_finite(dict(record)), indent=1, default=repr) + "\n")


def plot_curves(
    runs: Mapping[str, OptimizerRun], path: pathlib.Path, title: str, baseline: str = ""
) -> None:
    """Training and validation loss against step, one colour (and dash) per optimizer:
    the mean over seeds, shaded between the lowest and highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (name, run) in enumerate(runs.items()):
        steps = run.curves[0].steps
        style = {"color": f"C{i % 10}", "ls": ("-", "--", "-.", ":")[i % 4], "lw": 1.5}
        label = name + (" (baseline)" if name == baseline else "")
        for ax, which in zip(axes, ("train", "valid"), strict=True):
            values = np.array([getattr(curve, which) for curve in run.curves])
            ax.plot(steps, values.mean(axis=0), label=label, **style)
            if len(values) > 1:
                ax.fill_between(
                    steps, values.min(0), values.max(0), color=style["color"], alpha=0.2
                )
    axes[0].set_title("training loss (mean since the previous point)", fontsize=10)
    axes[1].set_title("validation loss", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (mean over seeds; shade: min to max)")
    _limits(axes[0], runs)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _limits(ax: Any, runs: Mapping[str, OptimizerRun]) -> None:
    """From just below the lowest loss to just above the highest loss at step 0, which is
    drawn; a run that diverges above its starting loss leaves the top of the plot."""
    values = [
        v
        for run in runs.values()
        for curve in run.curves
        for v in curve.train + curve.valid
        if math.isfinite(v)
    ]
    starts = [
        v
        for run in runs.values()
        for curve in run.curves
        for v in (curve.train[0], curve.valid[0])
        if math.isfinite(v)
    ]
    if values and starts:
        low, high = min(values), max(starts)
        if high > low:
            ax.set_ylim(low - 0.04 * (high - low), high + 0.04 * (high - low))


def plot_sensitivity(tunings: Mapping[str, Tuning | None], path: pathlib.Path, title: str) -> None:
    """Final validation loss against learning rate (log axis), one line per tuned
    optimizer, its best rate circled. A rate that ends above the loss before training,
    or diverges (a non-finite loss), is an ``x`` on the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = {name: t for name, t in tunings.items() if t is not None}
    starts = [t.initial_valid for t in tuned.values() if math.isfinite(t.initial_valid)]
    start = max(starts) if starts else math.inf
    below = [
        p.valid
        for t in tuned.values()
        for p in t.points
        if math.isfinite(p.valid) and p.valid <= start
    ]
    top = max(below) if below else (start if math.isfinite(start) else 1.0)
    low = min([*below, top])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, tuning) in enumerate(tuned.items()):
        style = {"color": f"C{i % 10}", "ls": ("-", "--", "-.", ":")[i % 4]}
        good = [p for p in tuning.points if math.isfinite(p.valid) and p.valid <= start]
        bad = [p.learning_rate for p in tuning.points if p not in good]
        ax.plot(
            [p.learning_rate for p in good], [p.valid for p in good], marker=".", label=name,
            **style,
        )  # fmt: skip
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=style["color"], ms=8)
        best = [p for p in good if p.learning_rate == tuning.best_rate]
        if best:
            ax.plot([best[0].learning_rate], [best[0].valid], "o", mfc="none", ms=10, **style)
    ax.set_xscale("log")
    if top > low:
        ax.set_ylim(low - 0.05 * (top - low), top + 0.05 * (top - low))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (mean over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(
        "\n".join(
            [*textwrap.wrap(title, 90), "circle: best rate; x at the top: diverged or above the "
             "loss before training"]
        ),
        fontsize=8,
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class ProgressBar:
    """A one-line progress bar on ``stream`` (standard error), redrawn on each update.

    On a terminal the line is rewritten in place; otherwise (a log file, a pipe)
    only each optimizer's final line is written.

    Examples:
      >>> import io
      >>> bar = ProgressBar(total=4, stream=io.StringIO(), width=8)
      >>> bar.update(2, "adamw seed 0", "valid 2.5000")
      >>> bar.stream.getvalue()
      ''
      >>> bar.update(4, "adamw seed 0", "valid 2.0000", final=True)
      >>> bar.stream.getvalue()
      '[########] 100% adamw seed 0 valid 2.0000 (0s)\\n'
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(total, 1)
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int, label: str, note: str = "", *, final: bool = False) -> None:
        """Show ``done`` of ``total`` steps; ``final`` ends the line when not on a terminal."""
        if not (self.tty or final):
            return
        filled = round(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"[{bar}] {100 * done / self.total:3.0f}% {label} {note} ({elapsed:.0f}s)"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
