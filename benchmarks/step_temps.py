"""XLA's temporaries of a donated quantized step, per leaf shape or tree, from compiling alone.

For issue 20 (8-bit state whose step needs little beyond params + grads + state).
For each ``--shapes`` entry (one float32 leaf of that shape) and each optimizer,
the jitted, donated ``update`` + ``apply_updates`` step of ``tests/memory.py`` is
lowered on ``jax.ShapeDtypeStruct`` inputs and compiled, never run, so shapes
larger than the device's memory can be looked at too. Reported: XLA's
``compiled.memory_analysis().temp_size_in_bytes`` per parameter. With
``--gradient computed`` the step computes the gradient itself (of
``sum(tanh(x @ w))`` for an input ``x`` of 8 rows), as a real train step does: its
buffer is then a temporary too (4 bytes per parameter for ``optax.adamw``), which
XLA may reuse for the quantized step's own. With ``--dump``
the optimized HLO and buffer assignment of each compile are written there
(``XLA_FLAGS=--xla_dump_to``), to see which buffers the temporaries are.

Whole trees go in ``--trees``: ``large:LEAVES:PARAMS`` (``memory.py``'s large leaves
of 16,384 columns) or ``transformer:PARAMS`` (``step_time.py``'s shapes, 138 leaves);
the temporaries are then per parameter of the tree. With ``--compile-only-for`` a
target config (as ``benchmarks/h100_sxm.txtpb``), the steps compile for that GPU on
a machine without one (``compile_only.py``: the CUDA PJRT plugin of jax's version).

Rerun (from the repository root):

    python benchmarks/step_temps.py --shapes 61440x4096,15259x16384 --tag _h100   # GPU
    JAX_PLATFORMS=cpu python benchmarks/step_temps.py --shapes 1024x1024           # CPU
    PYTHONPATH=/tmp/cuda JAX_PLATFORMS=cpu python benchmarks/step_temps.py \
        --shapes 16384x4096 --trees large:8:1e9,transformer:251e6 \
        --compile-only-for benchmarks/h100_sxm.txtpb --tag _h100

Results go to ``benchmarks/results/step_temps_<platform><tag>.{md,json}``.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "tests"))

OPTIMIZERS = ("optax.adamw", "adamw_8bit", "adamw_4bit", "lion_8bit", "ademamix_8bit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shapes", default="61440x4096,15259x16384")
    parser.add_argument("--trees", default="", help="large:LEAVES:PARAMS or transformer:PARAMS")
    parser.add_argument("--compile-only-for", type=pathlib.Path, default=None)
    parser.add_argument("--only", default=",".join(OPTIMIZERS))
    parser.add_argument("--dump", type=pathlib.Path, default=None)
    parser.add_argument("--gradient", choices=["input", "computed"], default="input")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results"
    )
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.dump is not None:  # before jax starts
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text"
        )

    import jax
    import jax.numpy as jnp
    import optax
    from compile_only import gpu_sharding, placed
    from memory import donating_train_step
    from step_time import large_shapes, machine, shapes_for, write_results

    import varjax

    def make(name: str) -> optax.GradientTransformation:
        if name.startswith("optax."):
            return getattr(optax, name.split(".", 1)[1])(1e-3)
        return getattr(varjax, name)(1e-3)

    def train_step(tx: optax.GradientTransformation):
        def loss(params, x):
            w = params["w"].reshape(params["w"].shape[0], -1)
            return jnp.sum(jnp.tanh(x @ w))

        def step(params, state, x):
            updates, state = tx.update(jax.grad(loss)(params, x), state, params)
            return optax.apply_updates(params, updates), state

        return step

    info = machine()
    sharding = None
    if args.compile_only_for is not None:
        sharding = gpu_sharding(args.compile_only_for)
        info["platform"], info["device"] = "gpu compile-only", args.compile_only_for.stem
    trees = {text: {"w": tuple(int(n) for n in text.split("x"))} for text in args.shapes.split(",")}
    for text in filter(None, args.trees.split(",")):
        kind, *numbers = text.split(":")
        if kind == "large":
            trees[text] = large_shapes(int(float(numbers[1])), int(numbers[0]), 16384)
        else:
            trees[text] = shapes_for(int(float(numbers[0])))
    if args.gradient == "computed" and any(len(t) > 1 for t in trees.values()):
        raise SystemExit("--gradient computed takes one-leaf --shapes only")
    rows = []
    for text, shapes in trees.items():
        params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
        if sharding is not None:
            params = placed(params, sharding)
        n = sum(math.prod(s) for s in shapes.values())
        for name in args.only.split(","):
            tx = make(name)
            state = jax.eval_shape(tx.init, params)
            if sharding is not None:
                state = placed(state, sharding)
            if args.gradient == "input":
                lowered = donating_train_step(tx).lower(params, state, params)
            else:
                shape = shapes["w"]
                x = jax.ShapeDtypeStruct((8, shape[0]), jnp.float32, sharding=sharding)
                lowered = jax.jit(train_step(tx), donate_argnums=(0, 1)).lower(params, state, x)
            compiled = lowered.compile()
            temp = compiled.memory_analysis().temp_size_in_bytes / n
            rows.append({"tree": text, "optimizer": name, "temp_bytes_per_param": temp})
            print(f"{text:>20} {name:<16} temp {temp:6.3f} B/param", flush=True)
    lines = [
        "# XLA temporaries of a donated step, per leaf shape or tree (compiled, not run)",
        "",
        f"- machine: {info['platform']} / {info['device']} / {info['cpu']} / {info['cores']} cores",
        f"- software: jax {info['jax']}, optax {info['optax']}, varjax {info['varjax']}, "
        f"{info['date']}",
        "- `compiled.memory_analysis().temp_size_in_bytes` / parameters (of the leaf or tree); "
        f"gradient: {args.gradient}"
        + (
            " (computed in the step: a temporary of 4 B/param)"
            if args.gradient == "computed"
            else ""
        ),
        "",
        "| shape or tree | optimizer | temp B/param |",
        "| --- | --- | ---: |",
    ]
    lines += [f"| {r['tree']} | {r['optimizer']} | {r['temp_bytes_per_param']:.3f} |" for r in rows]
    write_results(
        args.out,
        f"step_temps_{info['platform'].replace(' ', '_')}{args.tag}",
        "\n".join(lines) + "\n",
        {
            "machine": info,
            "rows": rows,
            "args": {
                "shapes": args.shapes,
                "trees": args.trees,
                "only": args.only,
                "gradient": args.gradient,
                "compile_only_for": str(args.compile_only_for or ""),
            },
        },
    )


if __name__ == "__main__":
    main()
