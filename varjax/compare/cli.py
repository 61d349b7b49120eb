"""The command line of ``python -m varjax compare`` (also plain ``python -m varjax``).

Errors found before training (an unknown optimizer, a bad hyper-parameter or
option, an unwritable output folder) print one line on standard error and exit
with status 2.

Examples:
  >>> parse_seeds("0,1,2")
  [0, 1, 2]
  >>> args = parse_args(["--task", "regression", "--steps", "100"])
  >>> args.task, args.steps, args.batch_size, args.eval_every
  ('regression', 100, 64, 5)
  >>> args = parse_args(["--preset", "gpu", "--tune"])
  >>> args.task, args.size, args.steps, args.batch_size, args.learning_rate, args.tune_steps
  ('charlm', 'gpu', 1000, 32, 0.0005, 1000)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

import varjax
from varjax.compare import report, spec, tune
from varjax.compare.tasks import DEFAULTS, PRESETS, TASKS, Task, build_task
from varjax.compare.train import OptimizerRun, Progress, RateTrainer, check_optimizer, train

__all__ = [
    "BASELINE",
    "DEFAULT_OPTIMIZERS",
    "EVALUATIONS",
    "Entry",
    "UsageError",
    "main",
    "parse_args",
    "parse_seeds",
]

PROG = "python -m varjax compare"
BASELINE = "optax.adamw"
DEFAULT_OPTIMIZERS = "optax.adamw,adamw_8bit,mars_adamw,ademamix,radam"
EVALUATIONS = 20  # the default --eval-every is steps / EVALUATIONS, rounded
TUNE_POINTS, TUNE_SPAN = 5, 10.0


@dataclasses.dataclass(frozen=True)
class Entry:
    """A listed optimizer: its specification, the transformation built from it and the
    keyword arguments it was built with (the learning rate filled in)."""

    spec: spec.OptimizerSpec
    tx: optax.GradientTransformation
    kwargs: dict[str, Any]

    @property
    def rate(self) -> float | None:
        """The learning rate as a number, or ``None`` (learning-rate-free, or a schedule)."""
        rate = self.kwargs.get("learning_rate")
        return float(rate) if isinstance(rate, int | float) and not isinstance(rate, bool) else None


# optimizers by label
Built = dict[str, Entry]

DESCRIPTION = """\
Train a small model with several optimizers and compare them: every optimizer
starts from the same initialisation and sees the same batches for each seed.
Prints a table (learning rate; training loss, the mean over the last
evaluation interval; final validation loss; the first evaluated step at which
the mean validation loss reaches the AdamW baseline's final one; ms per step
after compilation; optimizer-state bytes per parameter) and writes
results.json, results.csv, results.md and curves.png to --out.
With --tune, every optimizer is first trained at each rate of a learning-rate
grid and the table shows it at its best rate; sensitivity.png plots the final
validation loss against the rate.
Plain `python -m varjax` runs this with its defaults."""

EPILOG = """\
tasks:
  charlm      a character-level transformer (2 pre-norm blocks, d_model 64,
              context 64, 0.12M parameters) on 3 MB of Python's standard
              library source (ships with Python: no download); loss in nats/char
  regression  a two-layer GELU MLP on generated data with label noise (MSE)

presets (--preset NAME sets the task, its size and the defaults of --steps,
--batch-size and --learning-rate; options given explicitly still win):
{presets}

learning-rate tuning (--tune):
  each optimizer is trained at --tune-points rates (default {points}) from its
  default rate / --tune-span to its default rate x --tune-span (default {span:g}),
  evenly spaced in log: x0.1, x0.32, x1, x3.2, x10 by default. Each grid run has
  --tune-steps steps (default: --steps) on every seed, so the budget is
  points x tune-steps x seeds steps per optimizer, plus one run of --steps at
  the best rate when --tune-steps differs from --steps. The best rate has the
  lowest final validation loss (mean over seeds), measured on the held-out text
  the table reports: the table shows each optimizer at its best rate for this
  budget. Learning-rate-free optimizers are not tuned.

optimizers:
  A comma-separated list of names from varjax or optax (varjax first:
  `radam` is varjax.radam; `optax.radam`, `optax.contrib.muon` pick the
  library), each optionally followed by `:key=value,...`, e.g.
    --optimizers 'mars_adamw:learning_rate=3e-3,gamma=0.025,optax.adamw:weight_decay=0.1'
  Values are Python literals (3e-3, 10, True, None) or words (norm_scope=global).
  The baseline is `{baseline}` with the task's learning rate; it is added
  when the list lacks it. Names that are not ready optimizers (taking a
  learning_rate) are refused as such: scale_by_* building blocks, varjax.storm
  (it takes k, w, c), varjax.gradient_noise_scale. An optimizer whose update
  needs extra arguments (mars_adamw:exact=True needs previous_grads) is
  refused before training.

