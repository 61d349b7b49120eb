"""Step time and state memory of varjax optimizers against their Optax counterparts.

For each pair, one jitted function does ``tx.update`` and ``optax.apply_updates``
on a pytree of transformer-like shapes (embedding, attention and MLP kernels,
layer-norm scales and biases). Both are compiled first, then timed in
interleaved rounds (varjax, baseline, varjax, ...) so that drift in the
machine's speed hits both alike; each round times ``--steps`` steps, and the
table reports the median per-step time over ``--repeats`` rounds and the ratio
of the medians. State bytes per parameter count every leaf of the state.

Rerun (from the repository root):

    JAX_PLATFORMS=cpu python benchmarks/step_time.py          # CPU
    python benchmarks/step_time.py --params 100_000_000       # on a GPU machine

Results go to ``benchmarks/results/step_time_<platform>.{md,json}`` with a
description of the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import varjax
from varjax import registry

LR = 1e-3


def _optax(path: str) -> Callable[..., Any]:
    """``"optax.contrib.muon"`` -> the factory."""
    obj: Any = optax
    for part in path.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def _pair(entry: registry.Entry, line: registry.Baseline) -> tuple:
    return (
        line.label or entry.name,
        lambda: entry.factory(LR, **line.kwargs),
        line.optax_label or line.optax,
        lambda: _optax(line.optax)(LR, **line.optax_kwargs),
    )


# (name, varjax optimizer, baseline name, baseline optimizer): one line per ``Baseline``
# of an entry in varjax/registry.py.
PAIRS: list[tuple[str, Callable[[], Any], str, Callable[[], Any]]] = [
    _pair(entry, line) for entry in registry.REGISTRY for line in entry.baselines
]


def transformer_shapes(d_model: int, layers: int, vocab: int = 32_000) -> dict[str, tuple]:
    """Shapes of a decoder-only transformer's parameters (Flax ``(in, out)`` kernels)."""
    shapes: dict[str, tuple] = {"embed": (vocab, d_model), "final_norm": (d_model,)}
    for i in range(layers):
        shapes |= {
            f"layer{i}/norm1": (d_model,),
            f"layer{i}/qkv": (d_model, 3 * d_model),
            f"layer{i}/qkv_bias": (3 * d_model,),
            f"layer{i}/out": (d_model, d_model),
            f"layer{i}/norm2": (d_model,),
            f"layer{i}/mlp_in": (d_model, 4 * d_model),
            f"layer{i}/mlp_bias": (4 * d_model,),
            f"layer{i}/mlp_out": (4 * d_model, d_model),
        }
    return shapes


