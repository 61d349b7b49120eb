"""Quantization maps and block-wise quantization against bitsandbytes (CPU) and NumPy.

- ``dynamic_map`` / ``linear_map`` equal bitsandbytes' ``create_dynamic_map`` /
  ``create_linear_map`` value for value (signed and unsigned).
- ``quantize_blockwise`` picks the nearest map entry (ties to the lower one) of
  ``clip(x / absmax, -1, 1)``: checked against a float64 NumPy search.
- Against bitsandbytes' CPU ``quantize_blockwise``: the absmax values are
  identical. The codes are identical except where bitsandbytes' C kernel picks a
  farther entry. Its table-driven binary search can return the index below the
  right one, and it then compares only that index and the next. We measured
  0.1% of entries for signed maps, and about 3.5% for unsigned maps, where tiny
  values can land up to 7 entries too high. The test
  asserts that varjax's entry is never farther than bitsandbytes' and bounds how
  often they differ.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import varjax
from varjax.quantization import (
    SignedQuantized,
    UnsignedQuantized,
    dequantize_blockwise,
    dynamic_map,
    linear_map,
    quantize_blockwise,
    quantize_state,
    state_bytes,
)


@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_bitsandbytes(signed: bool) -> None:
    np.testing.assert_array_equal(dynamic_map(signed), bnbf.create_dynamic_map(signed).numpy())
    np.testing.assert_array_equal(linear_map(signed), bnbf.create_linear_map(signed).numpy())


def test_maps_are_sorted_and_bounded() -> None:
    for m in (dynamic_map(True), dynamic_map(False), linear_map(True), linear_map(False, 4)):
        assert np.all(np.diff(m) >= 0) and m.max() == 1.0 and m.min() >= -1.0
    assert dynamic_map(False).min() == 0.0 and linear_map(False, 4).size == 16


def nearest_reference(x: np.ndarray, code: np.ndarray, block_size: int):
    """Float64 nearest-entry search over blocks of the last axis (ties to the lower entry)."""
    n = x.shape[-1]
    codes = np.empty(x.shape, np.uint8)
    absmax = []
    for start in range(0, n, block_size):
        block = x[..., start : start + block_size].astype(np.float64)
        amax = np.max(np.abs(block), axis=-1, keepdims=True)
        scaled = np.clip(block / np.maximum(amax, 1e-38), -1, 1)
        distance = np.abs(scaled[..., None] - code.astype(np.float64))
        codes[..., start : start + block_size] = np.argmin(distance, axis=-1)
        absmax.append(amax[..., 0])
    return codes, np.stack(absmax, axis=-1)


def random_input(rng, shape, signed):
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(rng.uniform(1e-3, 10))
    return x if signed else x * x


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("shape", "block_size"), [((4096,), 256), ((3, 1000), 256), ((777,), 64)])
def test_quantize_is_nearest_entry(signed, shape, block_size) -> None:
    rng = np.random.default_rng(0)
    code = dynamic_map(signed)
    x = random_input(rng, shape, signed)
    codes, absmax = quantize_blockwise(jnp.asarray(x), code, block_size)
    expected_codes, expected_absmax = nearest_reference(x, code, block_size)
    np.testing.assert_array_equal(np.asarray(absmax), expected_absmax.astype(np.float32))
    # x * (1 / absmax) in float32 may sit on the other side of a midpoint than float64 x / absmax
    assert np.mean(np.asarray(codes) == expected_codes) > 0.9999
    restored = dequantize_blockwise(codes, absmax, code, block_size)
    assert restored.shape == x.shape
    step = np.max(np.diff(code))  # no value is further than half the widest gap from its entry
    bound = (step / 2 + 1e-6) * np.repeat(np.asarray(absmax), block_size, axis=-1)[..., : shape[-1]]
    assert np.all(np.abs(np.asarray(restored) - x) <= bound)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("n", "block_size"), [(65536, 256), (10000, 2048), (777, 4096)])
def test_matches_bitsandbytes_cpu(signed, n, block_size) -> None:
    rng = np.random.default_rng(1)
    code = dynamic_map(signed)
    x = random_input(rng, (n,), signed)
    theirs, state = bnbf.quantize_blockwise(
        torch.from_numpy(x), code=torch.from_numpy(code.copy()), blocksize=block_size
    )
    ours, absmax = quantize_blockwise(jnp.asarray(x), code, block_size)
    np.testing.assert_array_equal(np.asarray(absmax), state.absmax.numpy())
    ours, theirs = np.asarray(ours).astype(int), theirs.numpy().astype(int)
    scaled = x / np.repeat(state.absmax.numpy(), block_size)[:n]
    differ = ours != theirs
    assert np.mean(differ) < (0.005 if signed else 0.06)
    # where they differ, varjax's entry is at least as close as bitsandbytes'
    ours_error = np.abs(scaled[differ] - code[ours[differ]])
    theirs_error = np.abs(scaled[differ] - code[theirs[differ]])
    assert np.all(ours_error <= theirs_error + 1e-7)
    if signed:  # signed: neighbouring entries; unsigned: bnb sends tiny values up to 7 entries up
        assert np.all(np.abs(ours[differ] - theirs[differ]) == 1)


def test_zero_block_and_bad_block_size() -> None:
    codes, absmax = quantize_blockwise(jnp.zeros(10), dynamic_map(), 4)
    assert np.all(np.asarray(absmax) == 0)
    np.testing.assert_array_equal(
        dequantize_blockwise(codes, absmax, dynamic_map(), 4), np.zeros(10)
    )
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(jnp.ones(4), dynamic_map(), 0)


# --------------------------------------------------------------------------
# quantize_state
# --------------------------------------------------------------------------


def adam_run(tx, steps=100, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32), "b": jnp.zeros(8)}
    state, update = tx.init(params), jax.jit(tx.update)
    start = params
    for _ in range(steps):
        grads = {
            "w": jnp.asarray(rng.standard_normal((64, 128)) * 0.1, jnp.float32)
            + 0.05 * params["w"],
            "b": jnp.asarray(rng.standard_normal(8), jnp.float32),
        }
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return start, params, state


def test_state_layout_and_bytes() -> None:
    _, _, state = adam_run(varjax.adam_8bit(1e-3), steps=1)
    adam = state[0].inner_state
    assert isinstance(adam.mu["w"], SignedQuantized) and isinstance(adam.nu["w"], UnsignedQuantized)
    assert adam.mu["w"].codes.dtype == jnp.uint8 and adam.mu["w"].codes.shape == (64, 128)
    assert adam.mu["w"].absmax.shape == (64, 1)  # one block of 256 per row of 128
    assert adam.mu["b"].dtype == jnp.float32  # under min_size: kept in float32
    assert adam.count.dtype == jnp.int32
    shapes = {"embed": (1024, 512), "kernel": (512, 2048), "bias": (2048,)}
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert state_bytes(varjax.adam_8bit(1e-3).init(params)) / n < 2.05
    assert state_bytes(optax.adam(1e-3).init(params)) / n > 7.99


def test_parameter_named_v_keeps_the_signed_map() -> None:
    tx = quantize_state(optax.scale_by_adam(), min_size=0)
    state = tx.init({"v": jnp.zeros((4, 4)), "nu": jnp.zeros((4, 4))})
    assert isinstance(state.inner_state.mu["v"], SignedQuantized)
    assert isinstance(state.inner_state.mu["nu"], SignedQuantized)
    assert isinstance(state.inner_state.nu["v"], UnsignedQuantized)


def test_close_to_float32_adam() -> None:
    start, quantized, _ = adam_run(varjax.adam_8bit(1e-2))
    _, exact, _ = adam_run(optax.adam(1e-2))
    moved = np.abs(np.asarray(exact["w"] - start["w"]))
    error = np.abs(np.asarray(quantized["w"] - exact["w"]))
    # a regression bound from this run (measured ~1%), not a derived one: see the drift test to come
    assert error.mean() < 0.03 * moved.mean()
    np.testing.assert_allclose(quantized["b"], exact["b"], rtol=1e-6)  # the small leaf is exact


def test_non_finite_gradient_skips_the_step() -> None:
    tx = varjax.adam_8bit(1e-2, min_size=0)
    params = {"w": jnp.ones((4, 8))}
    state = tx.init(params)
    grads = {"w": jnp.full((4, 8), 0.5)}
    _, state = tx.update(grads, state, params)
    bad = {"w": grads["w"].at[1, 2].set(jnp.nan)}
    updates, new_state = jax.jit(tx.update)(bad, state, params)
    np.testing.assert_array_equal(updates["w"], np.zeros((4, 8)))
    assert int(new_state[0].skipped) == 1
    before, after = state[0].inner_state, new_state[0].inner_state
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    updates, later = tx.update(grads, new_state, params)
    assert np.all(np.isfinite(updates["w"])) and int(later[0].skipped) == 1


def test_wraps_three_moment_and_extra_args_transforms() -> None:
    params = {"w": jnp.ones((16, 16))}
    grads = {"w": jnp.full((16, 16), 0.1)}
    tx = quantize_state(varjax.scale_by_ademamix(), min_size=0)
    state = tx.init(params)
    moments = state.inner_state
    assert isinstance(moments.nu["w"], UnsignedQuantized)
    assert all(isinstance(m["w"], SignedQuantized) for m in moments.numerator_state.emas)
    tx.update(grads, state, params)
    exact = quantize_state(varjax.scale_by_mars(exact=True), min_size=0)
    out, _ = exact.update(grads, exact.init(params), params, previous_grads=grads)
    assert out["w"].shape == (16, 16)
