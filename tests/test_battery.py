"""The shared battery every public varjax optimizer and building block must pass.

The cases are the ``Battery`` settings of the entries in varjax/registry.py: a
name, the learning rate the minimisation checks use, default keyword
hyper-parameters, the adapter (``ADAPTERS`` below) that makes an optimizer of
the entry's factory, and the (argument, bad value) pairs that must raise
``ValueError`` naming the argument. A new optimizer joins by its entry.

Checked for each case: it minimises a convex quadratic and the Rosenbrock
function (with schedules as learning rates); jit and no-jit
agree; nested pytrees with a scalar, a size-1 leaf, an odd size, a bfloat16
leaf, and the empty tree work and keep each leaf's dtype; it works inside
``optax.inject_hyperparams``, ``optax.MultiSteps``, ``optax.masked`` and
``optax.apply_if_finite`` (a NaN step dropped, the run continuing exactly); its
state survives an Orbax save/restore with a bit-identical continuation; a
gradient tree that does not match the state raises ``ValueError``; bad
hyper-parameters raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from checkpoints import orbax_round_trip
from memory import donating_train_step

import varjax
from varjax import registry


def with_clusters(tx: optax.GradientTransformation, clusters: int) -> Any:
    """Feed ``tx`` the extra argument ``cluster`` cycling through 0..clusters-1."""

    def init_fn(params):
        return (jnp.zeros([], jnp.int32), tx.init(params))

    def update_fn(updates, state, params=None):
        count, inner = state
        updates, inner = tx.update(updates, inner, params, cluster=count % clusters)
        return updates, (count + 1, inner)

    return optax.GradientTransformation(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make: Callable[..., optax.GradientTransformation]
    learning_rate: float = 0.1
    bad: tuple[tuple[str, Any], ...] = ()
    entry: str = ""  # the registry entry the case belongs to
    sharded: bool = False  # also run on 8 host devices (tests/test_integration.py)
    float32_updates: bool = False  # float32 updates for bfloat16 leaves (varjax.precision)

    def build(self, learning_rate: Any = None, **kwargs: Any) -> optax.GradientTransformation:
        rate = self.learning_rate if learning_rate is None else learning_rate
        return self.make(learning_rate=rate, **kwargs)


def exact_form(tx: optax.GradientTransformationExtraArgs) -> Any:
    """Supply ``previous_grads`` to an exact-form transform as ``0.9 * grads``.

    The battery's problems hand over one gradient per step; a fixed multiple
    exercises the exact code path (structure, dtypes, state) without a second
    gradient evaluation.
    """

    def update_fn(updates, state, params=None):
        previous = jax.tree.map(lambda g: 0.9 * g, updates)
        return tx.update(updates, state, params, previous_grads=previous)

    return optax.GradientTransformation(tx.init, update_fn)


def with_samples(tx: optax.GradientTransformationExtraArgs) -> Any:
    """Supply ``microbatch_grads``, two samples ``g * (1 +- d)`` with ``d`` varying
    across elements (their mean is the gradient, their GSNR varies), and
    ``small_batch_grads``, the first of them."""

    def samples(g: jax.Array) -> jax.Array:
        d = 0.5 * jnp.cos(jnp.arange(g.size, dtype=jnp.float32)).reshape(g.shape)
        return jnp.stack([g * (1 + d), g * (1 - d)]).astype(g.dtype)

    def update_fn(updates, state, params=None):
        stacked = jax.tree.map(samples, updates)
        small = jax.tree.map(lambda s: s[0], stacked)
        return tx.update(updates, state, params, microbatch_grads=stacked, small_batch_grads=small)

    return optax.GradientTransformation(tx.init, update_fn)


def two_groups(params: Any) -> Any:
    """Labels: ``"first"`` for the first leaf, ``"rest"`` for the others."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten((["first"] + ["rest"] * len(leaves))[: len(leaves)])


def _rate(learning_rate: Any) -> optax.GradientTransformation:
    return optax.scale_by_learning_rate(learning_rate)


