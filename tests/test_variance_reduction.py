"""Correctness of the variance-reduction family against float64 references and peers.

- References (``tests/references.py``, from the papers): MARS's correction
  (approximate, exact, per-tensor and global clip) and its AdamW, Lion and
  Shampoo instances; STORM (fixed ``a`` and the adaptive Algorithm 1); QHM;
  IGT (anytime and heavy-ball); multi-momentum alone, as QHM and inside IGT.
- Identities: MARS-AdamW is the correction chained before ``optax.scale_by_adam``;
  with ``gamma=1`` and no clip the exact correction plus an EMA is STORM;
  approximate STORM is plain SGD.
- Composability: the correction in front of ``optax.scale_by_lion`` and of
  AdEMAMix, each against a chained float64 reference.
- Peers: ``pytorch_optimizer.MARS`` (``adamw``, ``lion``, ``shampoo``; it has no
  exact form) and ``pytorch_optimizer.QHM``. pytorch-optimizer iterates
  Newton-Schulz in bfloat16, so Shampoo is compared at a bfloat16 tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer as po
import pytorch_optimizer.optimizer.mars as po_mars
import references as ref
import torch
from memory import donated_step_temporary_bytes
from test_rectification import (
    assert_sequences_close,
    gradient_sequence,
    initial_params,
    run_block,
    run_optimizer,
    run_reference,
    run_torch,
)
from tolerances import assert_close

import varjax

SHAPES = [(7, 5), (4, 9), (13,), ()]


def run_with_extras(tx, grads_seq, params, extras_seq, dtype=jnp.float32):
    """Outputs of a transform at fixed ``params`` with per-step extra arguments."""
    params = [jnp.asarray(p, dtype) for p in params]
    state, update = tx.init(params), jax.jit(tx.update)
    outputs = []
    for grads, extras in zip(grads_seq, extras_seq, strict=True):
        cast = {k: jax.tree.map(lambda x: jnp.asarray(x, dtype), v) for k, v in extras.items()}
        if "cluster" in extras:
            cast["cluster"] = extras["cluster"]
        out, state = update([jnp.asarray(g, dtype) for g in grads], state, params, **cast)
        outputs.append([np.asarray(o, np.float64) for o in out])
    return outputs


def sequences():
    grads = gradient_sequence(shapes=SHAPES)
    previous = gradient_sequence(seed=7, shapes=SHAPES)
    return grads, previous, initial_params(shapes=SHAPES)


# --------------------------------------------------------------------------
# 1. Float64 references
# --------------------------------------------------------------------------

APPROX = {
    "correction": (lambda: varjax.mars_correction(), lambda: ref.MarsCorrection()),
    "correction_global": (
        lambda: varjax.mars_correction(0.9, 0.5, norm_scope="global"),
        lambda: ref.MarsCorrection(0.9, 0.5, scope="global"),
    ),
    "correction_unclipped": (
        lambda: varjax.mars_correction(max_norm=None),
        lambda: ref.MarsCorrection(max_norm=None),
    ),
    "mars_adamw": (lambda: varjax.scale_by_mars(), lambda: ref.Mars("adamw")),
    "mars_lion": (lambda: varjax.scale_by_mars(preconditioner="lion"), lambda: ref.Mars("lion")),
    "mars_shampoo": (
        lambda: varjax.scale_by_mars(preconditioner="shampoo"),
        lambda: ref.Mars("shampoo"),
    ),
    "qhm": (lambda: varjax.scale_by_qhm(0.9, 0.7), lambda: ref.QHM(0.9, 0.7)),
    "correction_then_lion": (
        lambda: optax.chain(varjax.mars_correction(0.9), optax.scale_by_lion(0.9, 0.99)),
        lambda: ref.Chain(ref.MarsCorrection(0.9), ref.Lion(0.9, 0.99)),
    ),
    "correction_then_ademamix": (
        lambda: optax.chain(varjax.mars_correction(0.9), varjax.scale_by_ademamix(alpha=5.0)),
        lambda: ref.Chain(ref.MarsCorrection(0.9), ref.AdEMAMix(alpha=5.0)),
    ),
}


@pytest.mark.parametrize("name", list(APPROX))
def test_matches_float64_reference(name: str) -> None:
    make_tx, make_ref = APPROX[name]
    grads, _, params = sequences()
    expected = run_reference(make_ref(), grads, params)
    # Lion's sign flips where its argument is within float32 rounding of zero: none here
    assert_sequences_close(
        run_block(make_tx(), grads, params), expected, **reference_tolerance(name)
    )


def reference_tolerance(name: str) -> dict:
    """The float64-reference tolerance of ``name``, relative (``rtol``) and in EPS32 of the
    largest magnitude the leaf has held (``ulps``): Newton-Schulz's five iterations of
    three 7x5 or 4x9 matrix products each, 1e-4 and 32 (measured 1.8 EPS32 with AVX-512
    code, 5.4 with SSE4.2); Adam-like steps otherwise, 2e-5 and 8 (measured under 1)."""
    shampoo = "shampoo" in name
    return {"rtol": 1e-4 if shampoo else 2e-5, "ulps": 32 if shampoo else 8}


EXACT = {
    "correction": (
        lambda: varjax.mars_correction(exact=True),
        lambda: ref.MarsCorrection(),
    ),
    "mars_adamw": (lambda: varjax.scale_by_mars(exact=True), lambda: ref.Mars("adamw")),
    "mars_shampoo": (
        lambda: varjax.scale_by_mars(preconditioner="shampoo", exact=True),
        lambda: ref.Mars("shampoo"),
    ),
    "storm": (lambda: varjax.scale_by_storm(0.1), lambda: ref.Storm(0.1)),
    "storm_adaptive": (lambda: varjax.storm(0.1), lambda: ref.Storm(k=0.1)),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_form_matches_float64_reference(name: str) -> None:
    make_tx, make_ref = EXACT[name]
    grads, previous, params = sequences()
    reference = make_ref()
    expected = [reference.step(g, params, previous=p) for g, p in zip(grads, previous, strict=True)]
    extras = [{"previous_grads": p} for p in previous]
    actual = run_with_extras(make_tx(), grads, params, extras)
    assert_sequences_close(actual, expected, **reference_tolerance(name))


def test_mars_exercises_the_clip_both_ways() -> None:
    grads, _, _ = sequences()
    correction = ref.MarsCorrection()
    norms = [[np.linalg.norm(x) for x in correction.step(g)] for g in grads]
    clipped = sum(abs(n - 1.0) < 1e-9 for row in norms for n in row)
    assert 0 < clipped < sum(len(row) for row in norms)


def test_multi_momentum_matches_reference() -> None:
    grads, _, params = sequences()
    clusters = [int(c) for c in np.random.default_rng(3).integers(0, 3, len(grads))]
    weights = (0.5, 0.3, 0.2)
    tx = varjax.multi_momentum(3, decay=0.8, nu=0.7, weights=weights)
    reference = ref.MultiMomentum(3, decay=0.8, nu=0.7, weights=weights)
    expected = [reference.step(g, c) for g, c in zip(grads, clusters, strict=True)]
    actual = run_with_extras(tx, grads, params, [{"cluster": c} for c in clusters])
    assert_sequences_close(actual, expected, rtol=2e-5, ulps=8)


def quadratic_grad_fn(shapes):
    """Noisy gradients of a separable quadratic, a function of the query point."""
    rng = np.random.default_rng(5)
    curvature = [rng.uniform(0.5, 2.0, size=s) for s in shapes]
    noise = gradient_sequence(seed=9, shapes=shapes)

    def grad_fn(params, t):
        return [
            c * np.asarray(p, np.float64) + 0.1 * n
            for c, p, n in zip(curvature, params, noise[t], strict=True)
        ]

    return grad_fn


@pytest.mark.parametrize(("gamma", "clusters"), [(None, 0), (0.9, 0), (0.9, 3)])
def test_igt_matches_reference(gamma, clusters) -> None:
    shapes, steps, lr = [(7, 5), (13,), ()], 40, 0.05
    grad_fn = quadratic_grad_fn(shapes)
    params = initial_params(shapes=shapes)
    ids = [t % 3 for t in range(steps)]
    if clusters:  # multi-momentum inside IGT, with the same constant decay
        momentum = ref.MultiMomentum(3, decay=gamma)
        expected = ref.igt_trajectory(
            grad_fn, params, steps, lr, gamma, momentum=lambda g, t: momentum.step(g, ids[t])
        )
        inner = optax.chain(varjax.multi_momentum(3, gamma), optax.scale_by_learning_rate(lr))
        tx = varjax.implicit_gradient_transport(inner, gamma)
    else:
        expected = ref.igt_trajectory(grad_fn, params, steps, lr, gamma)
        tx = varjax.igt(lr, gamma)
    y = [jnp.asarray(p, jnp.float32) for p in params]
    state = tx.init(y)
    update = jax.jit(tx.update)
    for t in range(steps):
        query, theta = expected[t]
        # the query adds s = g_t / (1 - g_t) = t (up to 39) times theta - theta_prev:
        # each theta's rounding (u max|theta|) comes out ~2s + 1 times larger (measured 9.5 EPS32)
        assert_close(y[0], query[0], rtol=1e-4, ulps=64)
        extras = {"cluster": ids[t]} if clusters else {}
        grads = [jnp.asarray(g, jnp.float32) for g in grad_fn(y, t)]
        updates, state = update(grads, state, y, **extras)
        y = optax.apply_updates(y, updates)
        for a, e in zip(varjax.igt_eval_params(state), theta, strict=True):
            assert_close(a, e, rtol=1e-4, ulps=8, err_msg=f"step {t}")


# --------------------------------------------------------------------------
# 2. Identities
# --------------------------------------------------------------------------


def test_mars_adamw_is_the_correction_before_optax_adam() -> None:
    grads, _, params = sequences()
    chained = optax.chain(varjax.mars_correction(0.95), optax.scale_by_adam(0.95, 0.99))
    assert_sequences_close(
        run_block(varjax.scale_by_mars(), grads, params),
        run_block(chained, grads, params),
        rtol=1e-5,
        ulps=8,
    )


def test_exact_mars_with_gamma_one_is_storm() -> None:
    grads, previous, params = sequences()
    b = 0.9
    mars = optax.chain(
        varjax.mars_correction(b, gamma=1.0, exact=True, max_norm=None),
        varjax.multi_ema((b,), (1.0,), (False,)),
    )
    extras = [{"previous_grads": p} for p in previous]
    assert_sequences_close(
        run_with_extras(mars, grads, params, extras),
        run_with_extras(varjax.scale_by_storm(1 - b), grads, params, extras),
        rtol=1e-4,
        ulps=8,
    )


def test_approximate_storm_is_sgd() -> None:
    grads, _, params = sequences()
    out = run_block(varjax.scale_by_storm(0.3, exact=False), grads, params)
    assert_sequences_close(out, grads, rtol=1e-5, ulps=8)


@pytest.mark.parametrize(
    "make",
    [
        lambda: varjax.mars_adamw(1e-3),
        lambda: varjax.mars_lion(1e-3),
        lambda: optax.chain(varjax.scale_by_storm(exact=False), optax.sgd(1e-3)),
    ],
    ids=["mars_adamw", "mars_lion", "storm"],
)
def test_stored_gradient_replaces_the_old_one_in_place(make) -> None:
    """With the state donated, the new ``g_prev`` goes into the old one's buffer, with
    no parameter-sized temporary (``_base.store_after``); a plain store costs one
    (a copy, and on CPU its page faults: 2.6x instead of 1.5x ``optax.adamw``)."""
    params = {"w": jnp.ones((256, 512)), "b": jnp.ones(512)}
    assert donated_step_temporary_bytes(make(), params) < params["w"].nbytes // 2


def test_mars_value_and_grad_gives_both_gradients() -> None:
    def loss(p, x):
        return jnp.sum(jnp.sin(p["w"] * x))

    params, previous, x = {"w": jnp.ones(3)}, {"w": jnp.full(3, 0.5)}, jnp.arange(3.0)
    value, grads, previous_grads = varjax.mars_value_and_grad(loss)(params, previous, x)
    np.testing.assert_allclose(value, loss(params, x))
    np.testing.assert_allclose(grads["w"], jax.grad(loss)(params, x)["w"])
    np.testing.assert_allclose(previous_grads["w"], jax.grad(loss)(previous, x)["w"])


# --------------------------------------------------------------------------
# 3. Ready optimizers: the 1-D rule, weight decay, exact form through partition
# --------------------------------------------------------------------------


def reference_mars_optimizer(kind, grads_seq, params, previous_seq=None, lr=3e-3, wd=0.05):
    """The official update: MARS on matrices, AdamW(0.9, 0.95, wd_1d=0.1) elsewhere."""
    mars = ref.Mars(kind)
    adam = ref.Adam(0.9, 0.95)
    params = [p.copy() for p in params]
    matrix = [p.ndim == 2 for p in params]
    trajectory = []
    for t, grads in enumerate(grads_seq):
        g2 = [g for g, m in zip(grads, matrix, strict=True) if m]
        g1 = [g for g, m in zip(grads, matrix, strict=True) if not m]
        prev = None
        if previous_seq is not None:
            prev = [p for p, m in zip(previous_seq[t], matrix, strict=True) if m]
        d2, d1 = iter(mars.step(g2, previous=prev)), iter(adam.step(g1))
        params = [
            p - lr * (wd * p + next(d2)) if m else p - lr * (0.1 * p + next(d1))
            for p, m in zip(params, matrix, strict=True)
        ]
        trajectory.append([p.copy() for p in params])
    return trajectory


@pytest.mark.parametrize("kind", ["adamw", "lion", "shampoo"])
def test_ready_optimizer_matches_reference(kind) -> None:
    grads, _, params = sequences()
    make = {"adamw": varjax.mars_adamw, "lion": varjax.mars_lion, "shampoo": varjax.mars_shampoo}
    ours = run_optimizer(make[kind](3e-3, weight_decay=0.05), grads, params)
    expected = reference_mars_optimizer(kind, grads, params)
    assert_sequences_close(ours, expected, rtol=1e-5, ulps=8)


def test_exact_mars_adamw_through_the_partition() -> None:
    grads, previous, params = sequences()
    tx = varjax.mars_adamw(3e-3, weight_decay=0.05, exact=True)
    p = [jnp.asarray(x, jnp.float32) for x in params]
    state, trajectory = tx.init(p), []
    for g, prev in zip(grads, previous, strict=True):
        cast = [jnp.asarray(x, jnp.float32) for x in g]
        updates, state = tx.update(cast, state, p, previous_grads=[jnp.asarray(x) for x in prev])
        p = optax.apply_updates(p, updates)
        trajectory.append([np.float64(x) for x in p])
    expected = reference_mars_optimizer("adamw", grads, params, previous)
    assert_sequences_close(trajectory, expected, rtol=1e-5, ulps=8)


# --------------------------------------------------------------------------
# 4. Peers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adamw", "lion", "shampoo"])
def test_mars_matches_pytorch_optimizer(kind, monkeypatch) -> None:
    # pytorch-optimizer iterates Newton-Schulz in bfloat16; run it in float64 for the
    # comparison (test_shampoo_close_to_pytorch_optimizer_in_bfloat16 keeps bf16)
    original = po_mars.zero_power_via_newton_schulz_5
    monkeypatch.setattr(
        po_mars,
        "zero_power_via_newton_schulz_5",
        lambda g, **kw: original(g, dtype=torch.float64, **kw),
    )
    ours, theirs, _ = run_mars_pair(kind)
    assert_sequences_close(ours, theirs, rtol=1e-6, atol=1e-9)


def run_mars_pair(kind, steps=60):
    shapes = [(7, 5), (4, 9), (13,), (1,)]
    grads = gradient_sequence(shapes=shapes, steps=steps)
    params = initial_params(shapes=shapes)
    # pytorch-optimizer adds eps before the bias correction, the official code after:
    # eps=1e-16 makes the placement immaterial
    lr, wd, eps = 3e-3, 0.05, 1e-16
    kwargs = {"lr": lr, "mars_type": kind, "weight_decay": wd, "eps": eps, "foreach": False}
    theirs = run_torch(po.MARS, kwargs, grads, params)
    make = {"adamw": varjax.mars_adamw, "lion": varjax.mars_lion, "shampoo": varjax.mars_shampoo}
    with jax.enable_x64(True):
        tx = make[kind](lr, eps=eps, weight_decay=wd)
        ours = run_optimizer(tx, grads, params, jnp.float64)
    return ours, theirs, params


def test_shampoo_close_to_pytorch_optimizer_in_bfloat16() -> None:
    ours, theirs, params = run_mars_pair("shampoo", steps=10)
    for a_step, e_step in zip(ours, theirs, strict=True):
        for a, e, p in zip(a_step[:2], e_step[:2], params[:2], strict=True):
            moved, expected = a - p, e - p  # bfloat16 keeps ~3 digits of each step
            scale = np.max(np.abs(expected))
            np.testing.assert_allclose(moved, expected, rtol=0, atol=5e-2 * scale)


def test_qhm_matches_pytorch_optimizer() -> None:
    shapes = [(7, 5), (13,), (1,)]
    grads, params = gradient_sequence(shapes=shapes), initial_params(shapes=shapes)
    theirs = run_torch(po.QHM, {"lr": 0.01, "momentum": 0.9, "nu": 0.7}, grads, params)
    with jax.enable_x64(True):
        ours = run_optimizer(varjax.qhm(0.01, 0.9, 0.7), grads, params, jnp.float64)
    assert_sequences_close(ours, theirs, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------
# 5. Errors
# --------------------------------------------------------------------------


def test_missing_extra_arguments_raise() -> None:
    params = {"w": jnp.ones((2, 2))}
    for tx in (varjax.mars_correction(exact=True), varjax.scale_by_storm(), varjax.storm()):
        with pytest.raises(ValueError, match="previous_grads"):
            tx.update(params, tx.init(params), params)
    tx = varjax.multi_momentum(2)
    with pytest.raises(ValueError, match="cluster"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="IGT"):
        varjax.igt_eval_params(optax.adam(0.1).init(params))


def test_previous_grads_of_the_wrong_shape_raise() -> None:
    params = {"w": jnp.ones((2, 2))}
    tx = varjax.mars_correction(exact=True)
    with pytest.raises(ValueError, match="shape"):
        tx.update(params, tx.init(params), params, previous_grads={"w": jnp.ones(3)})