default learning rates (when not given):
  the task's AdamW rate (--learning-rate, 3e-3 for both tasks, 5e-4 for the gpu preset) times:
{multipliers}
    1     all others
  learning-rate-free methods (optax.contrib prodigy, dadapt_adamw, dog, dowg,
  cocob, momo, momo_adam) keep their own default.

exit status: 0 done, 2 bad arguments (one line on stderr, nothing trained).
"""


def _epilog() -> str:
    presets = "\n".join(
        f"  {name:<10}  " + "\n              ".join(_wrap(preset.description, 62))
        for name, preset in PRESETS.items()
    )
    return EPILOG.format(
        baseline=BASELINE,
        presets=presets,
        points=TUNE_POINTS,
        span=TUNE_SPAN,
        multipliers=_multipliers(),
    )


def _multipliers() -> str:
    """One line per default-rate multiplier (``spec.RATE_MULTIPLIERS``): why, and who."""
    lines = []
    for factor, reason in spec.RATE_REASONS.items():
        names = [name for name, value in spec.RATE_MULTIPLIERS.items() if value == factor]
        shown = f"1/{round(1 / factor)}" if factor < 1 else f"{factor:g}"
        text = f"{reason}: {', '.join(names)}"
        lines.append(f"    {shown:<5} " + "\n          ".join(_wrap(text, 72)))
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width)


class UsageError(Exception):
    """A problem with the command line or its output folder; exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line ``UsageError``\\ s."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``compare``'s options."""
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--optimizers",
        default=DEFAULT_OPTIMIZERS,
        metavar="LIST",
        help=f"comma-separated optimizer specifications (default: {DEFAULT_OPTIMIZERS})",
    )
    parser.add_argument("--task", choices=TASKS, help="default: charlm")
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="a larger task and budget for an accelerator (see presets below)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="training steps per optimizer and seed (default: 600; gpu preset: 1000)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="sequences (charlm, default 32) or points (regression, default 64) per step",
    )
    parser.add_argument(
        "--seeds",
        default="0",
        metavar="LIST",
        help="comma-separated seeds, e.g. 0,1,2: several give mean and spread (default: 0)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help=(
            "steps between validation losses and progress updates; the loss before the "
            f"first step is always measured (default: steps / {EVALUATIONS}, rounded)"
        ),
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        metavar="LR",
        help=(
            "AdamW's learning rate, from which the others' defaults follow "
            "(default: 3e-3; gpu preset: 5e-4)"
        ),
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="tune each optimizer's learning rate on a log-spaced grid first (see below)",
    )
    parser.add_argument(
        "--tune-points",
        type=int,
        default=TUNE_POINTS,
        metavar="N",
        help=f"learning rates in each optimizer's grid (default: {TUNE_POINTS})",
    )
    parser.add_argument(
        "--tune-span",
        type=float,
        default=TUNE_SPAN,
        metavar="X",
        help=f"the grid runs from the default rate / X to x X (default: {TUNE_SPAN:g})",
    )
    parser.add_argument(
        "--tune-steps",
        type=int,
        metavar="N",
        help="training steps of each grid run (default: --steps)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("varjax-compare"),
        metavar="DIR",
        help=(
            "output folder for results.json, results.csv, results.md, curves.png and, with "
            "--tune, sensitivity.png (default: varjax-compare)"
        ),
    )
    parser.add_argument(
        "--platform",
        choices=["cpu", "gpu", "tpu"],
        help="JAX platform to run on (default: JAX's choice, an accelerator if present)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a much smaller model and data set (smoke tests)"
    )
    return parser


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; distinct non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds: want integers such as 0,1,2, got {text!r}") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds: want distinct non-negative integers, got {text!r}")
    return seeds


