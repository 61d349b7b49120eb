"""Noise-aware clipping against float64 references written from the papers.

- ``autoclip``: against ``references.AutoClip`` (the paper's code: the norm is
  recorded first, then clipped to ``np.percentile`` of the history), with a
  window longer than the run (the paper's unbounded history) and shorter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import references as ref
from test_rectification import assert_sequences_close, gradient_sequence, initial_params, run_block

import varjax
from varjax.noise import percentile_of_history


@pytest.mark.parametrize("percentile", [10.0, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("window", [1000, 7, 1])
def test_autoclip_matches_reference(percentile, window) -> None:
    grads, params = gradient_sequence(), initial_params()
    ours = run_block(varjax.autoclip(percentile, window), grads, params)
    reference = ref.AutoClip(percentile, None if window >= len(grads) else window)
    expected = [reference.step(g) for g in grads]
    assert_sequences_close(ours, expected, rtol=2e-6, atol=1e-12)
    clipped = sum(
        not np.allclose(o[0], g[0], rtol=1e-9) for o, g in zip(expected, grads, strict=True)
    )
    if percentile < 100.0 and window > 1:
        assert clipped > 5  # the test exercises clipping, not only the pass-through


def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    norms = rng.exponential(size=50).astype(np.float32)
    for count in (1, 2, 7, 50, 80):
        kept = norms if count >= 50 else norms[:count]
        for p in (0.5, 10.0, 33.3, 50.0, 99.0, 100.0):
            ours = percentile_of_history(jnp.asarray(norms), jnp.asarray(count), p)
            np.testing.assert_allclose(float(ours), np.percentile(kept, p), rtol=4e-6)
    assert float(percentile_of_history(jnp.zeros(4), jnp.asarray(0), 50.0)) == np.inf


def test_autoclip_first_step_and_non_finite() -> None:
    tx = varjax.autoclip(10.0, window=4)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    big = {"w": jnp.full(3, 100.0)}
    updates, state = tx.update(big, state)  # the only norm is its own percentile: no clip
    np.testing.assert_array_equal(updates["w"], big["w"])
    bad = {"w": jnp.asarray([1.0, jnp.nan, 1.0])}
    updates, after = jax.jit(tx.update)(bad, state)
    assert np.isnan(updates["w"][1]) and int(after.count) == 1  # passed through, not recorded
    np.testing.assert_array_equal(after.norms, state.norms)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"percentile": 0.0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"percentile": float("nan")}, "percentile"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
    ],
)
def test_autoclip_bad_arguments(kwargs, arg) -> None:
    with pytest.raises(ValueError, match=arg):
        varjax.autoclip(**kwargs)


def test_autoclip_in_front_of_adam_keeps_dtypes() -> None:
    tx = optax.chain(varjax.autoclip(50.0), optax.adam(1e-3))
    params = {"a": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.ones(4)}
    state = tx.init(params)
    for i in range(3):
        grads = jax.tree.map(lambda p, i=i: (p * (i + 1)).astype(p.dtype), params)
        updates, state = tx.update(grads, state, params)
    assert updates["a"].dtype == jnp.bfloat16 and updates["b"].dtype == jnp.float32
