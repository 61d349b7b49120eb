"""Where the time of a quantized step goes: per-kernel device times and probes.

For issue 20 (8-bit state at fp32 speed). On one leaf of ``--rows`` x 4096 float32
parameters it times, with ``step_time.py``'s runner (one jitted, donated ``update``
+ ``apply_updates``):

* ``optax.adamw`` and ``varjax.adamw_8bit`` (two passes and one pass);
* the pieces of the 8-bit step alone, each a jitted elementwise pass over the
  leaf: decoding codes with the map (a table gather) and encoding values with a
  given absmax (the bucket tables), against the same passes with plain
  arithmetic in place of the tables (codes wrong: probes of what the table
  lookups cost), and a float32 copy (the bandwidth they are bounded by);

and, with ``--trace``, the summed device time of each kernel of one step of each
optimizer from a ``jax.profiler`` Perfetto trace.

Rerun (from the repository root, on the GPU machine):

    python benchmarks/quantized_profile.py --trace --out /tmp/profile
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import json
import pathlib
import re
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from step_time import LR, Runner, copy_bandwidth, machine

import varjax
from varjax.quantization import blockwise, codes, wrapper


def timed(fn: Callable, *args, repeats: int = 7, steps: int = 20) -> float:
    """Median ms of ``fn(*args)`` (jitted, not donated) over interleaved rounds."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / steps)
    return 1e3 * statistics.median(times)


def probes(rows: int, block: int = 256) -> dict[str, float]:
    """ms of each piece of the 8-bit step as its own pass over ``rows`` x 4096 values."""
    shape = (rows, 4096)
    signed, _ = codes.default_maps(8)
    x = jax.random.uniform(jax.random.key(0), shape, minval=-1.0, maxval=1.0)
    absmax = blockwise.block_absmax(x, block)
    q, _ = blockwise.quantize_blockwise(x, signed, block, absmax=absmax)
    table = jnp.asarray(signed)

    def encode_table(x, absmax):
        return blockwise.quantize_blockwise(x, signed, block, absmax=absmax)[0]

    def encode_arith(x, absmax):  # the same scaling, then a linear code: no table
        scaled = blockwise._scaled_in_blocks(x, block, absmax)[0]
        return jnp.round(scaled * 127.0 + 127.0).astype(jnp.uint8)

    def decode_table(q, absmax):
        return blockwise.dequantize_blockwise(q, absmax, signed, block)

    def decode_arith(q, absmax):
        values = q.astype(jnp.float32) * (1 / 127.0) - 1.0
        return blockwise._times_absmax_in_windows(values, absmax, block)

    def decode_gather_only(q):
        return jnp.take(table, q.astype(jnp.int32), mode="clip")

    def roundtrip_table(q, absmax):
        y = decode_table(q, absmax) * 0.9
        return encode_table(y, absmax)

    def roundtrip_arith(q, absmax):
        y = decode_arith(q, absmax) * 0.9
        return encode_arith(y, absmax)

    out = {"copy f32 (8 B/elem)": timed(jax.jit(lambda x: x * 1.0001), x)}
    out["encode table (5 B/elem)"] = timed(jax.jit(encode_table), x, absmax)
    out["encode arith probe"] = timed(jax.jit(encode_arith), x, absmax)
    out["decode table (5 B/elem)"] = timed(jax.jit(decode_table), q, absmax)
    out["decode arith probe"] = timed(jax.jit(decode_arith), q, absmax)
    out["decode gather only"] = timed(jax.jit(decode_gather_only), q)
    out["u8 -> u8 roundtrip table (2 B/elem)"] = timed(jax.jit(roundtrip_table), q, absmax)
    out["u8 -> u8 roundtrip arith probe"] = timed(jax.jit(roundtrip_arith), q, absmax)
    return out


def kernel_times(trace_dir: pathlib.Path) -> dict[str, float]:
    """Summed device microseconds per kernel name in the Perfetto trace under ``trace_dir``."""
    totals: dict[str, float] = collections.defaultdict(float)
    for name, us in device_kernels(trace_dir):
        totals[name] += us
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def kernels_by_kind(runner: Runner, where: pathlib.Path, steps: int) -> dict[str, list[float]]:
    """``{kind: [kernels a step, device microseconds a step]}`` of ``runner``'s step, from a
    trace of ``steps`` steps written under ``where``; a kernel's kind is its name without
    the trailing number XLA gives each fusion (``loop_add_fusion.12`` -> ``loop_add_fusion``)."""
    with jax.profiler.trace(str(where), create_perfetto_trace=True):
        runner.run(steps)
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for name, us in device_kernels(where):
        kind = re.sub(r"[._]\d+$", "", name)
        kinds[kind][0] += 1 / steps
        kinds[kind][1] += us / steps
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1][1]))