def default_eval_every(steps: int) -> int:
    """About ``EVALUATIONS`` evaluations per run.

    Examples:
      >>> default_eval_every(600), default_eval_every(100), default_eval_every(10)
      (30, 5, 1)
    """
    return max(1, round(steps / EVALUATIONS))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the options; fill the task's (or preset's) defaults. Raises
    ``UsageError``."""
    args = build_parser().parse_args(argv)
    args.size = None
    if args.preset is not None:
        preset = PRESETS[args.preset]
        if args.task not in (None, preset.task):
            raise UsageError(f"--preset {args.preset} is a {preset.task} task, not {args.task}")
        if args.tiny:
            raise UsageError(f"--preset {args.preset} and --tiny exclude each other")
        args.task, args.size, defaults = preset.task, preset.size, preset.defaults
    else:
        args.task = args.task or "charlm"
        defaults = DEFAULTS[args.task]
    for flag in ("steps", "batch_size", "learning_rate"):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(defaults, flag))
    if args.eval_every is None:
        args.eval_every = default_eval_every(args.steps)
    if args.tune_steps is None:
        args.tune_steps = args.steps
    for flag in ("steps", "batch_size", "eval_every", "tune_points", "tune_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.learning_rate > 0:
        raise UsageError("--learning-rate must be positive")
    if not args.tune_span >= 1:
        raise UsageError("--tune-span must be at least 1")
    args.eval_every = min(args.eval_every, args.steps)
    args.seeds = parse_seeds(args.seeds)
    return args


def select_platform(name: str | None) -> None:
    """Make JAX use ``name`` (before anything starts a backend) and check that it works."""
    if name is not None:
        jax.config.update("jax_platforms", name)
    try:
        jax.devices()
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise UsageError(f"--platform {name}: JAX cannot use it here ({first})") from None


def prepare_output(out: pathlib.Path) -> pathlib.Path:
    """Create ``out`` and check that a file can be written in it."""
    probe = out / ".varjax-compare-probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--out {out}: cannot write there ({error.strerror or error})") from None
    return out


def build_optimizers(text: str, base_rate: float) -> tuple[Built, str]:
    """Build every listed optimizer (and the baseline) once; return them by label, and
    the baseline's label."""
    specs = spec.parse_specs(text)
    if not any(s.label == BASELINE for s in specs):
        specs.insert(0, spec.OptimizerSpec(BASELINE))
    built = {s.label: Entry(s, *spec.build_optimizer(s, base_rate)) for s in specs}
    return built, BASELINE


def at_rate(entry: Entry, rate: float, base_rate: float) -> optax.GradientTransformation:
    """``entry``'s optimizer rebuilt with ``learning_rate=rate``."""
    kwargs = {**entry.spec.kwargs, "learning_rate": rate}
    tx, _ = spec.build_optimizer(dataclasses.replace(entry.spec, kwargs=kwargs), base_rate)
    return tx


def machine_info() -> dict[str, Any]:
    """Where the run happened: platform, device kind and count, versions, CPU count."""
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "varjax": varjax.__version__,
        "python": platform.python_version(),
        "system": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": _load(),
    }


def _load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other processes share the CPU), if known."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def check_all(task: Task, optimizers: Built) -> None:
    """Trace one update of every optimizer, so that none fails after others have trained."""
    for label, entry in optimizers.items():
        try:
            check_optimizer(task, entry.tx)
        except (ValueError, TypeError) as error:
            raise spec.SpecError(f"{label}: cannot run here: {error}") from None


def run(args: argparse.Namespace) -> int:
    """Check everything, train (and tune) every optimizer on every seed, then report."""
    select_platform(args.platform)
    optimizers, baseline = build_optimizers(args.optimizers, args.learning_rate)
    out = prepare_output(args.out)
    task = build_task(args.task, tiny=args.tiny, size=args.size)
    check_all(task, optimizers)
    machine = machine_info()
    tuning = f"; tuning {args.tune_points} rates x {args.tune_steps} steps" if args.tune else ""
    print(
        f"varjax {varjax.__version__} compare on {machine['platform']} "
        f"({machine['device_kind']}): {task.summary}, {task.n_params:,} parameters; "
        f"{args.steps} steps, batch {args.batch_size}, seeds {','.join(map(str, args.seeds))}"
        f"{tuning}",
        flush=True,
    )
    start = time.perf_counter()
    runs, tunings = train_all(task, optimizers, args)
    wall = time.perf_counter() - start
    machine["load_average_at_end"] = _load()
    rates = {
        label: tunings[label].best_rate if tunings.get(label) else entry.kwargs.get("learning_rate")
        for label, entry in optimizers.items()
    }
    tuned = {label for label, t in tunings.items() if t is not None}
    rows = report.summarize(runs, baseline, rates, tuned)
    table = report.format_table(rows)
    sensitivity = report.format_sensitivity(tunings)
    notes = tuning_notes(args, optimizers, tunings)
    print("\n" + table)
    if args.tune:
        print("\nfinal validation loss by learning rate (x: factor of the default rate)")
        print(sensitivity + "".join("\n" + note for note in notes))
    record = build_record(args, task, optimizers, baseline, runs, rows, tunings)
    record.update(machine=machine, wall_seconds=wall)
    names = ["results.json", "results.csv", "results.md", "curves.png"]
    paths = [out / name for name in names] + ([out / "sensitivity.png"] if args.tune else [])
    report.write_json(record, paths[0])
    report.write_csv(rows, paths[1])
    paths[2].write_text(markdown(args, task, machine, wall, table, sensitivity, notes))
    title = f"{task.summary}; {args.steps} steps, batch {args.batch_size}"
    report.plot_curves(runs, paths[3], title + (" (tuned rates)" if args.tune else ""), baseline)
    if args.tune:
        grid_title = f"{task.summary}; {args.tune_steps} steps, batch {args.batch_size}"
        report.plot_sensitivity(tunings, paths[4], grid_title)
    print(f"\nwrote {', '.join(str(p) for p in paths)} ({wall:.0f}s of training)")
    return 0


