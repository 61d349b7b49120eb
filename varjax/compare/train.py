"""The training loop of ``python -m varjax compare``: one compiled program per optimizer.

Each optimizer's training step is jitted inside a ``jax.lax.scan`` over a chunk
of ``eval_every`` steps and compiled once, ahead of time; every seed reuses it.
Batches are drawn on the device from ``jax.random.fold_in(key(seed), step)``, so
for a given seed every optimizer sees the same batches, and starts from the
same parameters. The time per step is the median over chunks of the wall time
of a chunk (``block_until_ready``), leaving out each optimizer's first call.

Examples:
  >>> import optax
  >>> from varjax.compare.tasks import build_task
  >>> task = build_task("regression", tiny=True)
  >>> run = train(task, optax.adam(1e-2), steps=20, batch_size=16, eval_every=10, seeds=[0])
  >>> run.curves[0].steps
  [0, 10, 20]
  >>> run.curves[0].valid[-1] < run.curves[0].valid[0]
  True
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import varjax
from varjax.compare.tasks import Params, Task

__all__ = ["Curve", "OptimizerRun", "RateTrainer", "check_optimizer", "train"]

# progress(steps done in this run, seed, validation loss so far)
Progress = Callable[[int, int, float], None]


@dataclasses.dataclass
class Curve:
    """One seed's losses at ``steps``: ``train`` is the mean training loss over the
    steps since the previous point (at step 0: the loss of the first batch before
    any update), ``valid`` the validation loss at that step."""

    seed: int
    steps: list[int]
    train: list[float]
    valid: list[float]


@dataclasses.dataclass
class OptimizerRun:
    """All seeds of one optimizer, with its speed and memory."""

    curves: list[Curve]
    ms_per_step: float
    compile_seconds: float
    state_bytes: int
    n_params: int

    @property
    def state_bytes_per_param(self) -> float:
        return self.state_bytes / self.n_params


def check_optimizer(task: Task, tx: optax.GradientTransformation) -> None:
    """Trace (not run) one update on the task's parameter shapes, so that a missing
    extra argument (``previous_grads``, ...) fails before any training.

    Examples:
      >>> import optax, varjax
      >>> from varjax.compare.tasks import build_task
      >>> task = build_task("regression", tiny=True)
      >>> check_optimizer(task, optax.adamw(1e-3))
      >>> check_optimizer(task, varjax.mars_adamw(exact=True))
      Traceback (most recent call last):
      ...
      ValueError: mars_correction(exact=True) needs the gradient at the previous parameters ...
    """
    params = jax.eval_shape(lambda: task.init_params(0))

    def one_step(params: Params) -> Any:
        return tx.update(params, tx.init(params), params)

    jax.eval_shape(one_step, params)


# makes the optimizer from its learning rate (a traced scalar when the rate is an argument)
MakeTx = Callable[[Any], optax.GradientTransformation]


def _chunk_fn(task: Task, make_tx: MakeTx, batch_size: int, length: int):
    """``(params, state, data, key, start, rate) -> (params, state, losses)``: ``length``
    steps of ``make_tx(rate)``."""

    def step(carry: tuple[Params, Any], index: jax.Array, data: Any, key: jax.Array, rate: Any):
        params, state = carry
        batch = task.sample_batch(data, jax.random.fold_in(key, index), batch_size)
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        updates, state = make_tx(rate).update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    def chunk(params: Params, state: Any, data: Any, key: jax.Array, start: jax.Array, rate: Any):
        indices = start + jnp.arange(length)
        (params, state), losses = jax.lax.scan(
            lambda carry, i: step(carry, i, data, key, rate), (params, state), indices
        )
        return params, state, losses

    return chunk


def _chunk_lengths(steps: int, eval_every: int) -> list[int]:
    """``[eval_every, ..., remainder]`` summing to ``steps``."""
    lengths = [eval_every] * (steps // eval_every)
    return lengths + ([steps % eval_every] if steps % eval_every else [])


def _compile(
    chunk_fn: Callable[[int], Callable[..., Any]], lengths: list[int], example: tuple
) -> dict[int, Any]:
    """One program per distinct chunk length, compiled ahead of time for ``example`` args."""
    return {n: jax.jit(chunk_fn(n)).lower(*example).compile() for n in sorted(set(lengths))}


def _train_seed(
    task: Task,
    init: Callable[[Params], Any],
    compiled: dict[int, Any],
    lengths: list[int],
    seed: int,
    rate: Any,
    timings: list[float],
    progress: Progress | None,
) -> Curve:
    """Train from ``seed``; append each chunk's seconds per step to ``timings``."""
    evaluate = jax.jit(task.loss)  # the same function every time: compiled once per task
    params, key = task.init_params(seed), jax.random.key(seed)
    state = init(params)
    curve = Curve(seed, [0], [], [float(evaluate(params, task.eval_batch))])
    done = 0
    for n in lengths:
        tic = time.perf_counter()
        params, state, losses = jax.block_until_ready(
            compiled[n](params, state, task.train_data, key, jnp.int32(done), rate)
        )
        timings.append((time.perf_counter() - tic) / n)
        if done == 0:
            curve.train.append(float(losses[0]))  # the first batch, before any update
        done += n
        curve.steps.append(done)
        curve.train.append(float(jnp.mean(losses)))
        curve.valid.append(float(evaluate(params, task.eval_batch)))
        if progress is not None:
            progress(done, seed, curve.valid[-1])
    return curve


