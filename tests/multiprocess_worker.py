"""One JAX process of ``test_multiprocess``: a sharded model trained a few steps with
quantized optimizer state, the whole trajectory written to a file.

Run by the test, with ``JAX_PLATFORMS=cpu`` and a host device count in ``XLA_FLAGS``::

    python tests/multiprocess_worker.py OUT_DIR --processes 2 --process-id I --port PORT

With ``--processes 2`` each process joins ``jax.distributed`` on 127.0.0.1 and
holds half of the mesh's devices; with ``--processes 1`` (no port) one process
holds them all. The code that follows is the same in both cases: a 2 x 2 mesh
``("data", "model")`` over ``jax.devices()``, laid out so that the ``model``
axis is the one that crosses processes (``w1``'s columns 0-255 and the state
of them on process 0, 256-511 on process 1), the same parameters and batches,
and the same jitted steps. Two steps get a corrupted gradient, on one element
that lies on the last process only: a NaN (caught by the gradient check) and
a finite ``1e20``, which only overflows the new second moment (caught by the
absmax check of the quantized state, where a quantized leaf holds the overflow:
Adam's ``nu`` of ``w1`` does). Every process gathers the parameters
and the raw quantized state (codes, absmax, other leaves) after every step
and writes them to ``OUT_DIR/<optimizer>.process<I>.npz``.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import varjax
from varjax.quantization import QuantizedArray, QuantizedState, quantize_state

SHAPES = {"w1": (16, 512), "b1": (512,), "w2": (512, 8), "b2": (8,)}
SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
BATCH = 32
# step -> (value, index into w1) added to the gradient of w1 at that step; the index
# is in w1's last model shard, which lies on the last process
CORRUPTED = {2: (np.nan, (3, 400)), 4: (1e20, (5, 300))}
STEPS = 6
OPTIMIZERS = {
    # w1 (8192 elements) and w2 (4096) reach the default min_size=4096; b1, b2 do not
    "adamw_8bit": lambda: varjax.adamw_8bit(1e-2, weight_decay=0.1),
    # min_dim_size_to_factor=16 factors w1 (v_row 16, v_col 512); w2 (512 x 8) and the
    # biases keep a full second moment; min_size=256 takes the leaves of 256 or more
    "adafactor": lambda: quantize_state(
        optax.adafactor(1e-2, min_dim_size_to_factor=16, momentum=0.9), min_size=256
    ),
}


def loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """``host`` (the same in every process) as a global array; each process fills its shards."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def local_part(x: jax.Array) -> float:
    """The fraction of ``x``'s elements that lie on this process's devices."""
    here = np.zeros(x.shape, bool)
    for shard in x.addressable_shards:
        here[shard.index] = True
    return here.mean()


def flat(tree) -> dict[str, np.ndarray]:
    """Every leaf of ``tree``, gathered to every process, by its key path."""
    gathered = multihost_utils.process_allgather(tree, tiled=True)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(gathered)}


def train(name: str, mesh: Mesh) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sharding = {k: NamedSharding(mesh, spec) for k, spec in SPECS.items()}
    batch_sharding = NamedSharding(mesh, P("data", None))
    host = {k: (rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32) for k, s in SHAPES.items()}
    params = {k: global_array(v, sharding[k]) for k, v in host.items()}
    tx = OPTIMIZERS[name]()

    @jax.jit
    def step(params, state, x, y, corruption):
        grads = jax.grad(loss)(params, x, y)
        grads = jax.tree.map(jnp.add, grads, corruption)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, finite

    # not jax.jit(tx.init): the state does not depend on the parameters' values, jit
    # prunes them and puts the state on one device; eager, it is sharded like them,
    # but a step count is on one device: put on the mesh, as the steps return it, so
    # that the step compiles once
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        tx.init(params),
    )
    quantized = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QuantizedArray))
        if isinstance(x, QuantizedArray)
    ]
    # what the test checks: some state is quantized, and (over two processes) some of it
    # is spread over both, so no process can tell alone whether a step overflowed it
    record = {
        "quantized_leaves": np.asarray(len(quantized)),
        "spread_leaves": np.asarray(sum(local_part(x.codes) < 1 for x in quantized)),
        "skipped": np.zeros(STEPS, np.int32),
        "finite_gradient": np.zeros(STEPS, bool),
    }
    for i in range(STEPS):
        x = rng.normal(size=(BATCH, SHAPES["w1"][0])).astype(np.float32)
        y = rng.normal(size=(BATCH, SHAPES["w2"][1])).astype(np.float32)
        corruption = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
        if i in CORRUPTED:
            value, index = CORRUPTED[i]
            corruption["w1"][index] = value
        corruption = {k: global_array(v, sharding[k]) for k, v in corruption.items()}
        x, y = global_array(x, batch_sharding), global_array(y, batch_sharding)
        params, state, finite = step(params, state, x, y, corruption)
        for k, leaf in params.items():
            assert leaf.sharding.is_equivalent_to(sharding[k], leaf.ndim), (name, k, leaf.sharding)
        record |= {f"step{i}/params{k}": v for k, v in flat(params).items()}
        record |= {f"step{i}/state{k}": v for k, v in flat(state).items()}
        (skipped,) = [
            x.skipped
            for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QuantizedState))
            if isinstance(x, QuantizedState)
        ]
        record["skipped"][i] = int(skipped)
        record["finite_gradient"][i] = bool(finite)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.processes > 1:
        address = f"127.0.0.1:{args.port}"
        jax.distributed.initialize(
            coordinator_address=address,
            coordinator_bind_address=address,  # loopback only, not every interface
            num_processes=args.processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    devices = np.asarray(jax.devices())
    assert devices.size == 4 and jax.process_count() == args.processes, jax.devices()
    # devices are ordered by process: rows of devices.reshape(2, 2) are processes, so
    # its transpose puts the model axis across them (and data within each)
    mesh = Mesh(devices.reshape(2, 2).T, ("data", "model"))
    for name in OPTIMIZERS:
        record = train(name, mesh)
        np.savez(args.out / f"{name}.process{args.process_id}.npz", **record)
    if args.processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
