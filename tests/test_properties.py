"""Property-based checks (hypothesis) of formulas every rectified method relies on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import varjax

STEPS = jnp.arange(1, 20_001)


@settings(max_examples=25, deadline=None)
@given(b2=st.floats(0.9, 0.99999), threshold=st.floats(4.0, 8.0))
def test_rectification_term_is_a_monotone_warmup(b2: float, threshold: float) -> None:
    r, on = jax.vmap(lambda t: varjax.rectification(t, b2, threshold))(STEPS)
    r, on = np.asarray(r), np.asarray(on)
    assert np.all((r >= 0.0) & (r <= 1.0 + 1e-6))
    assert np.all(r[~on] == 0.0)
    first = np.argmax(on)
    assert on[first:].all(), "once rectified, always rectified"
    assert np.all(np.diff(r[first:]) >= -1e-6), "r_t does not decrease"


floats = hnp.arrays(
    np.float32, st.integers(1, 40), elements=st.floats(-10, 10, width=32, allow_subnormal=False)
)


@settings(max_examples=50, deadline=None)
@given(grad=floats, seed=st.integers(0, 2**16))
@example(grad=np.array([1.1754944e-38], np.float32), seed=0)  # u * g underflows to 0
def test_cautious_keeps_only_agreeing_entries(grad: np.ndarray, seed: int) -> None:
    inner_step = np.random.default_rng(seed).normal(size=grad.shape).astype(np.float32)
    inner = optax.stateless(lambda updates, params: {"w": jnp.asarray(inner_step)})
    tx = varjax.cautious(inner)
    out, _ = tx.update({"w": jnp.asarray(grad)}, tx.init({"w": jnp.zeros_like(grad)}))
    agree = inner_step * grad > 0
    scale = grad.size / (agree.sum() + 1)
    np.testing.assert_allclose(out["w"], np.where(agree, inner_step * scale, 0.0), rtol=1e-6)
