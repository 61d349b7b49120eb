"""How XLA fuses the quantized step, under variants of its code: kernels, temporaries, time.

For issue 20. On one float32 leaf of ``--rows`` x 4096, each variant's jitted,
donated ``update`` + ``apply_updates`` step (``step_time.py``'s runner) is
compiled under module settings of ``varjax.quantization`` (flags of
``wrapper``, or a probe put in place of one function), and reported with:

* the kernels of its optimized HLO (fusions and copies of the entry computation)
  and the leaf-sized arrays each fusion writes;
* XLA's temporaries (``compiled.memory_analysis()``) per parameter;
* the median step time (ms), unless ``--no-time``.

Off the CPU the step has two passes: the first keeps only each moment's new block
absmax, the second computes the new state again, encodes it and gives the updates
that ``apply_updates`` adds in the same kernel. With the dynamic map's codes found
by table gathers (``tables``), XLA on an H100 wrote the second pass's new moments
in float32 and read them back (8 bytes of temporaries per parameter of the largest
leaf): it does not fuse a computation into a gather's indices. ``segments`` is the
encoder without gathers (``blockwise._count_below_by_segments``); with it XLA still
wrote the block-scaled second moment (AdamW) and Lion's moment in float32 until the
second pass scaled by a per-element absmax (``blockwise._GIVEN_ABSMAX_PER_ELEMENT``).
Then the new codes still went to temporaries and were copied over the donated ones:
XLA writes over an input only where the kernel's every use of it is elementwise, and
the codes were decoded by a gather from the map (``table decode``), until the decoder
without gathers (``blockwise._entries_by_runs``) in the second pass (in both passes:
``runs in both passes``); a dynamic map's entries are now computed from its decades
(``blockwise._entries_by_decades``), by its runs before (``runs decode``). ``tables``
is both by the tables.
Other variants: the encoded state computed apart from the updates' (``separate``), the
second pass's scaling by a blocked reshape (``blocked scaling``) rather than by a
per-element absmax, 4-bit codes unpacked by stacking two arrays as before 2026-12-07
(``stacked unpack``), a linear code as a probe of the fastest encoding, and, to
bound what XLA writes rather than remove it, the CPU's chunked first pass with
large chunks.

Probes compute wrong codes on purpose (a linear code in place of the dynamic
map's tables): they show what a piece costs, or whether it keeps XLA from fusing,
never a result. With ``--dump`` each variant's optimized HLO is written there.

Rerun (from the repository root, on the GPU machine):

    python benchmarks/step_fusions.py --rows 16384 --dump /tmp/hlo

or, compiled for an H100 on any machine without timing (the CUDA PJRT plugin of
jax's version, kept out of the environment: it is for this script alone):

    pip install --no-deps --target /tmp/cuda jax-cuda12-plugin==X jax-cuda12-pjrt==X
    PYTHONPATH=/tmp/cuda JAX_PLATFORMS=cpu python benchmarks/step_fusions.py \
        --rows 16384 --compile-only-for benchmarks/h100_sxm.txtpb --out /tmp
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "tests"))
from compile_only import gpu_sharding, placed
from memory import donating_train_step
from quantized_profile import compiled_runner, linear_codes, patched
from step_time import LR, machine, write_results

import varjax


def stacked_unpack_4bit(packed, length):  # the unpacking before 2026-12-07 (same codes)
    pairs = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :length]


SEPARATE = {"wrapper._SEPARATE_ENCODE": True}
BLOCKED = {"blockwise._GIVEN_ABSMAX_PER_ELEMENT": False}
SEGMENTS = {"blockwise._ENCODE_WITHOUT_GATHERS": True}
TABLES = {"blockwise._ENCODE_WITHOUT_GATHERS": False, "blockwise._DECODE_WITHOUT_GATHERS": False}
TABLE_DECODE = {"blockwise._DECODE_WITHOUT_GATHERS": False}
RUNS_BOTH_PASSES = {"wrapper._FIRST_PASS_BY_TABLE": False}
RUNS_DECODE = {"blockwise._decades": lambda code_bytes: None}  # not by the dynamic map's decades
SEGMENT_ENCODE = {"blockwise._decade_thresholds": lambda code_bytes: None}
STACKED_UNPACK = {"wrapper.unpack_4bit": stacked_unpack_4bit}

# (name, optimizer, settings: {"module.attribute": value}): the new state shared by
# the updates and the encoding, encoded and decoded by the tables (``tables``) or
# encoded without gathers (``segments``)
VARIANTS = [
    ("adamw_8bit segments", "adamw_8bit", SEGMENTS),
    ("adamw_8bit tables", "adamw_8bit", TABLES),
    ("adamw_8bit segments, table decode", "adamw_8bit", SEGMENTS | TABLE_DECODE),
    ("adamw_8bit segments, runs in both passes", "adamw_8bit", SEGMENTS | RUNS_BOTH_PASSES),
    ("adamw_8bit segments, runs decode", "adamw_8bit", SEGMENTS | RUNS_DECODE),
    ("adamw_8bit segments, segment encode", "adamw_8bit", SEGMENTS | SEGMENT_ENCODE),
    ("adamw_8bit segments, separate", "adamw_8bit", SEGMENTS | SEPARATE),
    ("adamw_8bit segments, blocked scaling", "adamw_8bit", SEGMENTS | BLOCKED),
    ("adamw_8bit linear encode probe", "adamw_8bit", {"blockwise.nearest_index": linear_codes}),
    # the CPU's path: the first pass in a loop over chunks of rows that also makes the
    # codes, the updates from a whole-leaf second pass (temporaries bounded by a chunk
    # and the new codes)
    (
        "adamw_8bit tables, chunks of 16M",
        "adamw_8bit",
        TABLES | {"wrapper._CHUNKED": True, "wrapper._CHUNK_ELEMENTS": 1 << 24},
    ),
    ("adamw_4bit segments", "adamw_4bit", SEGMENTS),
    ("adamw_4bit tables", "adamw_4bit", TABLES),
    ("adamw_4bit segments, stacked unpack", "adamw_4bit", SEGMENTS | STACKED_UNPACK),
    ("lion_8bit segments", "lion_8bit", SEGMENTS),
    ("lion_8bit tables", "lion_8bit", TABLES),
    ("lion_8bit segments, table decode", "lion_8bit", SEGMENTS | TABLE_DECODE),
    ("lion_8bit segments, runs in both passes", "lion_8bit", SEGMENTS | RUNS_BOTH_PASSES),
    ("lion_8bit segments, runs decode", "lion_8bit", SEGMENTS | RUNS_DECODE),
    ("lion_8bit segments, segment encode", "lion_8bit", SEGMENTS | SEGMENT_ENCODE),
    ("lion_8bit segments, blocked scaling", "lion_8bit", SEGMENTS | BLOCKED),
    ("ademamix_8bit segments", "ademamix_8bit", SEGMENTS),
    ("ademamix_8bit segments, table decode", "ademamix_8bit", SEGMENTS | TABLE_DECODE),
    ("ademamix_8bit segments, runs in both passes", "ademamix_8bit", SEGMENTS | RUNS_BOTH_PASSES),
    ("ademamix_8bit segments, runs decode", "ademamix_8bit", SEGMENTS | RUNS_DECODE),
    ("ademamix_8bit segments, segment encode", "ademamix_8bit", SEGMENTS | SEGMENT_ENCODE),
    ("ademamix_8bit tables", "ademamix_8bit", TABLES),
]


def kernels(hlo: str, leaf_elements: int) -> list[str]:
    """The entry computation's fusions and copies, each with the leaf-sized arrays it writes."""
    entry = hlo[hlo.index("\nENTRY") :]
    out = []
    for line in entry.splitlines():
        found = re.match(r"\s*(?:ROOT )?%(\S+) = (.+?) (fusion|copy)\(", line)
        if not found:
            continue
        name, shape, op = found.groups()
        big = [
            (dtype, dims)
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape)
            if math.prod(int(d) for d in dims.split(",") if d) == leaf_elements
        ]
        kind = re.search(r"kind=(\w+)", line)
        out.append(
            f"{name} ({op}{', ' + kind.group(1) if kind else ''}) writes "
            + (", ".join(f"{t}[{d}]" for t, d in big) or "small arrays")
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--only", default="", help="variant names, separated by semicolons")
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--dump", type=pathlib.Path, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--compile-only-for",
        type=pathlib.Path,
        default=None,
        help="a GPU target config (text proto, as benchmarks/h100_sxm.txtpb): compile for "
        "that GPU without one (needs jax-cuda12-plugin and -pjrt of jax's version), no timing",
    )
    args = parser.parse_args()
    info = machine()
    shape = (args.rows, 4096)
    n = args.rows * 4096
    if args.compile_only_for is not None:
        sharding = gpu_sharding(args.compile_only_for)
        params = grads = placed({"w": jax.ShapeDtypeStruct(shape, jnp.float32)}, sharding)
        args.no_time = True
        info["platform"], info["device"] = "gpu compile-only", args.compile_only_for.stem
    else:
        params = {"w": 0.02 * jax.random.normal(jax.random.key(0), shape)}
        grads = {"w": 0.02 * jax.random.normal(jax.random.key(1), shape)}
    wanted = [w for w in args.only.split(";") if w]
    report = {"machine": info, "rows": args.rows, "variants": {}}
    runners = {}
    for index, (name, optimizer, settings) in enumerate(VARIANTS):
        if wanted and name not in wanted:
            continue
        with patched(settings):
            tx = getattr(varjax, optimizer)(LR)
            state = jax.eval_shape(tx.init, params)
            if args.compile_only_for is not None:  # on the compile-only GPU too
                state = placed(state, sharding)
            compiled = donating_train_step(tx).lower(params, state, grads).compile()
            runner = None if args.no_time else compiled_runner(tx, params, grads)
        hlo = compiled.as_text()
        found = kernels(hlo, n)
        temp = compiled.memory_analysis().temp_size_in_bytes / n
        report["variants"][name] = {"temp_bytes_per_param": temp, "kernels": found}
        print(f"== {name}: temp {temp:.3f} B/param, {len(found)} kernels", flush=True)
        for k in found:
            print(f"     {k}", flush=True)
        if runner is not None:  # the timed step, compiled from concrete arrays: the same?
            timed = kernels(runner.step.as_text(), n)
            report["variants"][name]["timed_step_compiles_alike"] = timed == found
            if timed != found:
                print("   the timed step (concrete arrays) compiled differently:", flush=True)
                for k in timed:
                    print(f"     {k}", flush=True)
        if args.dump is not None:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"variant{index}.hlo.txt").write_text(f"// {name}\n{hlo}")
        if runner is not None:
            runners[name] = runner
    if runners:
        times = {name: [] for name in runners}
        for _ in range(5):
            for name, runner in runners.items():
                times[name].append(runner.run(10))
        for name, t in times.items():
            ms = 1e3 * statistics.median(t)
            report["variants"][name]["step_ms"] = ms
            print(f"step {name:<48} {ms:7.3f} ms", flush=True)
    if args.out is not None:
        write_results(
            args.out,
            f"step_fusions_{info['platform'].replace(' ', '_')}{args.tag}",
            to_markdown(report, args.rows),
            report,
        )


def to_markdown(report: dict, rows: int) -> str:
    info = report["machine"]
    lines = [
        f"# step_fusions.py: one leaf of {rows:,} x 4096",
        "",
        f"- machine: {info['platform']} / {info['device']} / {info['cpu']} / {info['cores']} cores",
        f"- software: jax {info['jax']}, optax {info['optax']}, varjax {info['varjax']}, "
        f"{info['date']}",
        "- XLA temp: `compiled.memory_analysis().temp_size_in_bytes` / parameter; ms: median "
        "step time (not measured when compiled only)",
        "",
        "| variant | XLA temp B/param | ms | kernels writing leaf-sized arrays |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, v in report["variants"].items():
        written = "; ".join(k for k in v["kernels"] if not k.endswith("small arrays"))
        ms = f"{v['step_ms']:.3f}" if "step_ms" in v else ""
        lines.append(f"| {name} | {v['temp_bytes_per_param']:.3f} | {ms} | {written} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
