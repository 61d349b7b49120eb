"""Step time of bfloat16-weight AdamW (stochastic rounding, Kahan, split mantissa, 8-bit
state) against plain ``optax.adamw`` on the same bfloat16 weights, in the same run.

Uses ``step_time.py``'s transformer-like shapes and timing: one jitted, donated
``tx.update`` + ``optax.apply_updates`` per step, compiled first, then timed in
interleaved rounds (each configuration in turn, ``--repeats`` rounds of
``--steps`` steps); the table gives the median ms per step, its ratio to the
baseline, and weights + state bytes per parameter. Gradients are bfloat16 for
bfloat16 weights (what a bfloat16 backward pass gives) and float32 for the
float32-weight reference.

Rerun (from the repository root; writes
``results/bf16_step_time_<platform><tag>.{md,json}``):

    JAX_PLATFORMS=cpu python benchmarks/bf16_step_time.py --params 5e6     # CPU
    python benchmarks/bf16_step_time.py --params 250e6 --tag _h200_250M    # a GPU
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from step_time import Runner, machine, make_tree, shapes_for, write_results

import varjax

LR = 1e-3

CONFIGS = {
    "optax.adamw (bf16 weights, bf16 moments)": (lambda: optax.adamw(LR), jnp.bfloat16),
    "optax.adamw (fp32 weights)": (lambda: optax.adamw(LR), jnp.float32),
    "bf16_adamw nearest": (lambda: varjax.bf16_adamw(LR, rounding="nearest"), jnp.bfloat16),
    "bf16_adamw stochastic": (lambda: varjax.bf16_adamw(LR, rounding="stochastic"), jnp.bfloat16),
    "bf16_adamw kahan": (lambda: varjax.bf16_adamw(LR, rounding="kahan"), jnp.bfloat16),
    "bf16_adamw split": (lambda: varjax.bf16_adamw(LR, rounding="split"), jnp.bfloat16),
    "bf16_adamw_8bit stochastic": (
        lambda: varjax.bf16_adamw_8bit(LR, rounding="stochastic"),
        jnp.bfloat16,
    ),
    "bf16_adamw_8bit split": (lambda: varjax.bf16_adamw_8bit(LR, rounding="split"), jnp.bfloat16),
}
BASELINE = "optax.adamw (bf16 weights, bf16 moments)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=5e6, help="target parameter count")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results"
    )
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()

    shapes = shapes_for(int(args.params))
    params32 = make_tree(shapes, 0)
    grads32 = make_tree(shapes, 1)
    n = sum(x.size for x in jax.tree.leaves(params32))
    info = machine()
    print(f"{n:,} parameters on {info['platform']} ({info['device']})", flush=True)
    names = [k for k in CONFIGS if not args.only or k in args.only.split(",") or k == BASELINE]
    runners = {}
    for name in names:
        make, dtype = CONFIGS[name]
        cast = lambda tree, dtype=dtype: jax.tree.map(lambda x: x.astype(dtype), tree)  # noqa: E731
        runners[name] = Runner(make(), cast(params32), cast(grads32))
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(runners[name].run(args.steps))
    base_ms = 1e3 * statistics.median(times[BASELINE])
    rows = []
    for name in names:
        r = runners[name]
        weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(r.params))
        ms = 1e3 * statistics.median(times[name])
        rows.append(
            {
                "configuration": name,
                "ms": ms,
                "ratio": ms / base_ms,
                "weights_bytes_per_param": weights / n,
                "state_bytes_per_param": r.state_bytes / n,
                "raw_seconds": times[name],
            }
        )
    lines = [
        "# Step time: AdamW on bfloat16 weights",
        "",
        f"- machine: {info['platform']} / {info['device']} / {info['cpu']} / "
        f"{info['cores']} cores; jax {info['jax']}, optax {info['optax']}, {info['date']}",
        f"- {n:,} parameters (step_time.py's transformer-like shapes), median of "
        f"{args.repeats} interleaved rounds of {args.steps} steps",
        f"- time: one jitted, donated `update` + `apply_updates`; ratio = to {BASELINE}",
        "",
        "| configuration | ms/step | ratio | weights B/param | state B/param | total B/param |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        total = row["weights_bytes_per_param"] + row["state_bytes_per_param"]
        lines.append(
            f"| {row['configuration']} | {row['ms']:.3f} | {row['ratio']:.2f} | "
            f"{row['weights_bytes_per_param']:.2f} | {row['state_bytes_per_param']:.2f} | "
            f"{total:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    record = {"machine": info, "n_params": n, "args": vars(args) | {"out": str(args.out)}}
    record["rows"] = rows
    write_results(args.out, f"bf16_step_time_{info['platform']}{args.tag}", table, record)


if __name__ == "__main__":
    main()
