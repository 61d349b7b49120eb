"""Convergence of varjax optimizers against AdamW on a small real model.

Suites: ``ademamix`` (AdEMAMix with and without the paper's schedulers, over a
long horizon), ``mars`` (MARS-AdamW, approximate and exact, at AdamW's
learning rate and at twice it, since the MARS paper runs MARS at a larger rate)
and ``quantized`` (AdamW with 8-bit and 4-bit state, nearest and stochastic
rounding).

Task: a character-level language model (an MLP over the previous ``--context``
characters) trained on the source of Python's standard library, which ships with
every Python install; the last 10% of the text is held out for validation. All
optimizers start from the same initialisation and see the same batches. The
slow EMA of AdEMAMix (b3 = 0.9999, a half-life of ~6900 steps) only matters over
thousands of steps, hence the long run.

Rerun (from the repository root; writes ``results/convergence_SUITE[_TAG].{md,json,png}``):

    python benchmarks/convergence.py --steps 24000 --batch 256 --log-every 500
    python benchmarks/convergence.py --steps 24000 --batch 256 --log-every 500 \
        --chars 2000000 --tag repeated     # a small text seen ~3.4 times
    python benchmarks/convergence.py --suite mars --steps 12000 --batch 256 --log-every 500
    python benchmarks/convergence.py --suite quantized --steps 12000 --batch 256 --log-every 500
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import varjax
from varjax.compare.tasks import stdlib_text


def encode(text: str) -> tuple[np.ndarray, int]:
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return np.array([index[c] for c in text], np.int32), len(alphabet)


def init_model(key: jax.Array, vocab: int, context: int, embed: int, hidden: int) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed": 0.1 * jax.random.normal(k1, (vocab, embed)),
        "hidden": {
            "kernel": jax.random.normal(k2, (context * embed, hidden)) / np.sqrt(context * embed),
            "bias": jnp.zeros(hidden),
        },
        "out": {
            "kernel": jax.random.normal(k3, (hidden, vocab)) / np.sqrt(hidden),
            "bias": jnp.zeros(vocab),
        },
    }


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = params["embed"][x].reshape(x.shape[0], -1)
    h = jax.nn.gelu(h @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batches(tokens: np.ndarray, context: int, batch: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(tokens) - context - 1, batch)
        idx = starts[:, None] + np.arange(context + 1)
        window = tokens[idx]
        yield window[:, :-1], window[:, -1]


def optimizers(
    suite: str, lr: float, steps: int, weight_decay: float
) -> dict[str, optax.GradientTransformation]:
    """The optimizers of a suite; names ending in ``exact`` get the exact-form gradients."""

    def schedule(peak: float) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(0.0, peak, steps // 20, steps)

    if suite == "mars":
        return {
            "adamw": optax.adamw(schedule(lr), weight_decay=weight_decay),
            "adamw (2x lr)": optax.adamw(schedule(2 * lr), weight_decay=weight_decay),
            "mars_adamw": varjax.mars_adamw(schedule(lr), weight_decay=weight_decay),
            "mars_adamw (2x lr)": varjax.mars_adamw(schedule(2 * lr), weight_decay=weight_decay),
            "mars_adamw exact": varjax.mars_adamw(
                schedule(lr), weight_decay=weight_decay, exact=True
            ),
        }
    if suite == "quantized":
        return {
            "adamw": optax.adamw(schedule(lr), weight_decay=weight_decay),
            "adamw_8bit": varjax.adamw_8bit(schedule(lr), weight_decay=weight_decay),
            "adamw_4bit": varjax.adamw_4bit(schedule(lr), weight_decay=weight_decay),
            "adamw_4bit stochastic": varjax.adamw_4bit(
                schedule(lr), weight_decay=weight_decay, stochastic_rounding=True
            ),
        }
    schedule = schedule(lr)
    return {
        "adamw": optax.adamw(schedule, weight_decay=weight_decay),
        "ademamix": varjax.ademamix(schedule, alpha=5.0, weight_decay=weight_decay),
        "ademamix+schedulers": varjax.ademamix(
            schedule,
            alpha=5.0,
            alpha_warmup_steps=steps,
            b3_warmup_steps=steps,
            weight_decay=weight_decay,
        ),
    }


def train(tx, params, tokens, valid, args, seed: int, exact: bool) -> dict[str, list[float]]:
    state = tx.init(params)
    both_gradients = varjax.mars_value_and_grad(loss_fn)

    @jax.jit
    def step(params, previous, state, x, y):
        if exact:  # the gradient at the previous parameters on this batch, too
            loss, grads, previous_grads = both_gradients(params, previous, x, y)
            updates, state = tx.update(grads, state, params, previous_grads=previous_grads)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), params, state, loss

    valid_loss = jax.jit(loss_fn)
    vx, vy = next(batches(valid, args.context, 4096, 1, 1234))
    history: dict[str, list[float]] = {"step": [], "train": [], "valid": []}
    running = []
    previous = params
    for i, (x, y) in enumerate(batches(tokens, args.context, args.batch, args.steps, seed), 1):
        params, previous, state, loss = step(params, previous, state, x, y)
        running.append(loss)
        if i % args.log_every == 0:
            history["step"].append(i)
            history["train"].append(float(jnp.mean(jnp.stack(running))))
            history["valid"].append(float(valid_loss(params, vx, vy)))
            running = []
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--suite", choices=["ademamix", "mars", "quantized"], default="ademamix")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=200)
    parser.add_argument(
        "--chars", type=int, default=24_000_000, help="text size; small values repeat data"
    )
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results"
    )
    parser.add_argument("--replot", type=pathlib.Path, help="only redraw the plot of this JSON")
    args = parser.parse_args()
    if args.replot:
        record = json.loads(args.replot.read_text())
        plot(record["results"], args.replot.with_suffix(".png"), record.get("title", ""))
        return

    tokens, vocab = encode(stdlib_text(args.chars))
    split = int(0.9 * len(tokens))
    train_tokens, valid_tokens = tokens[:split], tokens[split:]
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        params = init_model(jax.random.key(seed), vocab, args.context, 32, 512)
        for name, tx in optimizers(args.suite, args.lr, args.steps, args.weight_decay).items():
            start = time.perf_counter()
            exact = name.endswith("exact")
            results.setdefault(name, []).append(
                train(tx, params, train_tokens, valid_tokens, args, seed, exact)
            )
            final = results[name][-1]["valid"][-1]
            print(
                f"seed {seed} {name:<20} valid {final:.4f} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
            write_results(results, args, vocab, len(tokens))  # partial results survive a cut
    plot(results, output(args, ".png"), title(args, len(tokens)))


def output(args, suffix: str) -> pathlib.Path:
    return args.out / f"convergence_{args.suite}{args.tag and '_' + args.tag}{suffix}"


def title(args, n_tokens: int) -> str:
    epochs = args.steps * args.batch / (0.9 * n_tokens)
    return f"char-level MLP, {n_tokens / 1e6:.1f}M chars of Python stdlib, {epochs:.2f} epochs"


def write_results(results, args, vocab: int, n_tokens: int) -> None:
    """The table (markdown) and the raw curves (JSON)."""
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {args.suite} suite vs AdamW: character-level MLP on the Python standard library",
        "",
        f"- {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
        f"{datetime.date.today().isoformat()}",
        f"- {n_tokens:,} characters (vocabulary {vocab}), 90/10 split; context {args.context}, "
        f"batch {args.batch}, {args.steps} steps, lr {args.lr} (5% warm-up, cosine), "
        f"weight decay {args.weight_decay}, {args.seeds} seeds; "
        f"{args.steps * args.batch / (0.9 * n_tokens):.2f} passes over the training text",
        "",
        "| optimizer | final valid loss (mean +- sd) | best valid loss (mean) "
        "| final train loss (mean) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, runs in results.items():
        finals = np.array([r["valid"][-1] for r in runs])
        bests = np.array([min(r["valid"]) for r in runs])
        train = np.array([r["train"][-1] for r in runs])
        lines.append(
            f"| {name} | {finals.mean():.4f} +- {finals.std():.4f} | {bests.mean():.4f} "
            f"| {train.mean():.4f} |"
        )
    output(args, ".md").write_text("\n".join(lines) + "\n")
    record = {
        "args": {**vars(args), "out": str(args.out), "replot": None},
        "title": title(args, n_tokens),
        "results": results,
    }
    output(args, ".json").write_text(json.dumps(record))
    print("\n".join(lines), flush=True)


def plot(results, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, runs) in enumerate(results.items()):
        color = f"C{i}"
        steps = runs[0]["step"]
        ax.plot(steps, np.mean([r["valid"] for r in runs], axis=0), color=color, label=name)
        ax.plot(steps, np.mean([r["train"] for r in runs], axis=0), color=color, ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char, mean over seeds)")
    ax.set_title(f"{title}\nsolid: validation, dotted: training (running mean)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