# How a registry entry's ``Battery.adapt`` makes an optimizer of its factory ``f``:
# ``(f, learning_rate, **kwargs) -> transform``.
ADAPTERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "optimizer": lambda f, lr, **kw: f(learning_rate=lr, **kw),
    "exact_form": lambda f, lr, **kw: exact_form(f(learning_rate=lr, **kw)),
    "rate": lambda f, lr, **kw: optax.chain(f(**kw), _rate(lr)),
    "rate_as_k": lambda f, lr, **kw: f(**{"k": lr, **kw}),  # storm: k is its step size
    "then_adam": lambda f, lr, **kw: optax.chain(f(**kw), optax.adam(lr)),
    "then_lion": lambda f, lr, **kw: optax.chain(f(**kw), optax.lion(lr)),
    "then_ademamix": lambda f, lr, **kw: optax.chain(
        optax.chain(f(**kw), varjax.scale_by_ademamix(b3=0.999)), _rate(lr)
    ),
    "after_adamw": lambda f, lr, **kw: optax.chain(optax.adamw(lr), f(**kw)),
    "samples_then_adam": lambda f, lr, **kw: with_samples(optax.chain(f(**kw), optax.adam(lr))),
    "samples_around_adam_two_groups": lambda f, lr, **kw: with_samples(
        f(optax.adam(lr), two_groups, **kw)
    ),
    "monitors_then_adam": lambda f, lr, **kw: with_samples(
        optax.chain(f(**kw), varjax.gradient_snr_monitor(), optax.adam(lr))
    ),
    "clusters": lambda f, lr, **kw: with_clusters(
        optax.chain(f(**kw), _rate(lr)), kw["num_clusters"]
    ),
}

# The transforms that a wrapper's ``Battery.inner`` names.
INNER: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": optax.scale_by_adam,
    "lion": optax.scale_by_lion,
    "diffgrad": lambda **kw: varjax.scale_by_diffgrad(**kw),
    "mars": lambda **kw: varjax.scale_by_mars(**kw),
    # b3 = 0.999: the paper's 0.9999 has a half-life longer than the battery's problems
    "slow_ademamix": lambda **kw: varjax.scale_by_ademamix(**{"b3": 0.999, **kw}),
    "two_emas": lambda **kw: varjax.multi_ema((0.9, 0.99), (1.0, 0.5), (True, False), **kw),
}


def _maker(entry: registry.Entry, battery: registry.Battery) -> Callable[..., Any]:
    """The case's factory of ``learning_rate`` and keyword hyper-parameters."""
    adapt, factory = ADAPTERS[battery.adapt], entry.factory
    if battery.inner is not None:
        inner, wrapper = INNER[battery.inner], factory
        if battery.to_inner:  # the test's arguments are the inner transform's

            def factory(**kw):
                return wrapper(inner(**kw), **battery.kwargs)

            return lambda learning_rate, **kw: adapt(factory, learning_rate, **kw)

        def factory(**kw):
            return wrapper(inner(), **kw)

    return lambda learning_rate, **kw: adapt(factory, learning_rate, **{**battery.kwargs, **kw})


# One case per ``Battery`` of each registry entry (varjax/registry.py).
CASES = [
    Case(
        battery.name,
        _maker(entry, battery),
        battery.learning_rate,
        battery.bad,
        entry=entry.name,
        sharded=battery.sharded,
        float32_updates=battery.float32_updates,
    )
    for entry in registry.REGISTRY
    for battery in entry.battery
]

# The tests of one case share a worker (``--dist loadgroup`` in pyproject.toml), so
# the trajectory and the compiled step below are built once per case.
CASE_PARAMS = [
    pytest.param(case, id=case.name, marks=pytest.mark.xdist_group(case.name)) for case in CASES
]
BAD_ARGS = [
    pytest.param(case, arg, value, id=f"{case.name}-{arg}")
    for case in CASES
    for arg, value in case.bad
]


def schedule(case: Case, steps: int) -> optax.Schedule:
    """Linear warm-up over 100 steps, then cosine decay.

    The warm-up matters for RAdam, whose first steps are un-adapted momentum:
    at a learning rate sized for adaptive steps they diverge on Rosenbrock's
    steep walls.
    """
    return optax.warmup_cosine_decay_schedule(0.0, case.learning_rate, 100, steps)


def run(tx: optax.GradientTransformation, grad_fn, params, steps: int, jit: bool = True):
    """Apply ``steps`` updates of ``tx`` with gradients from ``grad_fn(params, step)``."""

    def step(carry, i):
        params, state = carry
        updates, state = tx.update(grad_fn(params, i), state, params)
        return (optax.apply_updates(params, updates), state), None

    carry = (params, tx.init(params))
    if jit:
        carry, _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))(carry)
    else:
        for i in range(steps):
            carry, _ = step(carry, jnp.asarray(i))
    return carry


