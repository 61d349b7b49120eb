"""What XLA allocates for quantized optimizers on CPU: deterministic byte counts from
``compiled.memory_analysis()``, never timings.

- A jitted ``init`` keeps its temporaries under 5% of the parameter bytes (the
  issue's margin over parameters + gradients + state): the inner state's zeros are
  made inside the quantizing loop, never as float32 arrays. Measured: at most 0.03
  bytes per parameter (one leaf's absmax), 0 on the 138-leaf tree.
- A donated step (update + ``apply_updates`` in one jit) on CPU allocates at most
  one float32 buffer per quantized moment, for one large leaf and for the 138 leaves
  of ``benchmarks/step_time.py``'s transformer shapes: XLA:CPU fuses no reduction
  with what computes its operand, so each new moment is written once for its block
  absmax and read again by the encoding. This is a regression bound, not the
  issue's goal of 5% over params + grads + state: on CPU the step stays at
  about 4 bytes per parameter per moment (Lion: 8 for its one moment). Measured
  (temp bytes / parameter, one 4096x4096 leaf and 138 leaves at width 128): 8-bit
  AdamW 8.09 and 8.11, Lion 8.03 and 8.04, AdEMAMix 12.14 and 12.16, 4-bit AdamW
  8.19 and 8.15. Compiling a 138-leaf step takes a minute or two on a loaded 2-core
  machine, so that tree covers 8-bit AdamW; the large leaf covers all. Before
  the encoding took a separately computed absmax these were the same; the two-pass
  update that is meant to remove them (off the CPU) made them 24.0 here for 8-bit
  AdamW at 4096x4096.
- The two-pass update, forced on CPU, stores the same codes as the one-pass update,
  and absmax and parameters equal to a few float32 ulps (the two passes compute the
  moments in differently fused kernels).
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from memory import donated_step_temporary_bytes, donating_train_step

import varjax
from varjax.quantization import QuantizedArray, quantize_state, wrapper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from step_time import transformer_shapes

# (name, optimizer, float32 buffers of a leaf's size its CPU step allocates)
OPTIMIZERS = [
    ("adam_8bit", lambda: varjax.adam_8bit(1e-3), 2),
    ("adam_4bit", lambda: varjax.adam_4bit(1e-3), 2),
    ("adamw_8bit", lambda: varjax.adamw_8bit(1e-3), 2),
    ("adamw_4bit", lambda: varjax.adamw_4bit(1e-3), 2),
    ("lion_8bit", lambda: varjax.lion_8bit(1e-4), 2),  # one moment, two buffers (measured)
    ("lion_4bit", lambda: varjax.lion_4bit(1e-4), 2),
    ("ademamix_8bit", lambda: varjax.ademamix_8bit(1e-3), 3),
    ("ademamix_4bit", lambda: varjax.ademamix_4bit(1e-3), 3),
    (
        "quantize_state(scale_by_adam)",
        lambda: optax.chain(quantize_state(optax.scale_by_adam()), optax.scale(-1e-3)),
        2,
    ),
    # a factored second moment: its row and column factors are small; the one
    # float32 buffer is the new full-size update it keeps for clipping
    ("quantize_state(adafactor)", lambda: quantize_state(optax.adafactor(1e-3)), 1),
]
IDS = [name for name, _, _ in OPTIMIZERS]


def large_leaf() -> dict[str, jax.ShapeDtypeStruct]:
    return {
        "w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
        "b": jax.ShapeDtypeStruct((1024,), jnp.float32),
    }


def transformer_leaves() -> dict[str, jax.ShapeDtypeStruct]:
    """The 138 leaves of step_time.py's 18.5M tree (17 layers), at width 128 (3.6M
    parameters; only compiled, never run): every kernel and the embedding are quantized."""
    shapes = transformer_shapes(128, 17, vocab=2048)
    assert len(shapes) == 138
    return {name: jax.ShapeDtypeStruct(s, jnp.float32) for name, s in shapes.items()}


def param_bytes(params) -> int:
    return sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(params))


@pytest.mark.parametrize(("name", "make", "moments"), OPTIMIZERS, ids=IDS)
def test_jitted_init_makes_no_float32_state(name, make, moments) -> None:
    params = large_leaf()
    compiled = jax.jit(make().init).lower(params).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 0.05 * param_bytes(params)


@pytest.mark.parametrize(("name", "make", "moments"), OPTIMIZERS[2:4], ids=IDS[2:4])
def test_jitted_init_makes_no_float32_state_138_leaves(name, make, moments) -> None:
    params = transformer_leaves()
    compiled = jax.jit(make().init).lower(params).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 0.05 * param_bytes(params)


@pytest.mark.parametrize(("name", "make", "moments"), OPTIMIZERS, ids=IDS)
def test_step_temporaries_one_large_leaf(name, make, moments) -> None:
    """At most one float32 buffer per quantized moment (Lion: two), plus 10% of the
    parameter bytes for the per-block vectors and small leaves (measured: 2.3% for
    8-bit and 4.6% for 4-bit AdamW, 6.9% for 4-bit AdEMAMix)."""
    params = large_leaf()
    tx = make()
    lowered = donating_train_step(tx).lower(params, jax.eval_shape(tx.init, params), params)
    temporaries = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temporaries <= (moments + 0.1) * param_bytes(params)


# one optimizer: a 138-leaf step takes 15 s of CPU to compile (the large leaf covers all)
@pytest.mark.parametrize(("name", "make", "moments"), OPTIMIZERS[2:3], ids=IDS[2:3])
def test_step_temporaries_138_leaves(name, make, moments) -> None:
    """As above on 138 leaves: the bound is per moment over all the parameter bytes,
    so moments of different leaves may not all be live at once beyond one buffer each."""
    params = transformer_leaves()
    tx = make()
    lowered = donating_train_step(tx).lower(params, jax.eval_shape(tx.init, params), params)
    temporaries = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temporaries <= (moments + 0.1) * param_bytes(params)


def test_concrete_params_match_the_abstract_measure() -> None:
    """The helper of tests/memory.py, on concrete arrays, gives the same bytes."""
    params = {"w": jnp.ones((512, 1024)), "b": jnp.ones(1024)}
    tx = varjax.adamw_8bit(1e-3)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    lowered = donating_train_step(tx).lower(abstract, jax.eval_shape(tx.init, abstract), abstract)
    expected = lowered.compile().memory_analysis().temp_size_in_bytes
    assert donated_step_temporary_bytes(tx, params) == expected


@pytest.mark.parametrize(
    "make",
    [
        lambda: varjax.adamw_8bit(1e-2, weight_decay=0.1),
        lambda: varjax.adamw_4bit(1e-2, weight_decay=0.1),
        lambda: varjax.ademamix_8bit(1e-2),
        lambda: varjax.lion_8bit(1e-3, stochastic_rounding=True),
    ],
    ids=["adamw_8bit", "adamw_4bit", "ademamix_8bit", "lion_8bit_stochastic"],
)
def test_two_pass_update_stores_the_same_codes(make, monkeypatch) -> None:
    """One step from a trained state with the update of the GPU (two passes) and of
    the CPU (one pass): identical codes; absmax and new parameters within a few float32
    ulps of their magnitude, since the two compute the moments in different kernels
    (measured: 1 of 128 absmax and 0.2% of parameters differed, in the last bit)."""
    params = {
        "w": jax.random.normal(jax.random.key(0), (300, 700)),
        "e": jax.random.normal(jax.random.key(1), (64, 512)),
        "b": jnp.zeros(700),
    }
    tx = make()
    state = tx.init(params)
    full = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for i in range(5):
        key = jax.random.key(10 + i)
        grads = jax.tree.map(lambda x, key=key: jax.random.normal(key, x.shape), params)
        _, state = full(params, state, grads)
    grads = jax.tree.map(lambda x: 3.0 * jax.random.normal(jax.random.key(99), x.shape), params)
    results = []
    for two in (False, True):
        monkeypatch.setattr(wrapper, "_TWO_PASSES", two)
        update = jax.jit(lambda p, s, g: tx.update(g, s, p))  # a new trace per setting
        updates, new_state = update(params, state, grads)
        results.append((optax.apply_updates(params, updates), new_state))
    (params_a, state_a), (params_b, state_b) = results
    is_q = lambda x: isinstance(x, QuantizedArray)  # noqa: E731
    qa = [x for x in jax.tree.leaves(state_a, is_leaf=is_q) if is_q(x)]
    qb = [x for x in jax.tree.leaves(state_b, is_leaf=is_q) if is_q(x)]
    assert len(qa) == len(qb) > 0
    ulps = 4 * np.finfo(np.float32).eps
    for a, b in zip(qa, qb, strict=True):
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_allclose(a.absmax, b.absmax, rtol=ulps, atol=0)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        scale = float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(a, b, rtol=0, atol=ulps * scale)
    assert int(state_a.skipped) == int(state_b.skipped) == 0