def device_kernels(trace_dir: pathlib.Path) -> list[tuple[str, float]]:
    """``(name, device microseconds)`` of each kernel in the Perfetto trace under ``trace_dir``."""
    files = sorted(trace_dir.rglob("*.trace.json.gz")) + sorted(trace_dir.rglob("perfetto*.gz"))
    if not files:
        return []
    with gzip.open(files[-1], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    pids = {
        e["pid"]: e["args"].get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device = {pid for pid, name in pids.items() if "/device:GPU" in name}
    return [
        (e["name"], float(e["dur"]))
        for e in events
        if e.get("ph") == "X" and e.get("pid") in device and "dur" in e
    ]


def traced(name: str, runner: Runner, out: pathlib.Path, steps: int = 5) -> dict[str, float]:
    where = out / f"trace_{name}"
    with jax.profiler.trace(str(where), create_perfetto_trace=True):
        runner.run(steps)
    return {k: v / steps for k, v in kernel_times(where).items()}


def pallas_gather_check() -> str:
    """Whether a Pallas kernel can gather from a small table on this backend."""
    try:
        from jax.experimental import pallas as pl

        table = jnp.linspace(-1.0, 1.0, 256, dtype=jnp.float32)
        idx = jax.random.randint(jax.random.key(1), (1024,), 0, 256)

        def kernel(idx_ref, table_ref, o_ref):
            o_ref[...] = table_ref[idx_ref[...]]

        out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((1024,), jnp.float32))(
            idx, table
        )
        ok = bool(jnp.all(out == table[idx]))
        return f"ok, equal={ok}"
    except Exception as error:  # a probe: report whatever stops it
        return f"failed: {type(error).__name__}: {str(error)[:300]}"


def linear_codes(scaled, code):  # a probe: codes without the map's tables (wrong codes)
    return jnp.round(scaled * 127.0 + 127.0).astype(jnp.int32)


# (name, optimizer, module settings while it compiles: {"module.attribute": value})
VARIANTS = [
    ("optax.adamw", lambda: optax.adamw(LR), {}),
    ("adamw_8bit", lambda: varjax.adamw_8bit(LR), {}),
    ("adamw_8bit one pass", lambda: varjax.adamw_8bit(LR), {"wrapper._TWO_PASSES": False}),
    (
        "adamw_8bit gradient checked apart",
        lambda: varjax.adamw_8bit(LR),
        {"wrapper._FOLD_GRADIENT_CHECK": False},
    ),
    (
        "adamw_8bit linear-code probe",
        lambda: varjax.adamw_8bit(LR),
        {"blockwise.nearest_index": linear_codes},
    ),
]
MODULES = {"wrapper": wrapper, "blockwise": blockwise}


@contextlib.contextmanager
def patched(settings: dict):
    """``settings`` (``{"wrapper._TWO_PASSES": False}``: attributes of ``MODULES``) in place
    for the block, caches cleared first so that the per-leaf jitted functions trace anew
    under them."""
    saved = []
    for where, value in settings.items():
        module_name, name = where.split(".")
        module = MODULES[module_name]
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)
    jax.clear_caches()
    try:
        yield
    finally:  # no cache cleared here: a compiled step would be traced again as it is
        for module, name, value in saved:
            setattr(module, name, value)


def compiled_runner(tx: optax.GradientTransformation, params, grads) -> Runner:
    """A ``Runner`` whose step stays compiled as it is now: after the next ``patched``
    block's ``jax.clear_caches()`` a jitted step would trace again when called, under
    the settings of that moment (before 2026-12-07 every variant here was timed so, as
    the default)."""
    runner = Runner(tx, params, grads)
    runner.step = runner.step.lower(runner.params, runner.state, grads).compile()
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=61440)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/profile"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(json.dumps(info), flush=True)
    print(f"copy bandwidth {copy_bandwidth():.0f} GB/s", flush=True)
    print("pallas gather:", pallas_gather_check(), flush=True)
    report: dict = {"machine": info, "rows": args.rows}

    shape = (args.rows, 4096)
    params = {"w": 0.02 * jax.random.normal(jax.random.key(0), shape)}
    grads = {"w": 0.02 * jax.random.normal(jax.random.key(1), shape)}
    steps = {}
    runners = {}
    for name, make, settings in VARIANTS:
        with patched(settings):
            runners[name] = compiled_runner(make(), params, grads)
    for name, runner in runners.items():
        steps[name] = 1e3 * statistics.median(runner.run(20) for _ in range(7))
        print(f"step {name:<34} {steps[name]:7.3f} ms", flush=True)
    report["steps_ms"] = steps
    if args.trace:
        report["kernels_us"] = {}
        for name, runner in [(n, r) for n, r in runners.items() if "probe" not in n]:
            kernels = traced(name.replace(" ", "_"), runner, args.out)
            report["kernels_us"][name] = kernels
            print(f"kernels of {name}: {sum(kernels.values()):.0f} us in all", flush=True)
            for kernel, us in list(kernels.items())[:12]:
                print(f"    {us:9.1f} us  {kernel[:100]}", flush=True)
    del runners, params, grads
    report["probes_ms"] = probes(args.rows)
    for name, ms in report["probes_ms"].items():
        print(f"probe {name:<38} {ms:7.3f} ms", flush=True)
    (args.out / "quantized_profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
