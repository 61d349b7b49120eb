"""Pure-bfloat16 training on the comparison job's task: AdamW with float32 weights against
bfloat16 weights rounded to nearest and bfloat16 weights with each of varjax's three fixes.

Configurations (all AdamW with the same hyper-parameters and schedule, float32 moments):

* ``fp32``: ``optax.adamw`` on float32 weights (float32 forward pass);
* ``bf16_nearest``: bfloat16 weights, each step's ``p + u`` rounded to nearest
  (``varjax.low_precision_weights(adamw, "nearest")``);
* ``bf16_stochastic``, ``bf16_kahan``, ``bf16_split``: bfloat16 weights with
  stochastic rounding, Kahan compensation, and the 16+16 split mantissa;
* ``bf16_optax`` (with ``--with-plain``): ``optax.adamw`` initialised on the
  bfloat16 weights as they are (bfloat16 moments, bfloat16 updates).

The bfloat16 runs start from the float32 initialisation rounded to bfloat16
and run the model's forward and backward passes in bfloat16 (the Flax modules
follow their parameters' dtype); the loss is taken in float32. The task and the
training loop are ``varjax.compare``'s (``build_task``, ``train``): same batches
and initialisation per seed for every configuration. The learning rate follows
a warm-up + cosine schedule from the task's AdamW rate down to 1/10 of it, so
that late updates are small against the weights, where round-to-nearest loses
them.

Also records bytes per parameter of weights + optimizer state for each
configuration (``varjax.state_bytes`` of the state and the weights' own bytes),
on the task's model and with 8-bit moments (``bf16_adamw_8bit``).

Rerun (writes ``results/bf16_quality.{json,md,png}``)::

    python benchmarks/bf16_quality.py --tiny --steps 1500 --seeds 0,1,2 --tag tiny
    python benchmarks/bf16_quality.py --steps 200 --seeds 0 --tag full_200steps
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import varjax
from varjax.compare.report import plot_curves
from varjax.compare.tasks import DEFAULTS, Task, build_task
from varjax.compare.train import train

ROUNDINGS = {
    "bf16_nearest": "nearest",
    "bf16_stochastic": "stochastic",
    "bf16_kahan": "kahan",
    "bf16_split": "split",
}


def to_bf16(tree):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)


def bf16_task(task: Task) -> Task:
    """The same task with its initial parameters rounded to bfloat16."""
    return dataclasses.replace(task, init_params=lambda seed: to_bf16(task.init_params(seed)))


def adamw(schedule, weight_decay: float) -> optax.GradientTransformation:
    return optax.adamw(schedule, weight_decay=weight_decay)


def configurations(schedule, weight_decay: float, with_plain: bool, rounding_seed: int = 0) -> dict:
    """name -> (optimizer, weights in bfloat16?)."""
    configs = {"fp32": (adamw(schedule, weight_decay), False)}
    for name, rounding in ROUNDINGS.items():
        tx = varjax.low_precision_weights(
            adamw(schedule, weight_decay), rounding, seed=rounding_seed
        )
        configs[name] = (tx, True)
    if with_plain:
        configs["bf16_optax"] = (adamw(schedule, weight_decay), True)
    return configs


def weight_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def memory_table(task: Task, learning_rate: float) -> list[dict]:
    """Bytes per parameter of weights + state, from shapes only (``jax.eval_shape``)."""
    f32 = jax.eval_shape(lambda: task.init_params(0))
    bf16 = jax.eval_shape(lambda: to_bf16(task.init_params(0)))
    n = task.n_params
    rows = []
    cases = [
        ("optax.adamw, float32 weights", optax.adamw(learning_rate), f32),
        ("varjax.adamw_8bit, float32 weights", varjax.adamw_8bit(learning_rate), f32),
        ("optax.adamw on bfloat16 weights (bfloat16 moments)", optax.adamw(learning_rate), bf16),
    ]
    for rounding in ("nearest", "stochastic", "kahan", "split"):
        cases.append(
            (
                f"bf16_adamw rounding={rounding}",
                varjax.bf16_adamw(learning_rate, rounding=rounding),
                bf16,
            )
        )
    for rounding in ("nearest", "stochastic", "kahan", "split"):
        cases.append(
            (
                f"bf16_adamw_8bit rounding={rounding}",
                varjax.bf16_adamw_8bit(learning_rate, rounding=rounding),
                bf16,
            )
        )
    for name, tx, params in cases:
        state = jax.eval_shape(tx.init, params)
        w, s = weight_bytes(params), varjax.state_bytes(state)
        rows.append(
            {
                "configuration": name,
                "weights_bytes_per_param": w / n,
                "state_bytes_per_param": s / n,
                "total_bytes_per_param": (w + s) / n,
            }
        )
    return rows


def large_memory_table(learning_rate: float) -> list[dict]:
    """The same on a GPT-2-small-like set of shapes (where 8-bit state applies to
    nearly every leaf, unlike the small task's model whose leaves are mostly under
    ``min_size``)."""
    d, layers, vocab = 768, 12, 50257
    shapes = {"embed": (vocab, d)}
    for i in range(layers):
        shapes[f"block{i}"] = {
            "qkv": (d, 3 * d),
            "proj": (d, d),
            "up": (d, 4 * d),
            "down": (4 * d, d),
            "ln": (d,),
        }
    n = sum(
        int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    )

    def params(dtype):
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple)
        )

    cases = [
        ("optax.adamw, float32 weights", optax.adamw(learning_rate), params(jnp.float32)),
        (
            "varjax.adamw_8bit, float32 weights",
            varjax.adamw_8bit(learning_rate),
            params(jnp.float32),
        ),
    ]
    for rounding in ("stochastic", "kahan", "split"):
        cases.append(
            (
                f"bf16_adamw rounding={rounding}",
                varjax.bf16_adamw(learning_rate, rounding=rounding),
                params(jnp.bfloat16),
            )
        )
    for rounding in ("stochastic", "kahan", "split"):
        cases.append(
            (
                f"bf16_adamw_8bit rounding={rounding}",
                varjax.bf16_adamw_8bit(learning_rate, rounding=rounding),
                params(jnp.bfloat16),
            )
        )
    rows = []
    for name, tx, p in cases:
        state = jax.eval_shape(tx.init, p)
        w, s = weight_bytes(p), varjax.state_bytes(state)
        rows.append(
            {
                "configuration": name,
                "weights_bytes_per_param": w / n,
                "state_bytes_per_param": s / n,
                "total_bytes_per_param": (w + s) / n,
            }
        )
    return rows, n


def markdown(record: dict) -> str:
    lines = [
        "# Pure-bfloat16 training: AdamW, float32 weights against bfloat16 weights",
        "",
        f"Task: {record['task']}. {record['steps']} steps, batch {record['batch_size']}, "
        f"seeds {record['seeds']}, learning rate {record['learning_rate']} warm-up "
        f"{record['warmup']} then cosine to {record['final_learning_rate']}, weight decay "
        f"{record['weight_decay']}. Machine: {record['machine']}. Rerun: `{record['command']}`.",
        "",
        "| configuration | final valid loss (mean ± std over seeds) | vs fp32 | per seed |",
        "| --- | --- | --- | --- |",
    ]
    base = record["results"].get("fp32", {}).get("valid_mean", math.nan)
    for name, r in record["results"].items():
        rel = 100 * (r["valid_mean"] - base) / base
        seeds = ", ".join(f"{v:.4f}" for v in r["valid_final"])
        lines.append(
            f"| {name} | {r['valid_mean']:.4f} ± {r['valid_std']:.4f} | {rel:+.2f}% | {seeds} |"
        )
    for title, key in (
        (f"Bytes per parameter on the task's model ({record['n_params']} parameters)", "memory"),
        (
            f"Bytes per parameter on GPT-2-small-like shapes ({record['large_n_params']} "
            "parameters, shapes only)",
            "memory_large",
        ),
    ):
        lines += [
            "",
            f"## {title}",
            "",
            "| configuration | weights | state | weights + state |",
            "| --- | --- | --- | --- |",
        ]
        for row in record[key]:
            lines.append(
                f"| {row['configuration']} | {row['weights_bytes_per_param']:.2f} | "
                f"{row['state_bytes_per_param']:.2f} | {row['total_bytes_per_param']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="charlm")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--tiny", action="store_true", help="the task's tiny version (tests)")
    parser.add_argument("--with-plain", action="store_true", help="add optax.adamw on bf16")
    parser.add_argument("--only", default="", help="comma-separated subset of configurations")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--rounding-seed", type=int, default=0, help="stochastic rounding's")
    args = parser.parse_args()

    defaults = DEFAULTS[args.task]
    batch = args.batch_size or defaults.batch_size
    seeds = [int(s) for s in args.seeds.split(",")]
    lr = defaults.learning_rate
    warmup = min(100, args.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, args.steps, end_value=lr / 10)
    task = build_task(args.task, tiny=args.tiny)
    task16 = bf16_task(task)
    configs = configurations(schedule, args.weight_decay, args.with_plain, args.rounding_seed)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}

    runs, results = {}, {}
    for name, (tx, half) in configs.items():
        tic = time.perf_counter()
        run = train(
            task16 if half else task,
            tx,
            steps=args.steps,
            batch_size=batch,
            eval_every=min(args.eval_every, args.steps),
            seeds=seeds,
        )
        runs[name] = run
        valid = [c.valid[-1] for c in run.curves]
        results[name] = {
            "valid_final": valid,
            "valid_mean": float(np.mean(valid)),
            "valid_std": float(np.std(valid)),
            "train_final": [c.train[-1] for c in run.curves],
            "curves": [dataclasses.asdict(c) for c in run.curves],
            "ms_per_step_cpu": run.ms_per_step,
        }
        print(
            f"{name:16s} valid {np.mean(valid):.4f} ± {np.std(valid):.4f}  "
            f"({time.perf_counter() - tic:.0f}s)",
            flush=True,
        )

    large, large_n = large_memory_table(lr)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/bf16_quality.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k in ("steps", "seeds", "task", "eval_every", "tag", "only", "rounding_seed")
            and v != ""
        )
        + (" --tiny" if args.tiny else ""),
        "machine": (
            f"{platform.machine()} {jax.devices()[0].platform}, "
            f"{jax.device_count()} device(s), jax {jax.__version__}"
        ),
        "task": task.summary + (" (the task's --tiny version)" if args.tiny else ""),
        "n_params": task.n_params,
        "steps": args.steps,
        "batch_size": batch,
        "seeds": seeds,
        "learning_rate": lr,
        "final_learning_rate": lr / 10,
        "warmup": warmup,
        "weight_decay": args.weight_decay,
        "results": results,
        "memory": memory_table(task, lr),
        "memory_large": large,
        "large_n_params": large_n,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bf16_quality" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(record))
    plot_curves(
        runs,
        out / f"{stem}.png",
        f"{task.summary}; {args.steps} steps; AdamW, float32 vs bfloat16 weights",
        baseline="fp32",
    )
    print(markdown(record))


if __name__ == "__main__":
    main()
