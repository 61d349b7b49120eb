"""Compiling for a GPU on a machine without one (XLA's deviceless compilation).

With the CUDA PJRT plugin of jax's version installed (``jax-cuda12-plugin`` and
``jax-cuda12-pjrt``, best into a directory of their own on ``PYTHONPATH``), a
step lowered on arrays placed on a compile-only device, described by a target
config (a text proto as ``benchmarks/h100_sxm.txtpb``), compiles as it would on
that GPU: the same kernels and temporaries. Nothing runs and nothing is timed.
"""

from __future__ import annotations

import pathlib

import jax


def gpu_sharding(target_config: pathlib.Path) -> jax.sharding.Sharding:
    """The sharding of one compile-only GPU described by ``target_config``.

    varjax picks its GPU code paths by ``jax.default_backend()``, so that is made
    to say "gpu" for the rest of this process."""
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        platform="cuda", topology="1x1x1", target_config=target_config.read_text()
    )
    jax.default_backend = lambda: "gpu"
    return jax.sharding.SingleDeviceSharding(topology.devices[0])


def placed(tree, sharding: jax.sharding.Sharding):
    """``tree``'s arrays (or shape structs) as shape structs placed by ``sharding``."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