def tuning_notes(
    args: argparse.Namespace, optimizers: Built, tunings: dict[str, tune.Tuning | None]
) -> list[str]:
    """Lines on what was not tuned and which best rates lie at the grid's edge."""
    if not args.tune:
        return []
    untuned = [label for label in optimizers if tunings.get(label) is None]
    edge = [label for label, t in tunings.items() if t is not None and t.at_edge]
    notes = []
    if untuned:
        notes.append(f"not tuned (no numeric learning_rate): {', '.join(untuned)}")
    if edge:
        notes.append(
            f"best rate at the grid's edge (a wider --tune-span may do better): {', '.join(edge)}"
        )
    return notes


def markdown(
    args: argparse.Namespace,
    task: Task,
    machine: dict[str, Any],
    wall: float,
    table: str,
    sensitivity: str,
    notes: list[str],
) -> str:
    """``results.md``: the command, machine and settings, the table and the grid."""
    lines = [
        f"# {PROG}",
        "",
        f"- command: `{' '.join([PROG, *args.argv])}`",
        f"- machine: {machine['platform']} / {machine['device_kind']} / "
        f"{machine['cpu_count']} CPUs (load average at start {machine['load_average_at_start']}, "
        f"at end {machine['load_average_at_end']}); jax {machine['jax']}, "
        f"varjax {machine['varjax']}",
        f"- task: {task.summary}, {task.n_params:,} parameters",
        f"- {args.steps} steps, batch {args.batch_size}, evaluation every {args.eval_every} "
        f"steps, seeds {','.join(map(str, args.seeds))}; {wall:.0f} s of training",
    ]
    if args.tune:
        lines.append(
            f"- tuning: {args.tune_points} learning rates per optimizer, its default / "
            f"{args.tune_span:g} to x {args.tune_span:g} (log-spaced), {args.tune_steps} steps "
            "each; best = lowest final validation loss"
        )
    lines += ["", "```", table, "```"]
    if args.tune:
        lines += ["", "Final validation loss by learning rate (factor of the default rate):"]
        lines += ["", "```", sensitivity, *notes, "```"]
    return "\n".join(lines) + "\n"


def build_record(
    args: argparse.Namespace,
    task: Task,
    optimizers: Built,
    baseline: str,
    runs: dict[str, OptimizerRun],
    rows: list[report.Row],
    tunings: dict[str, tune.Tuning | None],
) -> dict[str, Any]:
    """The content of ``results.json``: settings, task, table, every curve and grid."""
    record = {
        "varjax_version": varjax.__version__,
        "command": [PROG, *args.argv],
        "settings": {
            "task": args.task,
            "preset": args.preset,
            "tiny": args.tiny,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "eval_every": args.eval_every,
            "seeds": args.seeds,
            "base_learning_rate": args.learning_rate,
            "baseline": baseline,
            "optimizers": {label: entry.kwargs for label, entry in optimizers.items()},
            "tune": args.tune,
        },
        "task": {"name": task.name, "summary": task.summary, "n_params": task.n_params} | task.info,
        "table": [dataclasses.asdict(row) for row in rows],
        "results": {label: _run_record(run) for label, run in runs.items()},
    }
    if args.tune:
        record["settings"].update(
            tune_points=args.tune_points, tune_span=args.tune_span, tune_steps=args.tune_steps
        )
        record["tuning"] = {
            label: None if t is None else dataclasses.asdict(t) | {"at_edge": t.at_edge}
            for label, t in tunings.items()
        }
    return record


