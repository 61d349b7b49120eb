"""Correctness of the rectification family, step by step.

1. Float64 references from the papers (``tests/references.py``) against the
   float32 JAX building blocks, 60 steps on a random pytree with a matrix, a
   vector and a scalar; plus whole-optimizer trajectories with learning rate and
   weight decay.
2. Optax peers: ``varjax.radam`` vs ``optax.radam`` and ``varjax.adopt`` vs
   ``optax.contrib.adopt`` (also with Nesterov momentum).
3. pytorch-optimizer peers (RAdam, ADOPT, Grams, DiffGrad, AdamP) in float64,
   varjax also in float64 (``jax.enable_x64``), on identical gradients.

Convention mappings (each also noted where it is used):
- pytorch-optimizer adds ``eps`` to ``sqrt(v)`` *before* bias correction in
  RAdam, DiffGrad and AdamP; we use ``eps=1e-16`` there, so the placement does
  not matter at float64 precision.
- pytorch-optimizer's RAdam skips the step below the threshold unless
  ``degenerated_to_sgd=True``, which gives RAdam's momentum fallback.
- ADOPT's ``clip_lambda`` is called with ``t + 1`` there; ``step - 1`` maps it.
- AdamP: PyTorch weights are ``(out, in)`` with the channel first; varjax takes
  the last axis, so torch is fed transposed matrices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import pytorch_optimizer as po
import references as ref
import torch
from tolerances import assert_close, scale_of

import varjax

STEPS = 60
SHAPES = [(7, 5), (13,), ()]


def gradient_sequence(seed: int = 0, steps: int = STEPS, shapes=SHAPES) -> list[list[np.ndarray]]:
    """Float32-representable gradients of varying scale, as float64 arrays."""
    rng = np.random.default_rng(seed)
    return [
        [
            rng.normal(scale=10.0 ** rng.uniform(-2, 1), size=s)
            .astype(np.float32)
            .astype(np.float64)
            for s in shapes
        ]
        for _ in range(steps)
    ]


def initial_params(seed: int = 1, shapes=SHAPES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32).astype(np.float64) for s in shapes]


def run_block(tx, grads_seq, params, dtype=jnp.float32) -> list[list[np.ndarray]]:
    """Outputs of a building block at fixed ``params``, one list of arrays per step."""
    params = [jnp.asarray(p, dtype) for p in params]
    state, update = tx.init(params), jax.jit(tx.update)
    outputs = []
    for grads in grads_seq:
        out, state = update([jnp.asarray(g, dtype) for g in grads], state, params)
        outputs.append([np.asarray(o, np.float64) for o in out])
    return outputs


def run_reference(reference, grads_seq, params) -> list[list[np.ndarray]]:
    return [reference.step(grads, params) for grads in grads_seq]


def run_optimizer(tx, grads_seq, params, dtype=jnp.float32) -> list[list[np.ndarray]]:
    """Parameters after each step of a full optimizer fed ``grads_seq``."""
    params = [jnp.asarray(p, dtype) for p in params]
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    trajectory = []
    for grads in grads_seq:
        params, state = step(params, state, [jnp.asarray(g, dtype) for g in grads])
        trajectory.append([np.asarray(p, np.float64) for p in params])
    return trajectory


def assert_sequences_close(
    actual, expected, rtol: float, ulps: float = 0.0, atol: float = 0.0
) -> None:
    """Step by step, every array within ``rtol |e| + ulps * EPS32 * S + atol``.

    ``S`` is the largest magnitude the leaf's expected values have reached so far
    (``tolerances.assert_close``): float32 rounding near a cancellation is relative
    to the array, not to the element, and a state (an EMA, a momentum, the last
    gradient) carries the rounding of the largest values it held; the gradients
    here change scale by up to 1000x from one step to the next. ``atol``
    (absolute) is for float64 peers and documented drifts only.
    """
    largest: list[float] = []
    for t, (a_step, e_step) in enumerate(zip(actual, expected, strict=True)):
        largest = [
            max(x, scale_of(e)) for x, e in zip(largest or [0.0] * len(e_step), e_step, strict=True)
        ]
        for a, e, s in zip(a_step, e_step, largest, strict=True):
            msg = f"step {t + 1}"
            assert_close(a, e, rtol=rtol, ulps=ulps, scale=s, atol=atol, err_msg=msg)


# --------------------------------------------------------------------------
# 1. Float64 references
# --------------------------------------------------------------------------

# float32 against float64: Adam-like steps carry a few float32 ulps of relative error
# (rtol 2e-5, 168 EPS32, for elements far from zero: sqrt of a 60-step b2 = 0.999 EMA,
# divisions, transcendental r_t, atan2); near a cancellation in m the error is the
# state's: 8 EPS32 of the largest step so far (measured under 3 with AVX-512, AVX2 and
# SSE4.2 code).
REFERENCE_TOLERANCE = {"rtol": 2e-5, "ulps": 8}

BLOCKS = {
    "radam": (lambda: varjax.scale_by_radam(), lambda: ref.RAdam()),
    "radam_threshold4": (
        lambda: varjax.scale_by_radam(threshold=4.0),
        lambda: ref.RAdam(threshold=4.0),
    ),
    "radam_amsgrad": (lambda: varjax.scale_by_radam(amsgrad=True), lambda: ref.RAdam(amsgrad=True)),
    "adopt": (lambda: varjax.scale_by_adopt(), lambda: ref.Adopt()),
    "adopt_noclip": (
        lambda: varjax.scale_by_adopt(clip_exponent=None),
        lambda: ref.Adopt(clip_exponent=None),
    ),
    "grams": (lambda: varjax.scale_by_grams(), lambda: ref.Grams()),
    "grams_amsgrad": (lambda: varjax.scale_by_grams(amsgrad=True), lambda: ref.Grams(amsgrad=True)),
    "diffgrad": (lambda: varjax.scale_by_diffgrad(), lambda: ref.DiffGrad()),
    "adam_atan2": (lambda: varjax.scale_by_adam_atan2(), lambda: ref.AdamAtan2()),
    "adamp": (lambda: varjax.scale_by_adamp(weight_decay=0.1), lambda: ref.AdamP(weight_decay=0.1)),
    "cautious_adam": (
        lambda: varjax.cautious(optax.scale_by_adam()),
        lambda: ref.Cautious(ref.Adam()),
    ),
    "rectify_adam": (
        lambda: varjax.rectify(optax.scale_by_adam()),
        lambda: ref.Rectify(ref.Adam()),
    ),
    "rectify_amsgrad_skip": (
        lambda: varjax.rectify(optax.scale_by_amsgrad(), fallback="skip"),
        lambda: ref.Rectify(ref.Adam(amsgrad=True), fallback="skip"),
    ),
    "rectify_diffgrad_sgd": (
        lambda: varjax.rectify(varjax.scale_by_diffgrad(b2=0.99), b2=0.99, fallback="sgd"),
        lambda: ref.Rectify(ref.DiffGrad(b2=0.99), b2=0.99, fallback="sgd"),
    ),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_matches_float64_reference(name: str) -> None:
    make_block, make_reference = BLOCKS[name]
    grads, params = gradient_sequence(), initial_params()
    assert_sequences_close(
        run_block(make_block(), grads, params),
        run_reference(make_reference(), grads, params),
        **REFERENCE_TOLERANCE,
    )


def test_rectification_threshold_conventions() -> None:
    """For b2 = 0.999, rho_5 < 5 < rho_6.

    So threshold 4 (the paper's rho_t > 4) rectifies from step 5, threshold 5 from step 6.
    """
    rho = {t: ref.rectification_term(t, 0.999)[0] for t in (4, 5, 6)}
    assert rho[4] < 4 < rho[5] < 5 < rho[6]
    for threshold, first in ((4.0, 5), (5.0, 6)):
        on = [bool(varjax.rectification(jnp.asarray(t), 0.999, threshold)[1]) for t in range(1, 10)]
        assert on.index(True) + 1 == first


@pytest.mark.parametrize("b2", [0.9, 0.99, 0.999, 0.9999])
def test_rectification_term_matches_float64(b2: float) -> None:
    """Within about one float32 ulp at every step, including the first rectified ones."""
    for t in [*range(1, 100), 1000, 10_000, 1_000_000]:
        r, on = varjax.rectification(jnp.asarray(t), b2, 5.0)
        rho, expected = ref.rectification_term(t, b2)
        assert bool(on) == (rho >= 5.0)
        if on:
            assert float(r) == pytest.approx(expected, rel=1e-6), t


def test_adamp_exercises_every_projection_branch() -> None:
    """Gradients orthogonal per channel, orthogonal to the whole weight, and aligned with it."""
    rng = np.random.default_rng(3)
    p = rng.normal(size=(6, 4))
    per_channel = rng.normal(size=p.shape)
    per_channel -= p * np.sum(per_channel * p, axis=0) / np.sum(p * p, axis=0)
    whole = rng.normal(size=p.shape)
    whole -= p * np.sum(whole * p) / np.sum(p * p)
    params = [p, p, p]
    grads = [[per_channel, whole, p + 0.1 * rng.normal(size=p.shape)]] * 5
    reference = ref.AdamP(weight_decay=0.1)
    expected = run_reference(reference, grads, params)
    assert reference.projected == [True, True, False]
    assert ref.cosine(whole[:, 0], p[:, 0], 1e-8) > 0.1 / np.sqrt(6)  # not per-channel invariant
    actual = run_block(varjax.scale_by_adamp(weight_decay=0.1), grads, params)
    assert_sequences_close(actual, expected, rtol=2e-5, ulps=8)


ALIASES = {
    "radam": (lambda: varjax.radam(0.01, weight_decay=0.1), lambda: ref.RAdam()),
    "adopt": (lambda: varjax.adopt(0.01, weight_decay=0.1), lambda: ref.Adopt()),
    "grams": (lambda: varjax.grams(0.01, weight_decay=0.1), lambda: ref.Grams()),
    "diffgrad": (lambda: varjax.diffgrad(0.01, weight_decay=0.1), lambda: ref.DiffGrad()),
    "adam_atan2": (lambda: varjax.adam_atan2(0.01, weight_decay=0.1), lambda: ref.AdamAtan2()),
    "cautious_adamw": (
        lambda: varjax.cautious_adamw(0.01, weight_decay=0.1),
        lambda: ref.Cautious(ref.Adam()),
    ),
}


@pytest.mark.parametrize("name", list(ALIASES))
def test_optimizer_trajectory_matches_float64_reference(name: str) -> None:
    """p <- p - lr * (update + wd * p) with the reference's update, 60 steps."""
    make_tx, make_reference = ALIASES[name]
    grads, params = gradient_sequence(), initial_params()
    reference, expected, p = make_reference(), [], params
    for g in grads:
        p = [x - 0.01 * (u + 0.1 * x) for x, u in zip(p, reference.step(g, p), strict=True)]
        expected.append(p)
    assert_sequences_close(run_optimizer(make_tx(), grads, params), expected, rtol=1e-5, ulps=8)


# --------------------------------------------------------------------------
# 2. Optax peers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
def test_radam_matches_optax(nesterov: bool) -> None:
    grads, params = gradient_sequence(), initial_params()
    ours = run_optimizer(varjax.radam(0.01, nesterov=nesterov), grads, params)
    # optax's float32 r_t is off by up to ~1% in the first rectified steps (b2**t in
    # float32); run under float64 it is exact, and varjax's float32 run matches it.
    with jax.enable_x64(True):
        exact = run_optimizer(optax.radam(0.01, nesterov=nesterov), grads, params, jnp.float64)
    assert_sequences_close(ours, exact, rtol=1e-5, ulps=8)
    theirs = run_optimizer(optax.radam(0.01, nesterov=nesterov), grads, params)
    assert_sequences_close(ours, theirs, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("nesterov", [False, True])
def test_adopt_matches_optax(nesterov: bool) -> None:
    grads, params = gradient_sequence(), initial_params()
    ours = run_optimizer(varjax.adopt(0.01, nesterov=nesterov), grads, params)
    # optax computes 1 - b2 in float32 from a traced b2 = 0.9999 (~6e-4 relative error
    # in the second-moment increment); under float64 it is exact and varjax matches it.
    with jax.enable_x64(True):
        exact = run_optimizer(
            optax.contrib.adopt(0.01, nesterov=nesterov), grads, params, jnp.float64
        )
    assert_sequences_close(ours, exact, rtol=1e-6, ulps=8)
    theirs = run_optimizer(optax.contrib.adopt(0.01, nesterov=nesterov), grads, params)
    assert_sequences_close(ours, theirs, rtol=1e-3, atol=1e-5)  # optax's drift, see above


def test_adamp_nesterov_is_optax_nesterov_adam() -> None:
    """One Nesterov convention (``varjax._base.nesterov_momentum``), Optax's: with no
    projection (``delta=0``) and no weight decay, AdamP's Nesterov step is
    ``optax.scale_by_adam(nesterov=True)``'s (NAdam). Compared in float64, where
    Optax's ``1 - b1**t`` is exact. The official AdamP code's convention (both terms
    over ``1 - b1**t``, varjax's before) gives 1.9 times the first gradient where
    Optax's gives 1.47."""
    grads = gradient_sequence(steps=20)
    params = initial_params()
    with jax.enable_x64(True):
        ours = run_block(
            varjax.scale_by_adamp(delta=0.0, nesterov=True), grads, params, jnp.float64
        )
        theirs = run_block(optax.scale_by_adam(nesterov=True), grads, params, jnp.float64)
    for got, want in zip(ours, theirs, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    first = run_block(varjax.scale_by_adamp(delta=0.0, nesterov=True), [[np.ones(3)]], [np.ones(3)])
    # (b1 * (1 - b1) / (1 - b1**2) + (1 - b1) / (1 - b1)) / 1 at the first step, b1 = 0.9
    np.testing.assert_allclose(first[0][0], 0.09 / 0.19 + 1.0, rtol=1e-6)


# --------------------------------------------------------------------------
# 3. pytorch-optimizer peers
# --------------------------------------------------------------------------


def run_torch(optimizer_cls, kwargs, grads_seq, params, transpose=False) -> list[list[np.ndarray]]:
    """Parameters after each ``step()`` of a torch optimizer with gradients set by hand."""
    fix = (lambda a: a.T.copy()) if transpose else (lambda a: a)
    tensors = [torch.tensor(fix(p), dtype=torch.float64, requires_grad=True) for p in params]
    optimizer = optimizer_cls(tensors, **kwargs)
    trajectory = []
    for grads in grads_seq:
        for tensor, g in zip(tensors, grads, strict=True):
            tensor.grad = torch.tensor(fix(g), dtype=torch.float64)
        optimizer.step()
        trajectory.append([fix(t.detach().numpy().copy()) for t in tensors])
    return trajectory


LR, WD = 0.01, 0.05
PEERS = {
    # eps=1e-16: pytorch-optimizer adds eps before bias correction (see module docstring)
    "RAdam": (
        po.RAdam,
        {"degenerated_to_sgd": True, "eps": 1e-16, "weight_decay": WD},
        lambda: varjax.radam(LR, eps=1e-16, weight_decay=WD),
    ),
    "ADOPT": (po.ADOPT, {"clip_lambda": lambda step: (step - 1) ** 0.25}, lambda: varjax.adopt(LR)),
    "Grams": (
        po.Grams,
        {"eps": 1e-6, "weight_decay": WD},
        lambda: varjax.grams(LR, eps=1e-6, weight_decay=WD),
    ),
    "DiffGrad": (
        po.DiffGrad,
        {"eps": 1e-16, "weight_decay": WD},
        lambda: varjax.diffgrad(LR, eps=1e-16, weight_decay=WD),
    ),
    "AdamP": (
        po.AdamP,
        {"eps": 1e-16, "weight_decay": WD},
        lambda: varjax.adamp(LR, eps=1e-16, weight_decay=WD),
    ),
}


@pytest.mark.parametrize("name", list(PEERS))
def test_matches_pytorch_optimizer(name: str) -> None:
    optimizer_cls, kwargs, make_tx = PEERS[name]
    shapes = [(7, 5), (13,), (1,)]  # torch optimizers take no 0-d parameters here
    grads, params = gradient_sequence(shapes=shapes), initial_params(shapes=shapes)
    if name == "AdamP":  # make the matrix scale-invariant for the first steps
        p = params[0]
        for g in grads[:10]:
            g[0] -= p * np.sum(g[0] * p, axis=0) / np.sum(p * p, axis=0)
    theirs = run_torch(
        optimizer_cls,
        {"lr": LR, "foreach": False, **kwargs},
        grads,
        params,
        transpose=name == "AdamP",
    )
    with jax.enable_x64(True):
        ours = run_optimizer(make_tx(), grads, params, jnp.float64)
    # float64 both sides; r_t in varjax is float32 (about 1e-7 relative)
    assert_sequences_close(ours, theirs, rtol=1e-6, atol=1e-9)
