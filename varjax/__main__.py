"""``python -m varjax``: a short demo that trains a tiny model with varjax optimizers.

A two-layer MLP (Flax NNX) is fitted to a generated regression problem with
label noise; each optimizer starts from the same initialisation and sees the
same batches, and the train and validation losses are printed as they go.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import varjax

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "radam": lambda lr: varjax.radam(lr),
    "adopt": lambda lr: varjax.adopt(lr),
    "adamw (optax)": lambda lr: optax.adamw(lr, weight_decay=0.0),
}


def make_regression(seed: int, n: int = 2048, dim: int = 16, noise: float = 0.3):
    """A smooth nonlinear target of ``dim`` inputs plus Gaussian label noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    w = rng.normal(size=(dim,)) / np.sqrt(dim)
    y = np.sin(x @ w * 2.0) + 0.5 * np.tanh(x[:, 0] * x[:, 1])
    y = (y + noise * rng.normal(size=n)).astype(np.float32)[:, None]
    split = n * 3 // 4
    return (x[:split], y[:split]), (x[split:], y[split:])


class MLP(nnx.Module):
    """Two hidden layers of GELU units."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List(
            [nnx.Linear(dim, hidden, rngs=rngs), nnx.Linear(hidden, hidden, rngs=rngs)]
        )
        self.head = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.gelu(layer(x))
        return self.head(x)


def mse(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(mse)(model, x, y)
    optimizer.update(model, grads)
    return loss


def train(name: str, args: argparse.Namespace, data) -> list[tuple[int, float, float]]:
    """Train one model; return (step, train loss, validation loss) every ``log_every`` steps."""
    (x_train, y_train), (x_val, y_val) = data
    model = MLP(x_train.shape[1], args.hidden, rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, OPTIMIZERS[name](args.learning_rate), wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    history = []
    for step in range(1, args.steps + 1):
        idx = rng.integers(0, len(x_train), size=args.batch_size)
        loss = train_step(model, optimizer, x_train[idx], y_train[idx])
        if step % args.log_every == 0 or step == args.steps:
            history.append((step, float(loss), float(mse(model, x_val, y_val))))
    return history


def run_demo(args: argparse.Namespace) -> int:
    data = make_regression(args.seed)
    print(
        f"varjax {varjax.__version__} demo on {jax.default_backend()}: MLP regression, "
        f"{args.steps} steps, batch {args.batch_size}, learning rate {args.learning_rate}"
    )
    results = {}
    for name in OPTIMIZERS:
        start = time.perf_counter()
        results[name] = train(name, args, data)
        _, train_loss, val_loss = results[name][-1]
        print(
            f"  {name:<14} train {train_loss:.4f}  val {val_loss:.4f}  "
            f"({time.perf_counter() - start:.1f}s)"
        )
    print("\nvalidation loss by step")
    print("  step  " + "".join(f"{name:>16}" for name in results))
    for row in zip(*results.values(), strict=True):
        print(f"  {row[0][0]:>4}  " + "".join(f"{val:>16.4f}" for _, _, val in row))
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m varjax", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="train a tiny MLP with varjax optimizers (default)")
    for p in (parser, demo):
        p.add_argument("--steps", type=int, default=600, help="training steps per optimizer")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--learning-rate", type=float, default=3e-3)
        p.add_argument("--hidden", type=int, default=64)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)
    for flag in ("steps", "batch_size", "hidden", "log_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not args.learning_rate > 0:
        parser.error("--learning-rate must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_demo(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
