"""Gradient noise scale and per-layer GSNR of a small real model during training.

The model and data are those of ``convergence.py`` (a character-level MLP on the
source of Python's standard library), trained with AdamW. Each step computes the
gradients of ``--microbatches`` equal micro-batches with ``jax.vmap``; their mean
is the large-batch gradient that AdamW uses, the first micro-batch's gradient is
the small-batch one. Two varjax monitors in front of AdamW read them:

- ``varjax.gradient_noise_scale``: ``B_simple = tr(Sigma) / |G|^2``, the batch
  size around which larger batches stop paying off (McCandlish et al., 2018);
- ``varjax.gradient_snr_monitor``: per-layer gradient signal-to-noise ratio
  across the micro-batches (that of micro-batch gradients, ``batch /
  microbatches`` times the per-example GSNR).

Rerun (from the repository root; writes ``results/noise_diagnostics.{md,json,png}``):

    JAX_PLATFORMS=cpu python benchmarks/noise_diagnostics.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from convergence import batches, encode, init_model, loss_fn

import varjax
from varjax.compare.tasks import stdlib_text

LAYERS = {"embed": ("embed",), "hidden": ("hidden", "kernel"), "out": ("out", "kernel")}


def make_step(tx, microbatches: int):
    grad_fn = jax.value_and_grad(loss_fn)

    @jax.jit
    def step(params, state, x, y):
        xs = x.reshape(microbatches, -1, *x.shape[1:])
        ys = y.reshape(microbatches, -1)
        losses, micro = jax.vmap(grad_fn, in_axes=(None, 0, 0))(params, xs, ys)
        grads = jax.tree.map(lambda g: g.mean(0), micro)
        small = jax.tree.map(lambda g: g[0], micro)
        updates, state = tx.update(
            grads, state, params, small_batch_grads=small, microbatch_grads=micro
        )
        return optax.apply_updates(params, updates), state, losses.mean()

    return step


def train(args) -> dict[str, list[float]]:
    tokens, vocab = encode(stdlib_text(args.chars))
    small = args.batch // args.microbatches
    tx = optax.chain(
        varjax.gradient_noise_scale(small, args.batch, decay=args.decay),
        varjax.gradient_snr_monitor(decay=args.decay),
        optax.adamw(args.lr, weight_decay=0.1),
    )
    params = init_model(jax.random.key(0), vocab, args.context, 32, 512)
    state = tx.init(params)
    step = make_step(tx, args.microbatches)
    history: dict[str, list[float]] = {"step": [], "loss": [], "noise_scale": []}
    history |= {f"gsnr/{name}": [] for name in LAYERS}
    losses = []
    for i, (x, y) in enumerate(batches(tokens, args.context, args.batch, args.steps, 0), 1):
        params, state, loss = step(params, state, x, y)
        losses.append(loss)
        if i % args.log_every == 0:
            noise, snr = state[0], state[1]
            history["step"].append(i)
            history["loss"].append(float(jnp.mean(jnp.stack(losses))))
            history["noise_scale"].append(float(noise.noise_scale))
            for name, path in LAYERS.items():
                value = snr.gsnr
                for key in path:
                    value = value[key]
                history[f"gsnr/{name}"].append(float(value))
            losses = []
    return history


def plot(history: dict[str, list[float]], path: pathlib.Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(history["step"], history["loss"])
    axes[0].set(title="training loss (running mean)", xlabel="step", ylabel="nats/char")
    axes[1].plot(history["step"], history["noise_scale"])
    axes[1].axhline(args.batch, color="gray", linestyle=":", label=f"batch {args.batch}")
    axes[1].set(title="gradient noise scale B_simple", xlabel="step", yscale="log")
    axes[1].legend()
    for name in LAYERS:
        axes[2].plot(history["step"], history[f"gsnr/{name}"], label=name)
    axes[2].set(title=f"GSNR across {args.microbatches} micro-batches", xlabel="step", yscale="log")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--decay", type=float, default=0.99, help="EMA decay of both monitors")
    parser.add_argument("--chars", type=int, default=4_000_000)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results"
    )
    args = parser.parse_args()
    if args.batch % args.microbatches:
        parser.error("--batch must be a multiple of --microbatches")
    history = train(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "noise_diagnostics"
    plot(history, stem.with_suffix(".png"), args)
    record = {
        "date": datetime.date.today().isoformat(),
        "platform": jax.default_backend(),
        "args": vars(args) | {"out": str(args.out)},
        "history": history,
    }
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    rows = [
        "# Gradient noise scale and GSNR: character-level MLP, AdamW",
        "",
        f"- {jax.default_backend()}, jax {jax.__version__}, {record['date']}; "
        f"batch {args.batch} in {args.microbatches} micro-batches, lr {args.lr}, "
        f"{args.steps} steps, EMA decay {args.decay} (both monitors)",
        "",
        "| step | loss | B_simple | " + " | ".join(f"GSNR {n}" for n in LAYERS) + " |",
        "| ---: | ---: | ---: | " + " | ".join("---:" for _ in LAYERS) + " |",
    ]
    every = max(1, len(history["step"]) // 10)
    for k in range(every - 1, len(history["step"]), every):
        cells = [f"{history[f'gsnr/{n}'][k]:.3g}" for n in LAYERS]
        rows.append(
            f"| {history['step'][k]} | {history['loss'][k]:.3f} | "
            f"{history['noise_scale'][k]:.1f} | " + " | ".join(cells) + " |"
        )
    table = "\n".join(rows) + "\n"
    stem.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