class _Steps:
    """Training steps done so far, for the progress bar."""

    def __init__(self, total: int) -> None:
        self.bar = report.ProgressBar(total=total)
        self.done = 0

    def train(
        self,
        args: argparse.Namespace,
        label: str,
        runner: Callable[[Progress], OptimizerRun],
        steps: int,
        note: str = "",
    ) -> OptimizerRun:
        """``runner(progress)`` trains ``steps`` steps per seed; advance the bar with it."""
        offset = self.done

        def progress(done: int, seed: int, valid: float) -> None:
            at = offset + args.seeds.index(seed) * steps + done
            self.bar.update(at, f"{label}{note} seed {seed}", f"valid {valid:.4f}")

        result = runner(progress)
        self.done = offset + steps * len(args.seeds)
        final = report.mean_curve(result, "valid")[-1]
        self.bar.update(
            self.done,
            f"{label}{note}",
            f"valid {final:.4f}, {result.ms_per_step:.1f} ms/step",
            final=True,
        )
        return result


def train_all(
    task: Task, optimizers: Built, args: argparse.Namespace
) -> tuple[dict[str, OptimizerRun], dict[str, tune.Tuning | None]]:
    """Train each optimizer on each seed (with --tune: at each rate of its grid first),
    with a progress bar on standard error."""
    tunable = {label for label, entry in optimizers.items() if args.tune and entry.rate}
    retrain = args.tune_steps != args.steps
    total = sum(
        args.tune_points * args.tune_steps + args.steps * retrain
        if label in tunable
        else args.steps
        for label in optimizers
    )
    bar = _Steps(total * len(args.seeds))
    settings = {"batch_size": args.batch_size, "seeds": args.seeds}
    runs: dict[str, OptimizerRun] = {}
    tunings: dict[str, tune.Tuning | None] = {}
    for label, entry in optimizers.items():
        if label not in tunable:
            runs[label] = bar.train(
                args,
                label,
                lambda p, entry=entry: train(
                    task, entry.tx, steps=args.steps, eval_every=args.eval_every, progress=p,
                    **settings,
                ),
                args.steps,
            )  # fmt: skip
            tunings[label] = None
            continue
        assert entry.rate is not None
        trainer = RateTrainer(
            task,
            lambda rate, entry=entry: at_rate(entry, rate, args.learning_rate),
            steps=args.tune_steps,
            eval_every=min(args.eval_every, args.tune_steps),
            **settings,
        )
        grid = tune.rate_grid(entry.rate, points=args.tune_points, span=args.tune_span)
        grid_runs = {
            rate: bar.train(
                args,
                label,
                lambda p, r=rate, t=trainer: t(r, p),
                args.tune_steps,
                f" lr {rate:.3g}",
            )
            for rate in grid
        }
        points = [_grid_point(rate, run) for rate, run in grid_runs.items()]
        best = tune.best_point(points).learning_rate
        initial = float(report.mean_curve(grid_runs[best], "valid")[0])
        tunings[label] = tune.Tuning(entry.rate, points, best, args.tune_steps, initial)
        if retrain:
            tx = at_rate(entry, best, args.learning_rate)
            runs[label] = bar.train(
                args,
                label,
                lambda p, tx=tx: train(
                    task, tx, steps=args.steps, eval_every=args.eval_every, progress=p, **settings
                ),
                args.steps,
                " at the best rate",
            )
        else:
            runs[label] = grid_runs[best]
    return runs, tunings


def _grid_point(rate: float, run: OptimizerRun) -> tune.GridPoint:
    valid = [curve.valid[-1] for curve in run.curves]
    train_losses = [curve.train[-1] for curve in run.curves]
    return tune.GridPoint(rate, float(np.mean(valid)), valid, float(np.mean(train_losses)))


def _run_record(run: OptimizerRun) -> dict[str, Any]:
    return {
        "curves": [dataclasses.asdict(curve) for curve in run.curves],
        "ms_per_step": run.ms_per_step,
        "compile_seconds": run.compile_seconds,
        "state_bytes": run.state_bytes,
        "state_bytes_per_param": run.state_bytes_per_param,
        "n_params": run.n_params,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``[compare] [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        argv = argv[1:]
    try:
        if argv and not argv[0].startswith("-"):
            raise UsageError(f"unknown command {argv[0]!r} (the command is compare, the default)")
        args = parse_args(argv)
        args.argv = argv
        return run(args)
    except (UsageError, spec.SpecError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