def shapes_for(target: int) -> dict[str, tuple]:
    """The transformer with ``layers = d_model / 64`` whose size is closest to ``target``."""
    best = None
    for d_model in range(64, 8193, 64):
        shapes = transformer_shapes(d_model, max(1, d_model // 64), vocab=min(32_000, 8 * d_model))
        size = sum(int(np.prod(s)) for s in shapes.values())
        if best is None or abs(size - target) < abs(best[0] - target):
            best = (size, shapes)
    return best[1]


def large_shapes(n_params: int, leaves: int, cols: int) -> dict[str, tuple]:
    """``leaves`` equal leaves of ``cols`` columns, about ``n_params`` parameters in all."""
    rows = max(1, round(n_params / leaves / cols))
    return {f"w{i}": (rows, cols) for i in range(leaves)}


def make_tree(shapes: dict[str, tuple], seed: int) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
        name: 0.02 * jax.random.normal(key, shape)
        for key, (name, shape) in zip(keys, shapes.items(), strict=True)
    }


class Runner:
    """A compiled training step of one optimizer, with its own params and state."""

    def __init__(self, tx: optax.GradientTransformation, params: Any, grads: Any) -> None:
        self.params = jax.tree.map(jnp.copy, params)
        self.state = tx.init(self.params)
        self.grads = grads

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.state_bytes = varjax.state_bytes(self.state)
        self.run(2)  # compile and warm up

    def run(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps."""
        start = time.perf_counter()
        for _ in range(steps):
            self.params, self.state = self.step(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))
        return (time.perf_counter() - start) / steps


def measure(pair, params, grads, repeats: int, steps: int) -> dict[str, Any]:
    name, make, base_name, make_base = pair
    ours, base = Runner(make(), params, grads), Runner(make_base(), params, grads)
    times: dict[str, list[float]] = {"varjax": [], "baseline": []}
    for _ in range(repeats):
        times["varjax"].append(ours.run(steps))
        times["baseline"].append(base.run(steps))
    n = sum(x.size for x in jax.tree.leaves(params))
    ms, base_ms = (1e3 * statistics.median(times[k]) for k in ("varjax", "baseline"))
    return {
        "optimizer": name,
        "baseline": base_name,
        "varjax_ms": ms,
        "baseline_ms": base_ms,
        "ratio": ms / base_ms,
        "varjax_state_bytes_per_param": ours.state_bytes / n,
        "baseline_state_bytes_per_param": base.state_bytes / n,
        "raw_seconds": times,
    }


def copy_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5, steps: int = 20) -> float:
    """GB/s of a jitted read-and-write pass over ``n_bytes`` of float32."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    scale = jax.jit(lambda x: x * 1.0001)
    jax.block_until_ready(scale(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            y = scale(x)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - start) / steps)
    return 2 * n_bytes / statistics.median(times) / 1e9


def torch_peers(
    shapes: dict[str, tuple], repeats: int, steps: int, eight_bit: bool = False
) -> dict[str, float]:
    """ms per step of PyTorch's fused AdamW and bitsandbytes' Adam8bit on the same shapes
    (CUDA only; bitsandbytes is skipped where it is not installed); with ``eight_bit``
    also bitsandbytes' and torchao's AdamW8bit (each where installed)."""
    import torch

    params = [torch.nn.Parameter(0.02 * torch.randn(s, device="cuda")) for s in shapes.values()]
    for p in params:
        p.grad = 0.02 * torch.randn_like(p)

    def time_steps(optimizer) -> float:
        for _ in range(3):
            optimizer.step()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / steps)
        del optimizer
        torch.cuda.empty_cache()
        return 1e3 * statistics.median(times)

    result = {"torch.optim.AdamW(fused=True)": time_steps(torch.optim.AdamW(params, fused=True))}
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    if bnb is not None:
        name = f"bitsandbytes {bnb.__version__}"
        result[f"{name} Adam8bit"] = time_steps(bnb.optim.Adam8bit(params))
        if eight_bit:
            result[f"{name} AdamW8bit"] = time_steps(bnb.optim.AdamW8bit(params))
    if eight_bit:
        try:
            import torchao
            from torchao.optim import AdamW8bit
        except ImportError:
            return result
        result[f"torchao {torchao.__version__} AdamW8bit"] = time_steps(AdamW8bit(params))
    return result


def write_results(out: pathlib.Path, stem: str, table: str, record: dict[str, Any]) -> None:
    """Write ``table`` to ``out/stem.md`` and ``record`` to ``out/stem.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "varjax": varjax.__version__,
        "date": datetime.date.today().isoformat(),
    }


def to_markdown(info: dict[str, Any], n_params: int, rows: list[dict], args) -> str:
    lines = [
        "# Step time: varjax vs Optax",
        "",
        f"- machine: {info['platform']} / {info['device']} / {info['cpu']} / {info['cores']} cores",
        f"- software: jax {info['jax']}, optax {info['optax']}, varjax {info['varjax']}",
        f"- {n_params:,} parameters (transformer-like shapes, float32), "
        f"median of {args.repeats} interleaved rounds of {args.steps} steps, {info['date']}",
        "- time: one jitted `update` + `apply_updates`; ratio = varjax / baseline",
        "",
        "| optimizer | baseline | varjax ms/step | baseline ms/step | ratio | "
        "state B/param (varjax) | state B/param (baseline) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['baseline']} | {r['varjax_ms']:.3f} | "
            f"{r['baseline_ms']:.3f} | {r['ratio']:.3f} | "
            f"{r['varjax_state_bytes_per_param']:.2f} | {r['baseline_state_bytes_per_param']:.2f} |"
        )
    if info.get("copy_GBps"):
        lines += [
            "",
            f"- copy bandwidth (jitted read + write of 1 GiB): {info['copy_GBps']:.0f} GB/s",
        ]
    for name, ms in info.get("torch_peers", {}).items():
        lines.append(f"- {name}: {ms:.3f} ms/step on the same shapes")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--params", type=float, default=10e6, help="target parameter count")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated optimizer names")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results"
    )
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also measure copy bandwidth, and on CUDA PyTorch's fused AdamW and bitsandbytes",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    shapes = shapes_for(int(args.params))
    params, grads = make_tree(shapes, 0), make_tree(shapes, 1)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    pairs = [p for p in PAIRS if not wanted or p[0] in wanted]
    info = machine()
    print(f"{n_params:,} parameters on {info['platform']} ({info['device']})", flush=True)
    if args.peers:
        info["copy_GBps"] = copy_bandwidth()
        if info["platform"] == "gpu":
            info["torch_peers"] = torch_peers(shapes, args.repeats, args.steps)
        print(f"  copy {info['copy_GBps']:.0f} GB/s, {info.get('torch_peers', {})}", flush=True)
    rows = []
    for pair in pairs:
        rows.append(measure(pair, params, grads, args.repeats, args.steps))
        r = rows[-1]
        print(
            f"  {r['optimizer']:<16} {r['varjax_ms']:9.3f} ms  {r['baseline']:<20} "
            f"{r['baseline_ms']:9.3f} ms  ratio {r['ratio']:.3f}",
            flush=True,
        )
    table = to_markdown(info, n_params, rows, args)
    print(table)
    record = {
        "machine": info,
        "n_params": n_params,
        "rows": rows,
        "args": vars(args) | {"out": str(args.out)},
    }
    write_results(args.out, f"step_time_{info['platform']}{args.tag}", table, record)


if __name__ == "__main__":
    main()
