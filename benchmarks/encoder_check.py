"""How often the gather-free encoder off the CPU picks another code than the nearest.

Off the CPU, ``nearest_index`` counts the midpoints below a value by arithmetic
(``blockwise._gather_free_encoder``: from the decades of bitsandbytes' dynamic maps,
by a few affine pieces for others; before 2026-12-07 by the pieces for all) instead
of table gathers, so that XLA
fuses the moment update with its encoding. Inside a piece the count comes from
float32 arithmetic: a value very close to a midpoint may get the neighbouring code.
This script runs that encoder on the default device for the default maps, on
moment-like values (normal values, and their squares for unsigned maps, scaled by
their maximum) and uniform ones, and on every midpoint and its float32 neighbours;
it compares with the exact count (NumPy) and reports the share of codes that differ,
the largest difference, and how far from its midpoint (in shares of the gap between
the two codes) the farthest such value lies.

Rerun (from the repository root; on any platform, the encoder is forced):

    python benchmarks/encoder_check.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from step_time import machine

from varjax.quantization import blockwise
from varjax.quantization.codes import default_maps, dynamic_map, linear_map

MAPS = {
    "8-bit dynamic, signed": dynamic_map(True),
    "8-bit dynamic, unsigned": dynamic_map(False),
    "8-bit linear, signed": linear_map(True),
    "4-bit dynamic, signed": default_maps(4)[0],
    "4-bit linear, unsigned": default_maps(4)[1],
}


def values(code: np.ndarray, rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    moments = rng.standard_normal(size).astype(np.float32)
    if code.min() >= 0:
        moments = moments * moments
    mids = blockwise._midpoints(code)
    lowest = np.float32(-1.0 if code.min() < 0 else 0.0)
    edges = np.concatenate([mids, np.nextafter(mids, 2 * lowest - 2), np.nextafter(mids, 2)])
    return {
        "moments": moments / np.abs(moments).max(),
        "uniform": rng.uniform(lowest, 1.0, size).astype(np.float32),
        "midpoints and neighbours": np.clip(edges, lowest, 1.0).astype(np.float32),
    }


def check(code: np.ndarray, x: np.ndarray) -> dict:
    count = jax.jit(blockwise._gather_free_encoder(code))
    got = np.asarray(count(jnp.asarray(x)))
    mids = blockwise._midpoints(code)
    expected = np.searchsorted(mids, x, side="left")  # midpoints strictly below
    differ = got != expected
    lower = np.minimum(got, expected)[differ]
    distance = np.abs(x[differ] - mids[lower]) / (code[lower + 1] - code[lower])
    return {
        "values": int(x.size),
        "differ": int(differ.sum()),
        "share": float(differ.mean()),
        "largest_difference": int(np.abs(got - expected).max()),
        "farthest_from_midpoint": float(distance.max()) if distance.size else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=1 << 24)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    for name, code in MAPS.items():
        for kind, x in values(code, rng, args.size).items():
            results[f"{name} / {kind}"] = row = check(code, x)
            print(
                f"{name:26s} {kind:25s} {row['differ']:7d} of {row['values']:9d} "
                f"({row['share']:.1e}), farthest {row['farthest_from_midpoint']:.1e} of a gap"
            )
    if args.out is not None:
        info = machine()
        lines = [
            "# Codes of the gather-free encoder against the nearest entry",
            "",
            "- encoder: `blockwise._gather_free_encoder` (decades for the dynamic maps)",
            "",
            f"- machine: {info['platform']} / {info['device']}; jax {info['jax']}, {info['date']}",
            "- differ: values whose code is not the nearest entry's (ties to the lower);"
            " farthest: the largest distance of such a value from its midpoint, in shares"
            " of the gap between the two codes",
            "",
            "| map / values | values | differ | share | largest difference | farthest |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, row in results.items():
            lines.append(
                f"| {key} | {row['values']} | {row['differ']} | {row['share']:.1e} | "
                f"{row['largest_difference']} | {row['farthest_from_midpoint']:.1e} |"
            )
        stem = args.out / f"encoder_check_{info['platform']}{args.tag}"
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        stem.with_suffix(".json").write_text(
            json.dumps({"machine": info, "results": results}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
