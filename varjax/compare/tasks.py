"""Training tasks for ``python -m varjax compare``; each ships with the package, no download.

* ``charlm``: a small character-level transformer (Flax NNX) trained on the
  ``.py`` source of Python's standard library, which ships with every Python
  install. The text is read in sorted path order and capped, so it is the same
  on every run with the same Python; the last 10% is held out for validation.
* ``regression``: a two-layer MLP fitted to a generated nonlinear regression
  problem with Gaussian label noise (an MSE floor of ``noise ** 2``).

A ``Task`` is functional: parameters are a nested dict of arrays (the
pure-dict form of the NNX model's ``flax.nnx.Param`` state), ``loss`` and
``sample_batch`` are pure functions that ``jax.jit`` and ``jax.lax.scan`` can
trace, and the training data is passed in as an argument (never baked into the
compiled program as a constant).

Examples:
  >>> task = build_task("regression", tiny=True)
  >>> task.name, task.n_params
  ('regression', 561)
  >>> params = task.init_params(0)
  >>> batch = task.sample_batch(task.train_data, jax.random.key(0), 8)
  >>> [x.shape for x in batch]
  [(8, 16), (8, 1)]
  >>> bool(task.loss(params, task.eval_batch) > 0)
  True
"""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "CHARLM_SIZES",
    "DEFAULTS",
    "PRESETS",
    "TASKS",
    "CharLMSize",
    "CharTransformer",
    "Preset",
    "Task",
    "TaskDefaults",
    "build_task",
    "encode_ascii",
    "stdlib_text",
]

Params = dict[str, Any]
Batch = Any

VOCAB = 128  # ASCII: every character code fits, non-ASCII characters read as "?"


@dataclasses.dataclass(frozen=True)
class TaskDefaults:
    """Command-line defaults of a task; ``learning_rate`` is AdamW's (the baseline)."""

    learning_rate: float
    steps: int
    batch_size: int


DEFAULTS: dict[str, TaskDefaults] = {
    "charlm": TaskDefaults(learning_rate=3e-3, steps=600, batch_size=32),
    "regression": TaskDefaults(learning_rate=3e-3, steps=600, batch_size=64),
}


@dataclasses.dataclass(frozen=True)
class CharLMSize:
    """The shape of the ``charlm`` model and its data."""

    context: int
    d_model: int
    n_layers: int
    n_heads: int
    max_chars: int
    n_eval: int

    def n_params(self) -> int:
        """Embeddings, ``n_layers`` blocks (two norms, ``qkv``, ``proj``, 4x MLP), norm, head.

        Examples:
          >>> CHARLM_SIZES["default"].n_params()
          120704
        """
        d = self.d_model
        block = (
            2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        )
        return (VOCAB + self.context) * d + self.n_layers * block + 2 * d + d * VOCAB + VOCAB


CHARLM_SIZES: dict[str, CharLMSize] = {
    "tiny": CharLMSize(32, 32, 1, 2, max_chars=200_000, n_eval=32),
    "default": CharLMSize(64, 64, 2, 4, max_chars=3_000_000, n_eval=256),
    # about 25M parameters for an accelerator; the standard library's ~30M characters
    "gpu": CharLMSize(256, 512, 8, 8, max_chars=30_000_000, n_eval=512),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named set of command-line defaults: a task, its size and its training budget."""

    task: str
    size: str
    defaults: TaskDefaults
    description: str


PRESETS: dict[str, Preset] = {
    "gpu": Preset(
        task="charlm",
        size="gpu",
        defaults=TaskDefaults(learning_rate=5e-4, steps=1000, batch_size=32),
        description=(
            "charlm at 25.5M parameters (8 blocks, d_model 512, 8 heads, context 256) on 30M "
            "chars of the stdlib; 1000 steps of batch 32, AdamW rate 5e-4 (constant, no "
            "warm-up: at 1e-3 the first steps raise the loss)"
        ),
    ),
}
TASKS = tuple(DEFAULTS)


@dataclasses.dataclass(frozen=True)
class Task:
    """A model, its data and its loss, in a form the training loop can jit and scan.

    ``init_params(seed)`` gives the initial parameters; ``sample_batch(train_data,
    key, batch_size)`` draws a training batch on the device; ``loss(params,
    batch)`` is the mean loss; ``eval_batch`` is the fixed validation batch.
    """

    name: str
    summary: str
    init_params: Callable[[int], Params]
    loss: Callable[[Params, Batch], jax.Array]
    sample_batch: Callable[[Any, jax.Array, int], Batch]
    train_data: Any
    eval_batch: Batch
    n_params: int
    info: dict[str, Any]


def build_task(name: str, *, tiny: bool = False, size: str | None = None) -> Task:
    """The task called ``name`` (one of ``TASKS``); ``tiny`` shrinks model and data;
    ``size`` names one of ``CHARLM_SIZES`` (``charlm`` only; it overrides ``tiny``)."""
    if name == "charlm":
        return charlm_task(size or ("tiny" if tiny else "default"))
    if size is not None:
        raise ValueError(f"size {size!r}: only the charlm task has sizes")
    if name == "regression":
        return regression_task(tiny=tiny)
    raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")


def _functional(model: nnx.Module) -> tuple[nnx.GraphDef, Params]:
    """Split an NNX model into its graph and its parameters as a pure nested dict."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, state.to_pure_dict()


def _count(params: Params) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(params))


