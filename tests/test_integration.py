"""Every ready varjax optimizer in the places users put it.

- ``flax.nnx.Optimizer`` and a Linen ``TrainState``: a few steps of a linear
  model give the parameters of a plain Optax loop on the same gradients.
- ``jax.sharding`` on 8 host devices (in a subprocess: the device count is fixed
  when JAX starts), one ready optimizer per kind of state: through jitted
  steps, parameters keep their sharding, every state leaf keeps its sharding
  from step to step, state leaves shaped like a parameter are sharded like it,
  and the results equal the single-device run (the check is
  ``sharding_check.py``, which also runs by hand on a machine's GPUs).

The ready optimizers are the battery's cases that are public varjax names, plus
its storm and igt cases (``scale_by_*`` building blocks and chains are covered
by the battery).
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from host_devices import run_on_host_devices
from test_battery import CASES

import varjax

# storm and igt are in the battery under the names of the forms it runs
READY = [
    case
    for case in CASES
    if (hasattr(varjax, case.name) and "scale_by" not in case.name)
    or case.name in ("storm_approx", "igt_heavy_ball")
]
STEPS = 3
# one ready optimizer per kind of state (the others share these layouts), marked
# ``sharded=True`` in its registry entry: sharding runs two compilations per optimizer,
# the slowest test of the suite
SHARDED = [case for case in READY if case.sharded]


def test_every_ready_optimizer_is_covered() -> None:
    names = {case.name for case in READY}
    assert {"radam", "mars_adamw", "ademamix", "adamw_8bit", "adamw_4bit", "qhm"} <= names
    # a case marked sharded in the registry that is not a ready optimizer would be skipped
    assert [case for case in CASES if case.sharded] == SHARDED


def data() -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), jnp.asarray(
        rng.normal(size=(6, 3)), jnp.float32
    )


def loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((x @ params["kernel"] + params["bias"] - y) ** 2)


def plain_optax(tx: optax.GradientTransformation, params: dict) -> dict:
    x, y = data()
    state = tx.init(params)
    for _ in range(STEPS):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def assert_trees_close(actual: dict, expected: dict) -> None:
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", READY, ids=[case.name for case in READY])
def test_nnx_optimizer_and_linen_train_state(case) -> None:
    x, y = data()
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    start = {"kernel": jnp.asarray(model.kernel[...]), "bias": jnp.asarray(model.bias[...])}
    expected = plain_optax(case.build(), start)
    assert not np.allclose(expected["kernel"], start["kernel"])  # the steps moved

    optimizer = nnx.Optimizer(model, case.build(), wrt=nnx.Param)
    for _ in range(STEPS):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
    assert_trees_close({"kernel": model.kernel[...], "bias": model.bias[...]}, expected)

    dense = nn.Dense(3)
    state = train_state.TrainState.create(
        apply_fn=dense.apply, params={"params": start}, tx=case.build()
    )

    def linen_loss(variables: dict) -> jax.Array:
        return jnp.mean((state.apply_fn(variables, x) - y) ** 2)

    for _ in range(STEPS):
        state = state.apply_gradients(grads=jax.grad(linen_loss)(state.params))
    assert_trees_close(state.params["params"], expected)


def test_sharded_step_keeps_shardings_and_equals_single_device(tmp_path) -> None:
    check = pathlib.Path(__file__).resolve().parent / "sharding_check.py"
    script = f"import runpy\nrunpy.run_path({str(check)!r}, run_name='__main__')\n"
    stdout = run_on_host_devices(script, tmp_path, args=["--mesh", "4x2"])
    assert stdout.count("sharded ok") == len(SHARDED), stdout