def hashed_uniform(shape: tuple, seed: jax.Array) -> jax.Array:
    """Uniform values in [0, 1) from an integer hash of the element index and ``seed``.

    Exact integer arithmetic, so jitted and eager runs agree bit for bit, and
    cheap to compile (``jax.random``'s threefry took most of the battery's
    compile time).
    """
    index = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)
    h = index * jnp.uint32(0x9E3779B1) + seed.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, 1)):
        h = (h ^ (h >> shift)) * jnp.uint32(multiplier)
    return (h >> 8).astype(jnp.float32) / 2.0**24


@jax.jit
def _hashed_grads(params: Any, step: jax.Array, seed: jax.Array) -> Any:
    leaves, treedef = jax.tree.flatten(params)
    noise = []
    for k, p in enumerate(leaves):
        stream = (jnp.asarray(step) * 131 + seed * 7919 + k * 104729).astype(jnp.uint32)
        u = hashed_uniform(jnp.shape(p), stream)
        noise.append(((u - 0.5) * 2 * math.sqrt(3.0) + 0.1 * p).astype(jnp.result_type(p)))
    return jax.tree.unflatten(treedef, noise)


def random_grads(seed: int = 0) -> Callable[[Any, jax.Array], Any]:
    """Deterministic pseudo-random gradients shaped and typed like the params: unit
    variance noise (uniform on [-sqrt 3, sqrt 3]) plus ``0.1 * params``. One jitted
    function for every test, so outside ``jit`` it costs one compiled call per
    step (op by op it took most of the battery's eager time)."""
    return lambda params, step: _hashed_grads(params, step, jnp.asarray(seed))


def nested_params() -> dict:
    # strongly typed leaves: a weakly typed one (``jnp.full(shape, 0.3)``) comes back
    # from the first step strongly typed, so every jitted step compiled twice
    return {
        "dense": {"kernel": jnp.full((7, 5), 0.3, jnp.float32)},
        "scalar": jnp.asarray(1.5, jnp.float32),
        "size_one": jnp.ones((1,)),
        "odd": jnp.linspace(-1.0, 1.0, 1001),
        "half": jnp.ones((4, 3), jnp.bfloat16),
        "layers": [(jnp.arange(6.0).reshape(2, 3),)],
    }


STEPS = 3  # steps of the shared trajectory: the state is carried over twice


@functools.cache
def trajectory(case: Case) -> tuple[Any, Any]:
    """Params and state after ``STEPS`` jitted steps of ``case`` on :func:`nested_params`
    with :func:`random_grads`, computed once per case. Never donate these arrays."""
    return run(case.build(), random_grads(), nested_params(), STEPS)


@functools.cache
def donating_step(case: Case) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """A jitted train step of ``case`` that donates params and state, compiled once."""
    return donating_train_step(case.build())


