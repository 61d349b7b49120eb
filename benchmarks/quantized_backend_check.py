"""Do the quantized optimizers give the same bits on this machine's default backend
(a GPU) as on the CPU?

For each quantized alias, 50 jitted, donated ``update`` + ``optax.apply_updates``
steps on a small transformer-like tree, once on the default device and once on
the CPU, from the same parameters and gradients. Reported: the share of stored
codes (8-bit codes, packed 4-bit bytes) that differ, the largest relative
difference of the block scales, and the parameters' largest difference in
units of their mean change from the start (float32 arithmetic may round
differently on the two backends, and a code can flip at a rounding tie, so
small shares are expected; a broken kernel shows as a large share).

Rerun: ``python benchmarks/quantized_backend_check.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bf16_backend_check import run
from step_time import machine, write_results

import varjax

STEPS = 50
SHAPES = {"embed": (512, 256), "attn": (256, 768), "mlp": (256, 1088), "scale": (256,)}
OPTIMIZERS = {
    "adamw_8bit": lambda: varjax.adamw_8bit(1e-3, weight_decay=0.01),
    "adamw_4bit": lambda: varjax.adamw_4bit(1e-3, weight_decay=0.01),
    "lion_8bit": lambda: varjax.lion_8bit(1e-4),
    "ademamix_8bit": lambda: varjax.ademamix_8bit(1e-3),
    "quantize_state(optax.adam)": lambda: optax.chain(
        varjax.quantize_state(optax.scale_by_adam()), optax.scale(-1e-3)
    ),
}


def compare(a, b) -> dict:
    """Largest disagreement between two trees of the same structure, by kind of leaf."""
    codes = [0, 0]
    scale_err = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype == np.uint8:
            codes[0] += int(np.sum(x != y))
            codes[1] += x.size
        elif np.issubdtype(x.dtype, np.floating) and x.size:
            denom = np.maximum(np.abs(y), np.finfo(np.float32).tiny)
            scale_err = max(scale_err, float(np.max(np.abs(x - y) / denom)))
    return {"codes_differ": codes[0] / max(codes[1], 1), "float_state_max_rel": scale_err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    default, cpu = jax.devices()[0], jax.devices("cpu")[0]
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(0.02 * rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
    grads = [
        {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
        for _ in range(STEPS)
    ]
    rows = []
    for name, make in OPTIMIZERS.items():
        p_dev, s_dev = run(make(), params, grads, default, steps=STEPS)
        p_cpu, s_cpu = run(make(), params, grads, cpu, steps=STEPS)
        moved = np.mean(
            [np.mean(np.abs(np.asarray(p_cpu[k]) - np.asarray(params[k]))) for k in SHAPES]
        )
        gap = max(
            float(np.max(np.abs(np.asarray(p_dev[k]) - np.asarray(p_cpu[k])))) for k in SHAPES
        )
        row = {"optimizer": name, **compare(s_dev, s_cpu), "params_max_gap": float(gap / moved)}
        rows.append(row)
        print(row, flush=True)
    info = machine()
    lines = [
        f"# Quantized state: {info['platform']} ({info['device']}) against the CPU",
        "",
        f"- {info['device']}; jax {info['jax']}, optax {info['optax']}, {info['date']}",
        f"- {STEPS} jitted, donated steps on {SHAPES}; params gap = largest |difference| over "
        "the mean |change| from the start",
        "",
        "| optimizer | share of codes that differ | float state, largest relative difference "
        "| params, largest gap |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['optimizer']} | {row['codes_differ']:.2e} | "
            f"{row['float_state_max_rel']:.2e} | {row['params_max_gap']:.2e} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        write_results(
            args.out,
            f"quantized_backend_check_{info['platform']}",
            table,
            {"rows": rows, "machine": info},
        )


if __name__ == "__main__":
    main()
