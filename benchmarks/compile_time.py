"""Compile time of a jitted training step: varjax's quantized optimizers against Optax.

The step is the one of ``step_time.py``: one jitted, donated ``tx.update`` +
``optax.apply_updates`` on a pytree of transformer-like shapes (138 leaves at
18.5M parameters). For each optimizer a fresh step function is traced, lowered and
compiled ``--repeats`` times, round-robin over the optimizers (so that drift in
the machine's speed hits all alike), after ``jax.clear_caches()`` and with the
persistent compilation cache off, so that nothing is reused from an earlier
compile. Reported: the median seconds of trace + lower and of XLA's compile, and
the number of HLO instructions of the optimized module (what XLA compiled). One
untimed compile comes first: a process's first compile also pays for setting up
XLA (on the 2-core CPU, `adamw_8bit` took 2.3 s in a first compile against a
median of 1.5 s in later ones).

Rerun (from the repository root):

    JAX_PLATFORMS=cpu python benchmarks/compile_time.py --params 18.5e6

Results go to ``benchmarks/results/compile_time_<platform><tag>.{md,json}``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from step_time import machine, shapes_for, write_results

import varjax

LR = 1e-3

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optax.adamw": lambda: optax.adamw(LR),
    "adamw_8bit": lambda: varjax.adamw_8bit(LR),
    "adamw_4bit": lambda: varjax.adamw_4bit(LR),
    "lion_8bit": lambda: varjax.lion_8bit(LR),
    "ademamix_8bit": lambda: varjax.ademamix_8bit(LR),
    "optax.lion": lambda: optax.lion(LR),
    "optax.contrib.ademamix": lambda: optax.contrib.ademamix(LR),
}


def hlo_instructions(text: str) -> int:
    """The number of instructions (lines ``name = type op(...)``) of an HLO module's text."""
    return sum(1 for line in text.splitlines() if re.match(r"\s*(ROOT )?%?[\w.\-]+ = ", line))


def compile_once(make: Callable[[], optax.GradientTransformation], params, grads) -> dict:
    """Trace, lower and compile a fresh donated step of ``make()``; seconds and HLO size."""
    jax.clear_caches()
    tx = make()
    state = jax.eval_shape(tx.init, params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {
        "lower_s": lowered_at - start,
        "compile_s": done - lowered_at,
        "total_s": done - start,
        "hlo_instructions": hlo_instructions(compiled.as_text()),
        "stablehlo_ops": hlo_instructions(lowered.as_text()),
    }


def to_markdown(info: dict[str, Any], n_params: int, n_leaves: int, rows: list[dict], args) -> str:
    base = next((r for r in rows if r["optimizer"] == "optax.adamw"), None)
    lines = [
        "# Compile time of a jitted, donated step",
        "",
        f"- machine: {info['platform']} / {info['device']} / {info['cpu']} / {info['cores']} cores",
        f"- software: jax {info['jax']}, optax {info['optax']}, varjax {info['varjax']}",
        f"- {n_params:,} parameters in {n_leaves} leaves (step_time.py's shapes), "
        f"median of {args.repeats} fresh compiles each (round-robin), {info['date']}",
        "- trace + lower: `jax.jit(step).lower(...)`; compile: `.compile()`; "
        "ratio = total / optax.adamw's total",
        "",
        "| optimizer | trace + lower s | compile s | total s | ratio | "
        "HLO instructions (optimized) | StableHLO ops |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = f"{r['total_s'] / base['total_s']:.2f}" if base else ""
        lines.append(
            f"| {r['optimizer']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | "
            f"{r['total_s']:.2f} | {ratio} | {r['hlo_instructions']} | {r['stablehlo_ops']} |"
        )
    if info.get("load"):
        lines += ["", f"- load average before / after: {info['load']}"]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--params", type=float, default=18.5e6, help="target parameter count")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated optimizer names")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results"
    )
    parser.add_argument("--tag", default="", help="suffix of the result files")
    return parser.parse_args()


def load() -> str:
    try:
        return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    args = parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    shapes = shapes_for(int(args.params))
    params = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}
    grads = params
    n_params = sum(math.prod(shape) for shape in shapes.values())
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    names = wanted or list(OPTIMIZERS)
    info = machine()
    before = load()
    print(f"{n_params:,} parameters in {len(shapes)} leaves on {info['platform']}", flush=True)
    compile_once(OPTIMIZERS[names[0]], params, grads)  # warm-up: the process's first compile
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            runs[name].append(compile_once(OPTIMIZERS[name], params, grads))
            r = runs[name][-1]
            print(
                f"  {name:<24} lower {r['lower_s']:6.2f} s  compile {r['compile_s']:6.2f} s  "
                f"{r['hlo_instructions']} HLO instructions",
                flush=True,
            )
    info["load"] = f"{before} / {load()}"
    rows = []
    for name in names:
        rows.append(
            {
                "optimizer": name,
                **{
                    k: statistics.median(r[k] for r in runs[name])
                    for k in ("lower_s", "compile_s", "total_s")
                },
                "hlo_instructions": runs[name][-1]["hlo_instructions"],
                "stablehlo_ops": runs[name][-1]["stablehlo_ops"],
                "raw": runs[name],
            }
        )
    table = to_markdown(info, n_params, len(shapes), rows, args)
    print(table)
    record = {
        "machine": info,
        "n_params": n_params,
        "rows": rows,
        "args": vars(args) | {"out": str(args.out)},
    }
    write_results(args.out, f"compile_time_{info['platform']}{args.tag}", table, record)


if __name__ == "__main__":
    main()
