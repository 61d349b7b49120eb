"""Where the time of a many-leaf step goes: kernels per step and their summed device time.

For issue 20. On ``step_time.py``'s transformer tree (``--params``; 138 leaves at
251M), for each optimizer, one jitted, donated ``update`` + ``apply_updates`` step
(``step_time.Runner``) is timed, then traced with ``jax.profiler``: the number of
kernels a step launches and their summed device time (``quantized_profile.kernel_times``).
The step time less the kernel time is what the device spends between kernels: with
many small kernels, their launches.

Rerun (from the repository root, on the GPU machine):

    python benchmarks/leaves_profile.py --params 251e6 --out benchmarks/results --tag _h100
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import jax
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from quantized_profile import kernels_by_kind
from step_time import LR, Runner, machine, shapes_for, write_results

import varjax

OPTIMIZERS = {
    "optax.adamw": lambda: optax.adamw(LR),
    "adamw_8bit": lambda: varjax.adamw_8bit(LR),
    "adamw_4bit": lambda: varjax.adamw_4bit(LR),
    "optax.lion": lambda: optax.lion(LR),
    "lion_8bit": lambda: varjax.lion_8bit(LR),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--params", type=float, default=251e6)
    parser.add_argument("--only", default=",".join(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/leaves_profile"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    shapes = shapes_for(int(args.params))
    keys = jax.random.split(jax.random.key(0), len(shapes))
    params = {
        k: 0.02 * jax.random.normal(key, s)
        for key, (k, s) in zip(keys, shapes.items(), strict=True)
    }
    grads = jax.tree.map(lambda p: 0.1 * p + 1e-3, params)
    n = sum(p.size for p in jax.tree.leaves(params))
    rows = []
    for name in args.only.split(","):
        runner = Runner(OPTIMIZERS[name](), params, grads)
        ms = 1e3 * statistics.median(runner.run(args.steps) for _ in range(5))
        kinds = kernels_by_kind(runner, args.out / f"trace_{name}", args.steps)
        count, us = (sum(k[j] for k in kinds.values()) for j in (0, 1))
        row = {"optimizer": name, "step_ms": ms, "kernels": count, "kernel_ms": us / 1e3}
        row["kinds"] = {kind: {"kernels": c, "ms": t / 1e3} for kind, (c, t) in kinds.items()}
        rows.append(row)
        print(
            f"{name:<14} step {ms:6.3f} ms  {count:5.0f} kernels  {us / 1e3:6.3f} ms in kernels"
            f"  {ms - us / 1e3:6.3f} ms between",
            flush=True,
        )
        del runner
    info = machine()
    lines = [
        "# Kernels of a many-leaf step",
        "",
        f"- machine: {info['platform']} / {info['device']} / {info['cpu']} / {info['cores']} cores",
        f"- software: jax {info['jax']}, optax {info['optax']}, varjax {info['varjax']}, "
        f"{info['date']}",
        f"- tree: step_time.py's transformer, {len(shapes)} leaves, {n:,} float32 parameters",
        "- step: median of 5 rounds of "
        f"{args.steps} steps; kernels: per step, from a jax.profiler trace of {args.steps} steps",
        "",
        "| optimizer | step ms | kernels a step | ms in kernels | ms between kernels |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['step_ms']:.3f} | {r['kernels']:.0f} | "
            f"{r['kernel_ms']:.3f} | {r['step_ms'] - r['kernel_ms']:.3f} |"
        )
    lines += ["", "Kernels by kind (fusion names without their numbers), the five slowest:", ""]
    lines += ["| optimizer | kind | kernels a step | ms |", "| --- | --- | ---: | ---: |"]
    for r in rows:
        for kind, k in list(r["kinds"].items())[:5]:
            lines.append(f"| {r['optimizer']} | {kind} | {k['kernels']:.0f} | {k['ms']:.3f} |")
    stem = f"leaves_profile_{info['platform']}{args.tag}"
    write_results(args.out, stem, "\n".join(lines) + "\n", {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
