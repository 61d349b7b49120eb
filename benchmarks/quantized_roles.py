"""``quantize_state`` around Optax's transforms: state bytes and final loss, fp32 vs 8 bits.

For each transform of the role table that trains without extra arguments, the
comparison job's task (``charlm`` by default, ``varjax.compare``) is trained
from the same initialisation and batches with the transform as it is and
wrapped in ``varjax.quantize_state`` (8 bits, ``min_size=4096``). Reported: the
optimizer-state bytes per parameter of both, the final validation loss of both
and their ratio.

Rerun (writes ``results/quantized_roles_<platform>.{md,json}``)::

    python benchmarks/quantized_roles.py --steps 600
    python benchmarks/quantized_roles.py --steps 20 --tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import time

import jax
import optax
import optax.contrib as contrib

import varjax
from varjax.compare.tasks import DEFAULTS, build_task
from varjax.compare.train import train

# learning rates around the task's AdamW rate (3e-3); lr-free methods keep theirs
TRANSFORMS = {
    "adam": lambda: optax.adam(3e-3),
    "adamw": lambda: optax.adamw(3e-3, weight_decay=1e-4),
    "nadam": lambda: optax.nadam(3e-3),
    "amsgrad": lambda: optax.amsgrad(3e-3),
    "lion": lambda: optax.lion(1e-3),
    "adafactor": lambda: optax.adafactor(3e-3),
    "rmsprop": lambda: optax.rmsprop(1e-3),
    "rmsprop_centered": lambda: optax.rmsprop(1e-3, centered=True),
    "adagrad": lambda: optax.adagrad(3e-2),
    "sgd_momentum": lambda: optax.sgd(0.03, momentum=0.9),
    "adabelief": lambda: optax.adabelief(3e-3),
    "yogi": lambda: optax.yogi(3e-3),
    "lamb": lambda: optax.lamb(3e-3),
    "lars": lambda: optax.lars(0.3),
    "novograd": lambda: optax.novograd(3e-3),
    "sm3": lambda: optax.sm3(3e-2),
    "adan": lambda: optax.adan(3e-3),
    "ademamix": lambda: contrib.ademamix(3e-3),
    "adopt": lambda: contrib.adopt(3e-3),
    "cocob": lambda: contrib.cocob(),
    "dadapt_adamw": lambda: contrib.dadapt_adamw(),
    "prodigy": lambda: contrib.prodigy(),
    "schedule_free_adamw": lambda: contrib.schedule_free_adamw(3e-3),
    "muon": lambda: contrib.muon(3e-3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="charlm")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke run")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated names (default: all); their rows replace those of an earlier run",
    )
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()

    task = build_task(args.task, tiny=args.tiny)
    defaults = DEFAULTS[args.task]
    names = [n for n in args.only.split(",") if n] or list(TRANSFORMS)
    rows = []
    for name in names:
        row = {"transform": name}
        for kind, tx in (
            ("fp32", TRANSFORMS[name]()),
            ("8bit", varjax.quantize_state(TRANSFORMS[name]())),
        ):
            start = time.perf_counter()
            run = train(
                task,
                tx,
                steps=args.steps,
                batch_size=defaults.batch_size,
                eval_every=max(args.steps // 4, 1),
                seeds=[args.seed],
            )
            row[f"{kind}_bytes_per_param"] = run.state_bytes / run.n_params
            row[f"{kind}_valid"] = run.curves[0].valid[-1]
            row[f"{kind}_seconds"] = time.perf_counter() - start
        row["loss_ratio"] = row["8bit_valid"] / row["fp32_valid"]
        rows.append(row)
        print(
            f"{name:20s} bytes/param {row['fp32_bytes_per_param']:6.2f} -> "
            f"{row['8bit_bytes_per_param']:5.2f}  valid {row['fp32_valid']:.4f} -> "
            f"{row['8bit_valid']:.4f}  ratio {row['loss_ratio']:.4f}",
            flush=True,
        )

    device = jax.devices()[0]
    machine = {
        "platform": device.platform,
        "device": getattr(device, "device_kind", str(device)),
        "processor": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "date": datetime.date.today().isoformat(),
    }
    record = {"task": args.task, "steps": args.steps, "seed": args.seed, "tiny": args.tiny}
    record |= {"machine": machine, "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quantized_roles_{device.platform}"
    if args.only and stem.with_suffix(".json").exists():  # keep the other rows
        earlier = json.loads(stem.with_suffix(".json").read_text())["rows"]
        fresh = {r["transform"]: r for r in rows}
        rows = [fresh.pop(r["transform"], r) for r in earlier] + list(fresh.values())
        record["rows"] = rows
        record["rerun"] = {"names": names, "date": machine["date"]}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# quantize_state around Optax transforms ({args.task}, {args.steps} steps, seed "
        f"{args.seed})",
        "",
        f"Machine: {machine['device']} ({machine['platform']}), jax {machine['jax']}, optax "
        f"{machine['optax']}, {machine['date']}. 8 bits, min_size 4096, roles from "
        "varjax.quantization.optax_roles. Rerun: `python benchmarks/quantized_roles.py "
        f"--steps {args.steps}`.",
        "",
        "| transform | state B/param fp32 | 8-bit | valid loss fp32 | 8-bit | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['transform']} | {r['fp32_bytes_per_param']:.2f} | {r['8bit_bytes_per_param']:.2f}"
        f" | {r['fp32_valid']:.4f} | {r['8bit_valid']:.4f} | {r['loss_ratio']:.4f} |"
        for r in rows
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
