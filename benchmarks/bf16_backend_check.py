"""Do the bfloat16-weight transforms give the same bits on this machine's default
backend (a GPU) as on the CPU?

XLA may keep values in more precision than their dtype says (``xla_allow_excess_precision``,
on by default): on a GPU it removes a ``float32 -> bfloat16 -> float32`` round trip,
which would make a rounding error computed as ``x - float32(bfloat16(x))`` zero.
For each of ``varjax.low_precision_weights``' roundings this script runs 300
jitted, donated steps of ``update`` + ``optax.apply_updates`` of AdamW on
bfloat16 weights with a learning rate whose late steps are below half an ulp,
once on the default device and once on the CPU, from the same weights and
gradients, and reports:

* the share of weights whose bits differ between the two backends;
* for ``"split"``, whether the reconstructed float32 weights equal those of
  ``optax.adamw`` run on float32 weights on the same device (bit for bit);
* for ``"kahan"``, the largest compensation (zero means the compensation was lost);
* how far each run's float32 view of the weights ends from ``optax.adamw`` on
  float32 weights (mean absolute difference, in units of the float32 run's
  mean absolute change).

Rerun: ``python benchmarks/bf16_backend_check.py`` (prints the table; with
``--out DIR`` also writes ``bf16_backend_check_<platform>.{md,json}``).
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
from step_time import machine, write_results

import varjax
from varjax.precision import combine_float32

STEPS = 300
SHAPE = (256, 1024)


def schedule() -> optax.Schedule:
    # from 1e-3 down to 1e-5: late AdamW steps of about 1e-5 lie far below half an ulp of
    # weights near 1 (2**-9 = 2e-3), where rounding to nearest drops them
    return optax.cosine_decay_schedule(1e-3, STEPS, alpha=1e-2)


def run(
    tx: optax.GradientTransformation, params, grads, device, steps: int = STEPS
) -> tuple[dict, object]:
    """``steps`` jitted, donated steps of ``tx`` on ``device``; the final params and state."""
    # from host copies: donation must not delete the caller's arrays
    params = jax.device_put(jax.tree.map(np.asarray, params), device)
    grads = jax.device_put(grads, device)
    state = jax.jit(tx.init)(params)  # runs where params live

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    for t in range(steps):
        params, state = step(params, state, grads[t])
    return jax.device_get(params), jax.device_get(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    default, cpu = jax.devices()[0], jax.devices("cpu")[0]
    rng = np.random.default_rng(0)
    w32 = {"w": jnp.asarray(1.0 + 0.5 * rng.standard_normal(SHAPE), jnp.float32)}
    noise = [rng.standard_normal(SHAPE) + 0.3 for _ in range(STEPS)]
    adamw = lambda: optax.adamw(schedule(), weight_decay=0.0)  # noqa: E731
    rows = []
    cases = [(r, jnp.bfloat16) for r in ("nearest", "stochastic", "kahan", "split")]
    cases += [(r, jnp.float16) for r in ("nearest", "stochastic", "kahan")]
    for rounding, dtype in cases:
        w16 = jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), w32)
        start32 = jax.tree.map(lambda x: x.astype(jnp.float32), w16)
        grads = [{"w": jnp.asarray(g, dtype)} for g in noise]
        grads32 = [jax.tree.map(lambda x: x.astype(jnp.float32), g) for g in grads]
        fp32_dev, _ = run(adamw(), start32, grads32, default)
        fp32_cpu, _ = run(adamw(), start32, grads32, cpu)
        moved = float(np.mean(np.abs(np.asarray(fp32_dev["w"]) - np.asarray(start32["w"]))))
        tx = lambda rounding=rounding: varjax.low_precision_weights(adamw(), rounding)  # noqa: E731
        out = {}
        for name, device in (("default", default), ("cpu", cpu)):
            p, s = run(tx(), w16, grads, device)
            if rounding == "split":
                view = combine_float32(p["w"], s.low_bits["w"])
            else:
                view = jnp.asarray(p["w"], jnp.float32)
            out[name] = (np.asarray(p["w"]), np.asarray(view), s)
        bits = lambda x: np.asarray(x).view(np.uint16)  # noqa: E731
        differ = float(np.mean(bits(out["default"][0]) != bits(out["cpu"][0])))
        row = {
            "rounding": rounding,
            "dtype": jnp.dtype(dtype).name,
            "bits_differ_default_vs_cpu": differ,
        }
        for name, ref in (("default", fp32_dev), ("cpu", fp32_cpu)):
            gap = np.mean(np.abs(out[name][1] - np.asarray(ref["w"]))) / moved
            row[f"gap_to_fp32_{name}"] = float(gap)
        if rounding == "split":
            for name, ref in (("default", fp32_dev), ("cpu", fp32_cpu)):
                a = out[name][1].view(np.int32).astype(np.int64)
                b = np.asarray(ref["w"]).view(np.int32).astype(np.int64)
                row[f"split_share_differing_from_fp32_{name}"] = float(np.mean(a != b))
                row[f"split_max_ulps_from_fp32_{name}"] = int(np.max(np.abs(a - b)))
        if rounding == "kahan":
            for name in ("default", "cpu"):
                comp = out[name][2][-1].compensation["w"]
                row[f"max_compensation_{name}"] = float(
                    np.max(np.abs(np.asarray(comp, np.float32)))
                )
        rows.append(row)
        print(row, flush=True)
    info = machine()
    lines = [
        f"# bfloat16 weights: {info['platform']} ({info['device']}) against the CPU",
        "",
        f"- {info['device']}; jax {info['jax']}, optax {info['optax']}, {info['date']}",
        f"- {STEPS} jitted, donated AdamW steps on {SHAPE} bfloat16 weights; "
        "gap = mean |w - w_fp32| over the float32 run's mean |change|",
        "",
        "| rounding | weights | share of weights whose bits differ | gap, default device "
        "| gap, CPU | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        notes = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in row.items()
            if k.startswith(("split_", "max_"))
        )
        lines.append(
            f"| {row['rounding']} | {row['dtype']} | {row['bits_differ_default_vs_cpu']:.2e} | "
            f"{row['gap_to_fp32_default']:.4f} | {row['gap_to_fp32_cpu']:.4f} | {notes} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        write_results(
            args.out,
            f"bf16_backend_check_{info['platform']}",
            table,
            {"rows": rows, "machine": info},
        )


if __name__ == "__main__":
    main()
