"""Device memory of a training step: Optax AdamW against varjax's quantized optimizers.

Each optimizer runs in its own process (a subprocess of this script), so that one
allocator's peak is not inherited by the next. There, the parameters and a gradient
are made on the device, the state comes from a jitted ``tx.init`` and a few steps of
one jitted, donated ``tx.update`` + ``optax.apply_updates`` run. Reported per
parameter: XLA's temporaries for the step (``compiled.memory_analysis()``, on any
platform), the stored state, and on a GPU the allocator's peak
(``device.memory_stats()["peak_bytes_in_use"]``) after the steps. The ideal peak of
a donated step is parameters + gradient + stored state: 16 bytes per parameter for
float32 AdamW, about 10.04 for ``adamw_8bit``.

Modes:

- ``--mode measure`` (default): every optimizer on the transformer-like shapes of
  ``step_time.py`` (``--params`` parameters, 138 leaves at 18.5M) or, with
  ``--tree large``, on ``--leaves`` large leaves of ``--cols`` columns.
- ``--mode oom``: the model size is computed from the device's memory
  (``bytes_limit`` of ``memory_stats``; ``--device-bytes`` elsewhere) so that the
  float32 ``optax.adamw`` state and step cannot fit (16 bytes per parameter) while
  the quantized ones should: ``--oom-bytes-per-param`` (default 13) bytes per
  parameter of device memory. It reports which optimizers ran ``--steps`` steps
  and which ran out of memory, and where (init or step).

Rerun (from the repository root):

    JAX_PLATFORMS=cpu python benchmarks/memory.py --params 2e6 --steps 2     # CPU, quick
    python benchmarks/memory.py --params 251e6 --tag _251M                  # GPU
    python benchmarks/memory.py --mode oom --steps 3 --tag _oom             # GPU, ~10B

Results go to ``benchmarks/results/memory_<platform><tag>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from step_time import large_shapes, machine, shapes_for, write_results

import varjax
from varjax.quantization import quantize_state, wrapper

LR = 1e-3

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optax.adamw": lambda: optax.adamw(LR),
    "adam_8bit": lambda: varjax.adam_8bit(LR),
    "adamw_8bit": lambda: varjax.adamw_8bit(LR),
    "adamw_4bit": lambda: varjax.adamw_4bit(LR),
    "lion_8bit": lambda: varjax.lion_8bit(LR),
    "lion_4bit": lambda: varjax.lion_4bit(LR),
    "ademamix_8bit": lambda: varjax.ademamix_8bit(LR),
    "ademamix_4bit": lambda: varjax.ademamix_4bit(LR),
    "quantize_state(optax.scale_by_adam())": lambda: optax.chain(
        quantize_state(optax.scale_by_adam()), optax.scale(-LR)
    ),
    # on bfloat16 weights and gradients (params + grads: 4 bytes a parameter)
    "bf16_adamw_8bit": lambda: varjax.bf16_adamw_8bit(LR),
    "low_precision_weights(optax.adamw)": lambda: varjax.low_precision_weights(optax.adamw(LR)),
}
BFLOAT16 = ("bf16_adamw_8bit", "low_precision_weights(optax.adamw)")
OOM_OPTIMIZERS = ("optax.adamw", "adamw_8bit", "adamw_4bit")


def filled(shape: tuple, seed: float, dtype: Any = jnp.float32) -> jax.Array:
    """A deterministic array made on the device in one fused pass."""

    @jax.jit
    def make():
        rows = jax.lax.broadcasted_iota(jnp.float32, shape, 0)
        cols = jax.lax.broadcasted_iota(jnp.float32, shape, len(shape) - 1)
        return (0.02 * jnp.sin(seed + 0.37 * cols + 0.11 * rows)).astype(dtype)

    return make()


def is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One optimizer in this process: the record of :func:`main`'s table."""
    if args.two_passes != "auto":  # the whole-leaf update, in one or two passes
        wrapper._TWO_PASSES = args.two_passes == "on"
        wrapper._CHUNKED = False
    shapes = json.loads(args.shapes)
    n = sum(int(np.prod(s)) for s in shapes.values())
    device = jax.devices()[0]
    record: dict[str, Any] = {"optimizer": args.worker, "n_params": n, "status": "ok"}
    record["machine"] = machine()
    tx = OPTIMIZERS[args.worker]()
    dtype = jnp.bfloat16 if args.worker in BFLOAT16 else jnp.float32
    abstract = {k: jax.ShapeDtypeStruct(tuple(s), dtype) for k, s in shapes.items()}

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    train_step = jax.jit(step, donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = train_step.lower(abstract, jax.eval_shape(tx.init, abstract), abstract).compile()
    init_compiled = jax.jit(tx.init).lower(abstract).compile()
    record["compile_s"] = time.perf_counter() - start
    analysis, init_analysis = compiled.memory_analysis(), init_compiled.memory_analysis()
    record |= {
        "temp_bytes_per_param": analysis.temp_size_in_bytes / n,
        "argument_bytes_per_param": analysis.argument_size_in_bytes / n,
        "output_bytes_per_param": analysis.output_size_in_bytes / n,
        "alias_bytes_per_param": analysis.alias_size_in_bytes / n,
        "init_temp_bytes_per_param": init_analysis.temp_size_in_bytes / n,
    }
    stage = "params"
    try:
        params = {k: filled(tuple(s), 0.5 + i, dtype) for i, (k, s) in enumerate(shapes.items())}
        grads = {k: filled(tuple(s), 1.5 + i, dtype) for i, (k, s) in enumerate(shapes.items())}
        stage = "init"
        state = init_compiled(params)
        jax.block_until_ready(state)
        record["state_bytes_per_param"] = varjax.state_bytes(state) / n
        stats = device.memory_stats() or {}
        record["after_init_bytes_per_param"] = stats.get("bytes_in_use", 0) / n or None
        stage = "step"
        start = time.perf_counter()
        for _ in range(args.steps):
            params, state = compiled(params, state, grads)
        jax.block_until_ready((params, state))
        record["step_ms"] = 1e3 * (time.perf_counter() - start) / max(args.steps, 1)
        record["steps"] = args.steps
        finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))
        record["params_finite"] = finite
    except Exception as error:  # an out-of-memory error is a result here
        if not is_oom(error):
            raise
        record["status"] = f"out of memory ({stage})"
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        record["peak_bytes_per_param"] = stats["peak_bytes_in_use"] / n
        record["bytes_limit"] = stats.get("bytes_limit")
    return record