# --- charlm ------------------------------------------------------------------------------


def stdlib_text(max_chars: int) -> str:
    """The ``.py`` files of the standard library (no site- or dist-packages), in sorted
    path order, concatenated and cut at ``max_chars``.

    Examples:
      >>> text = stdlib_text(1000)
      >>> len(text)
      1000
      >>> text == stdlib_text(1000)
      True
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        chunks.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "".join(chunks)[:max_chars]


def encode_ascii(text: str) -> np.ndarray:
    """Character codes as ``uint8`` (vocabulary ``VOCAB``); non-ASCII becomes ``?``.

    Examples:
      >>> encode_ascii("def é")
      array([100, 101, 102,  32,  63], dtype=uint8)
    """
    return np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8).copy()


class Block(nnx.Module):
    """A pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs) -> None:
        self.n_heads = n_heads
        self.attn_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.proj = nnx.Linear(d_model, d_model, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).reshape(b, t, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.reshape(b, t, d))
        return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class CharTransformer(nnx.Module):
    """Token and position embeddings, ``n_layers`` ``Block``\\ s, a final norm and head.

    Examples:
      >>> model = CharTransformer(context=8, d_model=16, n_layers=1, n_heads=2, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8), jnp.int32)).shape
      (2, 8, 128)
    """

    def __init__(
        self, context: int, d_model: int, n_layers: int, n_heads: int, *, rngs: nnx.Rngs
    ) -> None:
        embed_init = nnx.initializers.normal(0.02)
        self.token = nnx.Embed(VOCAB, d_model, embedding_init=embed_init, rngs=rngs)
        self.position = nnx.Embed(context, d_model, embedding_init=embed_init, rngs=rngs)
        self.blocks = nnx.List([Block(d_model, n_heads, rngs=rngs) for _ in range(n_layers)])
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, VOCAB, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.token(tokens) + self.position(jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _windows(tokens: jax.Array, starts: jax.Array, length: int) -> jax.Array:
    """``tokens[s : s + length]`` for each start ``s``, as an int32 ``[len(starts), length]``."""
    window = jax.vmap(lambda s: jax.lax.dynamic_slice(tokens, (s,), (length,)))(starts)
    return window.astype(jnp.int32)


def charlm_task(size: str = "default") -> Task:
    """Next-character prediction on the standard library's source (nats per character);
    ``size`` is one of ``CHARLM_SIZES``."""
    shape = CHARLM_SIZES[size]
    context, d_model, n_layers, n_heads = (
        shape.context,
        shape.d_model,
        shape.n_layers,
        shape.n_heads,
    )
    max_chars, n_eval = shape.max_chars, shape.n_eval
    tokens = encode_ascii(stdlib_text(max_chars))
    split = len(tokens) * 9 // 10
    train, valid = tokens[:split], tokens[split:]
    eval_starts = np.linspace(0, len(valid) - context - 1, n_eval).astype(np.int32)
    eval_batch = _windows(jnp.asarray(valid), jnp.asarray(eval_starts), context + 1)

    def make(seed: int) -> CharTransformer:
        return CharTransformer(context, d_model, n_layers, n_heads, rngs=nnx.Rngs(seed))

    graphdef, params = _functional(nnx.eval_shape(lambda: make(0)))

    def loss(params: Params, batch: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params)(batch[:, :-1])
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        picked = jnp.take_along_axis(log_probs, batch[:, 1:, None], axis=-1)
        return -jnp.mean(picked)

    def sample_batch(data: jax.Array, key: jax.Array, batch_size: int) -> jax.Array:
        starts = jax.random.randint(key, (batch_size,), 0, data.shape[0] - context)
        return _windows(data, starts, context + 1)

    return Task(
        name="charlm",
        summary=(
            f"char-level transformer ({n_layers} block{'s' * (n_layers > 1)}, d_model {d_model}, "
            f"context {context}) "
            f"on {len(tokens) / 1e6:.2f}M chars of Python's stdlib source"
        ),
        init_params=lambda seed: _functional(make(seed))[1],
        loss=loss,
        sample_batch=sample_batch,
        train_data=jnp.asarray(train),
        eval_batch=eval_batch,
        n_params=_count(params),
        info={
            "chars": len(tokens),
            "train_chars": len(train),
            "valid_chars": len(valid),
            "valid_windows": n_eval,
            "context": context,
            "d_model": d_model,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "vocab": VOCAB,
            "size": size,
            "loss": "cross-entropy, nats per character",
        },
    )


# --- regression --------------------------------------------------------------------------


class MLP(nnx.Module):
    """Two hidden layers of GELU units and a linear head."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List(
            [nnx.Linear(dim, hidden, rngs=rngs), nnx.Linear(hidden, hidden, rngs=rngs)]
        )
        self.head = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.gelu(layer(x))
        return self.head(x)


def make_regression(
    n: int, dim: int, noise: float, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A smooth nonlinear target of ``dim`` inputs plus Gaussian label noise, split 3:1.

    Examples:
      >>> (x, y), (x_val, y_val) = make_regression(8, 4, 0.1)
      >>> x.shape, y.shape, x_val.shape
      ((6, 4), (6, 1), (2, 4))
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    w = rng.normal(size=(dim,)) / np.sqrt(dim)
    y = np.sin(x @ w * 2.0) + 0.5 * np.tanh(x[:, 0] * x[:, 1])
    y = (y + noise * rng.normal(size=n)).astype(np.float32)[:, None]
    split = n * 3 // 4
    return (x[:split], y[:split]), (x[split:], y[split:])


def regression_task(*, tiny: bool = False) -> Task:
    """MSE regression; the data is the same for every seed (only the model's seed varies)."""
    n, dim, hidden, noise = (512, 16, 16, 0.3) if tiny else (2048, 16, 64, 0.3)
    (x, y), (x_val, y_val) = make_regression(n, dim, noise)

    graphdef, params = _functional(nnx.eval_shape(lambda: MLP(dim, hidden, rngs=nnx.Rngs(0))))

    def loss(params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        inputs, targets = batch
        return jnp.mean((nnx.merge(graphdef, params)(inputs) - targets) ** 2)

    def sample_batch(data: Any, key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
        inputs, targets = data
        idx = jax.random.randint(key, (batch_size,), 0, inputs.shape[0])
        return inputs[idx], targets[idx]

    return Task(
        name="regression",
        summary=(
            f"MLP ({dim}-{hidden}-{hidden}-1, GELU) on {n} generated points "
            f"with label noise {noise} (MSE floor {noise**2:.2f})"
        ),
        init_params=lambda seed: _functional(MLP(dim, hidden, rngs=nnx.Rngs(seed)))[1],
        loss=loss,
        sample_batch=sample_batch,
        train_data=(jnp.asarray(x), jnp.asarray(y)),
        eval_batch=(jnp.asarray(x_val), jnp.asarray(y_val)),
        n_params=_count(params),
        info={"points": n, "dim": dim, "hidden": hidden, "noise": noise, "loss": "MSE"},
    )
