"""Step time of varjax optimizers against their Optax counterparts across model sizes.

The pairs, the transformer-shaped trees and the timing are those of
``step_time.py`` (interleaved rounds, median per-step time, ratio within the
run); this script repeats them at several parameter counts so that the growth
of the cost with size is visible, and plots milliseconds per step against the
number of parameters.

Rerun (from the repository root):

    JAX_PLATFORMS=cpu python benchmarks/size_sweep.py --sizes 1e6,1.6e7,6.4e7
    python benchmarks/size_sweep.py --sizes 1e6,1.6e7,6.4e7,2.56e8   # on a GPU machine

Results go to ``benchmarks/results/size_sweep_<platform><tag>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from step_time import PAIRS, machine, make_tree, measure, shapes_for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="1e6,1.6e7,6.4e7", help="comma-separated counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated optimizer names")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="instead of measuring, combine these result .json files (one machine) into one",
    )
    return parser.parse_args(argv)


def merged(paths: list[str]) -> tuple[dict, list[int], list[dict]]:
    """The machine, sizes and rows of several runs, sizes in increasing order."""
    records = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    devices = {r["machine"]["device"] for r in records}
    if len(devices) != 1:
        raise SystemExit(f"--merge needs runs from one kind of device, got {sorted(devices)}")
    sizes = sorted({n for r in records for n in r["sizes"]})
    rows = [row for r in records for row in r["rows"]]
    return records[0]["machine"], sizes, rows


def sweep(args: argparse.Namespace) -> tuple[list[int], list[dict]]:
    """One row per (size, pair): the ``step_time.measure`` record plus the size."""
    wanted = {name for name in args.only.split(",") if name}
    pairs = [p for p in PAIRS if not wanted or p[0] in wanted]
    sizes, rows = [], []
    for target in (float(s) for s in args.sizes.split(",")):
        shapes = shapes_for(int(target))
        params, grads = make_tree(shapes, 0), make_tree(shapes, 1)
        n = sum(x.size for x in jax.tree.leaves(params))
        sizes.append(n)
        for pair in pairs:
            record = measure(pair, params, grads, args.repeats, args.steps)
            rows.append({"params": n, "steps": args.steps, **record})
            print(f"{n:>12,} {pair[0]:>16}: {record['varjax_ms']:9.3f} ms, "
                  f"ratio {record['ratio']:.3f}", flush=True)  # fmt: skip
        del params, grads
    return sizes, rows


def to_markdown(info: dict, sizes: list[int], rows: list[dict], args) -> str:
    header = " | ".join(f"{n / 1e6:.1f}M" for n in sizes)
    lines = [
        "# Step time across sizes: varjax vs Optax",
        "",
        f"- machine: {info['platform']} / {info['device']} / {info['cpu']} / {info['cores']} cores",
        f"- software: jax {info['jax']}, optax {info['optax']}, varjax {info['varjax']}, "
        f"{info['date']}",
        f"- median of {args.repeats} interleaved rounds of {args.steps} steps; one jitted "
        "`update` + `apply_updates` on transformer-like float32 shapes",
        "- each cell: varjax ms/step (ratio to the baseline in the same run)",
        "",
        f"| optimizer | baseline | {header} |",
        "| --- | --- | " + " | ".join("---:" for _ in sizes) + " |",
    ]
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = {r["params"]: r for r in rows if r["optimizer"] == name}
        cells = [
            f"{mine[n]['varjax_ms']:.3f} ({mine[n]['ratio']:.2f})" if n in mine else "-"
            for n in sizes
        ]  # "-": not run at that size
        baseline = next(iter(mine.values()))["baseline"]
        lines.append(f"| {name} | {baseline} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(sizes: list[int], rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(names), 2)))
    baselines_drawn = set()
    for name, color in zip(names, colors, strict=False):
        mine = sorted((r for r in rows if r["optimizer"] == name), key=lambda r: r["params"])
        x = [r["params"] for r in mine]
        axes[0].plot(x, [r["varjax_ms"] for r in mine], "o-", color=color, label=name)
        axes[1].plot(x, [r["ratio"] for r in mine], "o-", color=color, label=name)
        base = mine[0]["baseline"]
        if base not in baselines_drawn:
            baselines_drawn.add(base)
            axes[0].plot(x, [r["baseline_ms"] for r in mine], "k--", alpha=0.3, lw=1)
    axes[0].set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms per step")
    axes[0].set_title("step time (dashed: Optax baselines)")
    axes[1].set(xscale="log", xlabel="parameters", ylabel="varjax / baseline")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_title("ratio to the Optax counterpart, same run")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge:
        info, sizes, rows = merged(args.merge)
        repeats = {r["raw_seconds"]["varjax"].__len__() for r in rows}
        args.repeats = "/".join(str(x) for x in sorted(repeats))
        steps = {r.get("steps", args.steps) for r in rows}  # runs before 2026-11-23 lack it
        args.steps = "/".join(str(x) for x in sorted(steps))
    else:
        info = machine()
        sizes, rows = sweep(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"size_sweep_{info['platform']}{args.tag}"
    stem.with_suffix(".md").write_text(to_markdown(info, sizes, rows, args))
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": info, "sizes": sizes, "rows": rows}, indent=1)
    )
    plot(sizes, rows, stem.with_suffix(".png"), f"{info['platform']} / {info['device']}")
    print(f"wrote {stem}.md, .json and .png")


if __name__ == "__main__":
    main()
