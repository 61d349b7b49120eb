"""Step time of the quantized optimizers against their Optax counterparts, per layout.

The step and the timing are ``step_time.py``'s (one jitted, donated ``update`` +
``apply_updates``, interleaved rounds, median per-step time), on the three layouts
of issue 20: one leaf per layer matrix (``leaves``, 138 leaves at 251M), the layers
stacked (``stacked``, 10 leaves) and one leaf of 4096 columns (``one``). Each
layout's table is written as soon as it is measured.

Rerun (from the repository root):

    python benchmarks/quantized_step_time.py --params 251e6 --tag _h200_251M   # GPU
    JAX_PLATFORMS=cpu python benchmarks/quantized_step_time.py --params 18.5e6 \\
        --layouts leaves --repeats 5 --steps 3                                 # CPU

Results go to ``benchmarks/results/quantized_step_time_<platform><tag>.{md,json}``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from step_time import (
    LR,
    copy_bandwidth,
    machine,
    make_tree,
    measure,
    shapes_for,
    torch_peers,
    write_results,
)

import varjax


def laid_out(shapes: dict[str, tuple], layout: str) -> dict[str, tuple]:
    """``shapes`` one leaf per layer matrix (``leaves``), with the layers stacked along a
    first axis (``stacked``, the scan-over-layers idiom), or as one (n / 4096, 4096) leaf
    (``one``)."""
    if layout == "leaves":
        return shapes
    if layout == "one":
        return {"w": (max(1, round(sum(int(np.prod(s)) for s in shapes.values()) / 4096)), 4096)}
    stacked: dict[str, tuple] = {}
    for name, shape in shapes.items():
        if "/" not in name:
            stacked[name] = shape
            continue
        key = name.split("/", 1)[1]
        count = stacked[key][0] + 1 if key in stacked else 1
        stacked[key] = (count, *shape)
    return stacked


PAIRS = [
    ("adamw_8bit", lambda: varjax.adamw_8bit(LR), "optax.adamw", lambda: optax.adamw(LR)),
    ("adamw_4bit", lambda: varjax.adamw_4bit(LR), "optax.adamw", lambda: optax.adamw(LR)),
    ("lion_8bit", lambda: varjax.lion_8bit(LR), "optax.lion", lambda: optax.lion(LR)),
    (
        "ademamix_8bit",
        lambda: varjax.ademamix_8bit(LR),
        "optax.contrib.ademamix",
        lambda: optax.contrib.ademamix(LR),
    ),
]


def to_markdown(info: dict, results: dict[str, dict], args) -> str:
    lines = [
        "# Step time of the quantized optimizers, per layout",
        "",
        f"- machine: {info['platform']} / {info['device']} / {info['cpu']} / {info['cores']} cores",
        f"- software: jax {info['jax']}, optax {info['optax']}, varjax {info['varjax']}",
        f"- median of {args.repeats} interleaved rounds of {args.steps} steps, {info['date']}; "
        "one jitted, donated `update` + `apply_updates`; ratio = varjax / baseline",
    ]
    if info.get("copy_GBps"):
        bandwidth = info["copy_GBps"]
        lines.append(f"- copy bandwidth (jitted read + write of 1 GiB): {bandwidth:.0f} GB/s")
    lines += [
        "",
        "| layout | leaves | params | optimizer | baseline | varjax ms | baseline ms | ratio |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for layout, result in results.items():
        for r in result["rows"]:
            lines.append(
                f"| {layout} | {result['leaves']} | {result['n_params']:,} | {r['optimizer']} | "
                f"{r['baseline']} | {r['varjax_ms']:.3f} | {r['baseline_ms']:.3f} | "
                f"{r['ratio']:.3f} |"
            )
    if any(result.get("peers") for result in results.values()):
        lines += [
            "",
            "PyTorch peers in the same process (`--peers`; ratio = peer ms / varjax "
            "`adamw_8bit` ms of the same layout):",
            "",
            "| layout | peer | ms | peer / adamw_8bit |",
            "| --- | --- | ---: | ---: |",
        ]
        for layout, result in results.items():
            ours = {r["optimizer"]: r["varjax_ms"] for r in result["rows"]}.get("adamw_8bit")
            for peer, ms in result.get("peers", {}).items():
                ratio = f"{ms / ours:.2f}" if ours else ""
                lines.append(f"| {layout} | {peer} | {ms:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--params", type=float, default=251e6)
    parser.add_argument("--layouts", default="one,stacked,leaves")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated optimizer names")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results"
    )
    parser.add_argument("--tag", default="")
    parser.add_argument("--copy-bandwidth", action="store_true")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also time torch's fused AdamW, bitsandbytes' and torchao's AdamW8bit (CUDA)",
    )
    args = parser.parse_args()
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    pairs = [p for p in PAIRS if not wanted or p[0] in wanted]
    info = machine()
    if args.copy_bandwidth:
        info["copy_GBps"] = copy_bandwidth()
    results: dict[str, dict] = {}
    for layout in args.layouts.split(","):
        shapes = laid_out(shapes_for(int(args.params)), layout)
        params, grads = make_tree(shapes, 0), make_tree(shapes, 1)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        rows = []
        for pair in pairs:
            rows.append(measure(pair, params, grads, args.repeats, args.steps))
            r = rows[-1]
            print(
                f"  {layout:<8} {r['optimizer']:<14} {r['varjax_ms']:8.3f} ms  "
                f"{r['baseline']:<22} {r['baseline_ms']:8.3f} ms  ratio {r['ratio']:.3f}",
                flush=True,
            )
        results[layout] = {"leaves": len(shapes), "n_params": n_params, "rows": rows}
        del params, grads
        if args.peers and jax.default_backend() != "gpu":
            print("  --peers: PyTorch's peers run on CUDA only; not timed here", flush=True)
        elif args.peers:
            peers = torch_peers(shapes, args.repeats, args.steps, eight_bit=True)
            results[layout]["peers"] = peers
            for peer, ms in peers.items():
                print(f"  {layout:<8} {peer:<40} {ms:8.3f} ms", flush=True)
        record = {"machine": info, "results": results, "args": vars(args) | {"out": str(args.out)}}
        write_results(
            args.out,
            f"quantized_step_time_{info['platform']}{args.tag}",
            to_markdown(info, results, args),
            record,
        )


if __name__ == "__main__":
    main()