@dataclasses.dataclass
class _Program:
    """An optimizer's compiled chunks and state initialisation, for one or all rates."""

    compiled: dict[int, Any]
    init: Callable[[Params], Any]
    compile_seconds: float
    state_bytes: int


def _program(
    task: Task, make_tx: MakeTx, rate: Any, lengths: list[int], batch_size: int, seed: int
) -> _Program:
    params0 = task.init_params(seed)
    init = jax.jit(lambda params: make_tx(rate).init(params))
    state0 = init(params0)
    example = (params0, state0, task.train_data, jax.random.key(seed), jnp.int32(0), rate)
    start = time.perf_counter()
    compiled = _compile(lambda n: _chunk_fn(task, make_tx, batch_size, n), lengths, example)
    return _Program(compiled, init, time.perf_counter() - start, varjax.state_bytes(state0))


def _run(
    task: Task,
    program: _Program,
    lengths: list[int],
    seeds: Sequence[int],
    rate: Any,
    progress: Progress | None,
    compile_seconds: float,
) -> OptimizerRun:
    timings: list[float] = []
    curves = [
        _train_seed(task, program.init, program.compiled, lengths, s, rate, timings, progress)
        for s in seeds
    ]
    timed = timings[1:] or timings  # leave out the first call
    return OptimizerRun(
        curves=curves,
        ms_per_step=1000 * statistics.median(timed),
        compile_seconds=compile_seconds,
        state_bytes=program.state_bytes,
        n_params=task.n_params,
    )


def train(
    task: Task,
    tx: optax.GradientTransformation,
    *,
    steps: int,
    batch_size: int,
    eval_every: int,
    seeds: Sequence[int],
    progress: Progress | None = None,
) -> OptimizerRun:
    """Train ``task`` with ``tx`` for ``steps`` steps from each seed; see the module doc."""
    lengths = _chunk_lengths(steps, eval_every)
    rate = jnp.float32(0)  # unused: tx has its own
    program = _program(task, lambda _: tx, rate, lengths, batch_size, seeds[0])
    return _run(task, program, lengths, seeds, rate, progress, program.compile_seconds)


class RateTrainer:
    """Trains one optimizer at several learning rates, compiling once where it can.

    ``make_tx(rate)`` builds the optimizer. The rate is first tried as a traced
    argument of one compiled program shared by every rate; an optimizer whose
    factory needs a concrete rate (it compares it in Python, say) is compiled
    again for each rate instead. ``shared`` says which happened.

    Examples:
      >>> import optax
      >>> from varjax.compare.tasks import build_task
      >>> task = build_task("regression", tiny=True)
      >>> trainer = RateTrainer(task, optax.adam, steps=20, batch_size=16, eval_every=10, seeds=[0])
      >>> runs = [trainer(rate) for rate in (1e-3, 1e-2)]
      >>> trainer.shared, runs[1].compile_seconds
      (True, 0.0)
      >>> runs[1].curves[0].valid[-1] < runs[0].curves[0].valid[-1]
      True
    """

    def __init__(
        self,
        task: Task,
        make_tx: MakeTx,
        *,
        steps: int,
        batch_size: int,
        eval_every: int,
        seeds: Sequence[int],
    ) -> None:
        self.task, self.make_tx, self.seeds = task, make_tx, list(seeds)
        self.batch_size = batch_size
        self.lengths = _chunk_lengths(steps, eval_every)
        self.program: _Program | None = None
        self.shared: bool | None = None  # None: not known until the first call

    def __call__(self, rate: float, progress: Progress | None = None) -> OptimizerRun:
        """Train at learning rate ``rate`` from each seed."""
        if self.shared is None:
            try:
                self.program = _program(
                    self.task,
                    self.make_tx,
                    jnp.float32(rate),
                    self.lengths,
                    self.batch_size,
                    self.seeds[0],
                )
                self.shared = True
                compile_seconds = self.program.compile_seconds
            except (jax.errors.JAXTypeError, TypeError, ValueError):
                self.shared = False  # the factory wants a concrete rate
        elif self.shared:
            compile_seconds = 0.0
        if self.shared:
            assert self.program is not None
            return _run(
                self.task,
                self.program,
                self.lengths,
                self.seeds,
                jnp.float32(rate),
                progress,
                compile_seconds,
            )
        return train(
            self.task,
            self.make_tx(rate),
            steps=sum(self.lengths),
            batch_size=self.batch_size,
            eval_every=self.lengths[0],
            seeds=self.seeds,
            progress=progress,
        )