def assert_trees_close(a, b, rtol: float = 1e-5) -> None:
    """Leaf-wise closeness; bfloat16 leaves may differ by a couple of their ulps."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        tol = 2e-2 if x.dtype == jnp.bfloat16 else rtol
        np.testing.assert_allclose(np.float64(x), np.float64(y), rtol=tol, atol=tol)


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


# --------------------------------------------------------------------------
# Minimisation
# --------------------------------------------------------------------------


def _quadratic():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a = jnp.asarray(q @ np.diag(np.linspace(1.0, 10.0, 8)) @ q.T, jnp.float32)
    b = jnp.asarray(rng.normal(size=8), jnp.float32)
    x_star = jnp.linalg.solve(a, b)

    def loss(p):
        x = p["x"]
        return 0.5 * x @ a @ x - b @ x

    return loss, {"x": jnp.zeros(8)}, loss({"x": x_star})


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_minimizes_convex_quadratic(case: Case) -> None:
    loss, params, optimum = _quadratic()
    steps = 1500
    tx = case.build(schedule(case, steps))
    params, _ = run(tx, lambda p, _: jax.grad(loss)(p), params, steps)
    gap0, gap = loss({"x": jnp.zeros(8)}) - optimum, loss(params) - optimum
    assert gap < 1e-3 * gap0, (float(gap), float(gap0))


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_minimizes_rosenbrock(case: Case) -> None:
    def loss(p):
        return (1.0 - p["x"]) ** 2 + 100.0 * (p["y"] - p["x"] ** 2) ** 2

    steps = 10_000
    start = {"x": -1.0, "y": 1.5}  # loss 29.0
    params, _ = run(case.build(schedule(case, steps)), lambda p, _: jax.grad(loss)(p), start, steps)
    assert loss(params) < 1e-2, params


# --------------------------------------------------------------------------
# Trees, dtypes, jit
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_jit_matches_no_jit(case: Case) -> None:
    with_jit, _ = trajectory(case)
    without, _ = run(case.build(), random_grads(), nested_params(), STEPS, jit=False)
    assert_trees_close(with_jit, without)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_nested_tree_keeps_dtypes(case: Case) -> None:
    tx = case.build()
    params = nested_params()
    state = tx.init(params)
    grads = random_grads()(params, 0)
    updates, _ = jax.eval_shape(tx.update, grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        low = p.dtype in (jnp.bfloat16, jnp.float16)
        assert u.dtype == (jnp.float32 if case.float32_updates and low else p.dtype)
        assert u.shape == p.shape
    new_params, new_state = trajectory(case)
    for leaf in jax.tree.leaves((new_params, new_state)):
        assert jnp.all(jnp.isfinite(leaf))
    # the state keeps its dtypes from step to step (no silent promotion)
    assert jax.tree.map(jnp.result_type, new_state) == jax.tree.map(
        jnp.result_type, tx.init(params)
    )


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_empty_tree(case: Case) -> None:
    tx = case.build()
    state = tx.init({})
    updates, _ = tx.update({}, state, {})
    assert updates == {}


# --------------------------------------------------------------------------
# Optax wrappers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_inject_hyperparams(case: Case) -> None:
    injected = optax.inject_hyperparams(lambda learning_rate: case.build(learning_rate))(
        learning_rate=case.learning_rate
    )
    a, _ = trajectory(case)
    b, state = run(injected, random_grads(), nested_params(), STEPS)
    assert_trees_close(a, b)
    assert np.isclose(state.hyperparams["learning_rate"], case.learning_rate)


# Injected, b1 and b2 become float32 arrays: 0.999 in float32 moves 1 - b2 by up to
# eps32 * b2 / (1 - b2), about 6e-5 relative, and the updates with it.
INJECTED_RTOL = 4 * float(np.finfo(np.float32).eps) / (1 - 0.999)


@pytest.mark.parametrize("name", varjax.alias.__all__)
def test_inject_hyperparams_the_natural_way(name: str) -> None:
    """``optax.inject_hyperparams(varjax.X)(learning_rate=...)``, with no lambda and no
    ``static_args``, works for every ready optimizer and equals ``varjax.X``."""
    make = getattr(varjax, name)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    injected, plain = optax.inject_hyperparams(make)(learning_rate=0.01), make(0.01)
    state, plain_state = injected.init(params), plain.init(params)
    for step in range(3):
        grads = random_grads(step)(params, step)
        updates, state = jax.jit(injected.update)(grads, state, params)
        expected, plain_state = jax.jit(plain.update)(grads, plain_state, params)
        for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
            assert float(jnp.linalg.norm(got - want)) <= INJECTED_RTOL * float(
                jnp.linalg.norm(want)
            )


def test_inject_hyperparams_names_static_args_for_quantization_sizes() -> None:
    params = {"w": jnp.ones((4, 8))}
    with pytest.raises(ValueError, match=r"static_args=\('min_size',\)"):
        tx = optax.inject_hyperparams(varjax.adamw_8bit)(learning_rate=0.01, min_size=0)
        jax.jit(tx.update)(params, tx.init(params), params)
    tx = optax.inject_hyperparams(varjax.adamw_8bit, static_args=("min_size",))(
        learning_rate=0.01, min_size=0
    )
    state = tx.init(params)
    assert isinstance(state.inner_state.inner_state[0].mu["w"], varjax.quantization.QuantizedArray)
    jax.jit(tx.update)(params, state, params)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_multi_steps_equals_mean_gradient(case: Case) -> None:
    params = {"w": jnp.linspace(-1.0, 1.0, 6), "m": jnp.full((3, 2), 0.5)}
    grads = [random_grads(seed)(params, 0) for seed in range(4)]
    multi = optax.MultiSteps(case.build(), every_k_schedule=2)
    plain = case.build()
    multi_state, plain_state = multi.init(params), plain.init(params)
    # jitted: op by op, MultiSteps' branches are traced and compiled at every call
    multi_update, plain_update = jax.jit(multi.update), jax.jit(plain.update)
    for k in range(2):
        first, second = grads[2 * k], grads[2 * k + 1]
        skipped, multi_state = multi_update(first, multi_state, params)
        assert all(jnp.all(leaf == 0) for leaf in jax.tree.leaves(skipped))
        applied, multi_state = multi_update(second, multi_state, params)
        mean = jax.tree.map(lambda a, b: (a + b) / 2, first, second)
        expected, plain_state = plain_update(mean, plain_state, params)
        for x, y in zip(jax.tree.leaves(applied), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_masked(case: Case) -> None:
    params = {"trained": jnp.linspace(-1.0, 1.0, 6), "frozen": jnp.ones((2, 3))}
    masked = optax.masked(case.build(), {"trained": True, "frozen": False})
    alone = case.build()
    grads = random_grads()(params, 0)
    updates, _ = masked.update(grads, masked.init(params), params)
    expected, _ = alone.update(
        {"trained": grads["trained"]},
        alone.init({"trained": params["trained"]}),
        {"trained": params["trained"]},
    )
    np.testing.assert_array_equal(updates["frozen"], grads["frozen"])
    np.testing.assert_allclose(updates["trained"], expected["trained"], rtol=1e-6)


# --------------------------------------------------------------------------
# Checkpoints and errors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_orbax_restore_continues_bit_identically(case: Case, tmp_path) -> None:
    grad_fn = random_grads()
    params, state = trajectory(case)
    restored = orbax_round_trip(tmp_path / "state", {"params": params, "opt_state": state})
    assert_trees_equal(restored["opt_state"], state)

    step = donating_step(case)

    def continue_from(params, state):
        params, state = jax.tree.map(jnp.copy, (params, state))  # the step donates them
        for i in range(STEPS, 2 * STEPS):
            params, state = step(params, state, grad_fn(params, i))
        return params, state

    assert_trees_equal(
        continue_from(params, state), continue_from(restored["params"], restored["opt_state"])
    )


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_apply_if_finite_drops_a_non_finite_step(case: Case) -> None:
    """The documented behaviour for a NaN or Inf gradient: like Optax's, varjax's
    transforms pass it on (quantized state excepted: it skips the step itself), and
    ``optax.apply_if_finite`` drops the step, so that the run continues exactly as if
    it never came."""
    if case.float32_updates:  # its cond would join float32 and bfloat16 zero updates
        pytest.skip(
            "apply_if_finite goes around the update rule inside (tests/test_precision.py::"
            "test_multi_steps_inject_hyperparams_and_apply_if_finite)"
        )
    tx = optax.apply_if_finite(case.build(), max_consecutive_errors=3)
    grads = random_grads()
    step = donating_train_step(tx)  # each step's inputs are fresh or not used again

    def run_steps(indices):
        params = nested_params()
        state = tx.init(params)
        for i in indices:
            g = grads(params, jnp.asarray(abs(i)))
            if i < 0:
                g["dense"]["kernel"] = g["dense"]["kernel"].at[2, 3].set(jnp.nan)
                g["odd"] = g["odd"].at[500].set(jnp.inf)
            params, state = step(params, state, g)
        return params, state

    clean, _ = run_steps([0, 1, 2])
    params, state = run_steps([0, -7, 1, 2])
    assert int(state.total_notfinite) == 1
    assert_trees_equal(params, clean)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_mismatched_tree_raises(case: Case) -> None:
    tx = case.build()
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    state = tx.init(params)
    wrong_keys = {"a": jnp.ones(3), "c": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"(?i)structure|mismatch|key"):
        tx.update(wrong_keys, state, wrong_keys)
    wrong_shape = {"a": jnp.ones(4), "b": jnp.ones((2, 2))}
    with pytest.raises((ValueError, TypeError), match=r"(?i)shape"):
        tx.update(wrong_shape, state, params)


@pytest.mark.parametrize(("case", "arg", "value"), BAD_ARGS)
def test_bad_hyperparameter_raises(case: Case, arg: str, value: Any) -> None:
    kwargs = {} if arg == "learning_rate" else {arg: value}
    rate = value if arg == "learning_rate" else case.learning_rate
    with pytest.raises(ValueError, match=arg):
        case.make(learning_rate=rate, **kwargs)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_donating_params_and_state(case: Case) -> None:
    """A train step may donate params and optimizer state together (no shared buffers)."""
    step = donating_step(case)
    params = nested_params()
    state = case.build().init(params)
    for i in range(2):
        params, state = step(params, state, random_grads()(params, i))
    for leaf in jax.tree.leaves(params):
        assert jnp.all(jnp.isfinite(leaf))