def run_worker(name: str, shapes: dict[str, tuple], args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", name, "--shapes", json.dumps(shapes)]
    command += ["--steps", str(args.steps), "--two-passes", args.two_passes]
    env = os.environ | {"XLA_PYTHON_CLIENT_MEM_FRACTION": str(args.mem_fraction)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout)[-2000:]
        return {"optimizer": name, "status": f"failed (exit {done.returncode})", "error": tail}
    return json.loads(lines[-1][len("RESULT ") :])


def device_bytes(args: argparse.Namespace) -> int:
    """Bytes the allocator may use on one device, from a child process (the parent
    never allocates on the device, so the children get all of it)."""
    code = "import jax; s = jax.devices()[0].memory_stats() or {}; print(s.get('bytes_limit', 0))"
    env = os.environ | {"XLA_PYTHON_CLIENT_MEM_FRACTION": str(args.mem_fraction)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    limit = int(out.stdout.strip().splitlines()[-1] or 0) if out.stdout.strip() else 0
    return limit or int(args.device_bytes)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def to_markdown(info: dict[str, Any], rows: list[dict], header: list[str]) -> str:
    lines = [
        "# Device memory of a donated training step",
        "",
        f"- machine: {info['platform']} / {info['device']} / {info['cpu']} / {info['cores']} cores",
        f"- software: jax {info['jax']}, optax {info['optax']}, varjax {info['varjax']}, "
        f"{info['date']}",
        *header,
        "- bytes per parameter; ideal peak = params + grads + state (16 for float32 AdamW;"
        f" params + grads 4 bytes for {', '.join(BFLOAT16)}: bfloat16)",
        "",
        "| optimizer | status | XLA temp | init temp | state | peak (GPU) | ms/step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['status']} | {fmt(r.get('temp_bytes_per_param'))} | "
            f"{fmt(r.get('init_temp_bytes_per_param'))} | {fmt(r.get('state_bytes_per_param'))} | "
            f"{fmt(r.get('peak_bytes_per_param'))} | {fmt(r.get('step_ms'), 1)} |"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=["measure", "oom"], default="measure")
    parser.add_argument("--params", type=float, default=18.5e6, help="target parameter count")
    parser.add_argument("--tree", choices=["transformer", "large"], default="transformer")
    parser.add_argument("--leaves", type=int, default=8, help="leaves of --tree large / oom")
    parser.add_argument("--cols", type=int, default=16384, help="columns of a large leaf")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated optimizer names")
    parser.add_argument("--oom-bytes-per-param", type=float, default=13.0)
    parser.add_argument(
        "--device-bytes", type=float, default=2e9, help="device memory where none is reported"
    )
    parser.add_argument("--mem-fraction", type=float, default=0.95)
    parser.add_argument(
        "--two-passes",
        choices=["auto", "on", "off"],
        default="auto",
        help="force quantize_state's whole-leaf update in two passes or one "
        "(auto: row chunks on a CPU, two passes elsewhere)",
    )
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results"
    )
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.mode == "oom":
        limit = device_bytes(args)
        n = int(limit / args.oom_bytes_per_param)
        shapes = large_shapes(n, args.leaves, args.cols)
        names = wanted or list(OOM_OPTIMIZERS)
        header = [
            f"- oom mode: device limit {limit / 2**30:.1f} GiB, model sized at "
            f"{args.oom_bytes_per_param:g} B/param of it; float32 AdamW needs 16",
        ]
    else:
        if args.tree == "large":
            shapes = large_shapes(int(args.params), args.leaves, args.cols)
        else:
            shapes = shapes_for(int(args.params))
        names = wanted or list(OPTIMIZERS)
        header = []
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    header = [
        f"- {n_params:,} float32 parameters in {len(shapes)} leaves "
        f"({args.tree if args.mode == 'measure' else 'large'}), {args.steps} steps, "
        f"two passes: {args.two_passes}",
        *header,
    ]
    # this process never touches the device (jax would take its memory): each
    # optimizer's process reports the machine
    print(f"{n_params:,} parameters in {len(shapes)} leaves", flush=True)
    rows = []
    for name in names:
        rows.append(run_worker(name, shapes, args))
        r = rows[-1]
        print(
            f"  {name:<40} {r['status']:<24} temp {fmt(r.get('temp_bytes_per_param'))} "
            f"peak {fmt(r.get('peak_bytes_per_param'))} B/param",
            flush=True,
        )
    info = next((r["machine"] for r in rows if "machine" in r), None)
    if info is None:
        raise SystemExit("every optimizer's process failed: " + rows[0].get("error", ""))
    table = to_markdown(info, rows, header)
    print(table)
    record = {
        "machine": info,
        "n_params": n_params,
        "shapes": shapes,
        "rows": rows,
        "args": vars(args) | {"out": str(args.out)},
    }
    write_results(args.out, f"memory_{info['platform']}{args.tag}", table, record)


if __name__ == "__main__":
    main()
