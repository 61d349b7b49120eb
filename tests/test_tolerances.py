"""The reference tests' tolerances separate a wrong algorithm from float32 rounding.

Each case runs a varjax transform against its float64 reference with one
deliberate mistake, under the tolerance of the family's reference test
(``tests/tolerances.py`` has the error model): the comparison must fail. The
right references pass in the family tests, on this CPU and under
``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` or ``SSE4_2``.
"""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import references as ref
from test_multi_ema import GROKFAST_TOLERANCE, GrokfastEMA
from test_noise import AUTOCLIP_TOLERANCE, GSNR_TOLERANCE, run_with_samples, sample_sequence
from test_rectification import (
    REFERENCE_TOLERANCE,
    assert_sequences_close,
    gradient_sequence,
    initial_params,
    run_block,
    run_reference,
)
from test_variance_reduction import reference_tolerance, sequences
from test_weight_rescaling import TARGET, TVR_ULPS, weights_with
from tolerances import assert_close

import varjax


class AdamWithoutSecondMomentCorrection(ref.Adam):
    """Adam's moments with ``v`` left without its ``1 / (1 - b2^t)``."""

    def moments(self, grads):
        m_hat, _ = super().moments(grads)
        return m_hat, list(self.v)


class AdamWithSwappedBetas(ref.Adam):
    """b1 and b2 exchanged (0.999 for the first moment, 0.9 for the second)."""

    def __init__(self) -> None:
        super().__init__(b1=0.999, b2=0.9)


class GrokfastFromZero(GrokfastEMA):
    """Grokfast's EMA started at zero instead of at the first gradient."""

    def step(self, grads, params=None):
        if self.mu is None:
            self.mu = [np.zeros_like(g) for g in grads]
        return super().step(grads, params)


class AutoClipBeforeRecording(ref.AutoClip):
    """The percentile taken over the history without the current norm."""

    def step(self, grads, params=None):
        norm = float(np.sqrt(sum(np.sum(g * g) for g in grads)))
        kept = self.history if self.window is None else self.history[-self.window :]
        out = [g.copy() for g in grads]
        if kept:
            threshold = float(np.percentile(kept, self.percentile))
            out = [g * min(1.0, threshold / norm) for g in grads]
        self.history.append(norm)
        return out


def vrgd_with_second_moment(samples, gamma=0.1):
    """VRGD with ``mean(g_d^2)`` for ``sigma^2``, the mean's square not subtracted."""
    out = []
    for stack in samples:
        g = stack.mean(0)
        r = g**2 / np.mean(stack**2, axis=0)
        out.append(np.clip(r / r.mean(), gamma, 1.0) * g)
    return out


class RAdamWithoutSecondMomentCorrection(AdamWithoutSecondMomentCorrection, ref.RAdam):
    """RAdam over Adam's moments with ``v`` left without its bias correction."""


def mars_without_v_correction() -> ref.Mars:
    mars = ref.Mars("adamw")
    mars.adam = AdamWithoutSecondMomentCorrection(0.95, 0.99)
    return mars


def rectification_case(block, wrong):
    grads, params = gradient_sequence(), initial_params()
    return run_block(block, grads, params), run_reference(wrong, grads, params), REFERENCE_TOLERANCE


def mars_case(name, block, wrong):
    grads, _, params = sequences()
    expected = run_reference(wrong, grads, params)
    return run_block(block, grads, params), expected, reference_tolerance(name)


def grads_case(block, wrong, tolerance):
    grads, params = gradient_sequence(), initial_params()
    return run_block(block, grads, params), run_reference(wrong, grads, params), tolerance


def gsnr_case():
    sequence = sample_sequence(steps=20)
    ours = run_with_samples(varjax.scale_by_gsnr(0.1), sequence, initial_params())
    return ours, [vrgd_with_second_moment(s, 0.1) for s in sequence], GSNR_TOLERANCE


WRONG = {
    "radam_without_v_correction": lambda: rectification_case(
        varjax.scale_by_radam(), RAdamWithoutSecondMomentCorrection()
    ),
    "rectify_adam_swapped_betas": lambda: rectification_case(
        varjax.rectify(optax.scale_by_adam()), ref.Rectify(AdamWithSwappedBetas())
    ),
    "rectify_adam_without_v_correction": lambda: rectification_case(
        varjax.rectify(optax.scale_by_adam()), ref.Rectify(AdamWithoutSecondMomentCorrection())
    ),
    "mars_correction_without_b1": lambda: mars_case(
        "correction", varjax.mars_correction(), ref.MarsCorrection(gamma=0.025 / 0.95)
    ),
    "mars_adamw_without_v_correction": lambda: mars_case(
        "mars_adamw", varjax.scale_by_mars(), mars_without_v_correction()
    ),
    "grokfast_from_zero": lambda: grads_case(
        varjax.grokfast_ema(), GrokfastFromZero(), GROKFAST_TOLERANCE
    ),
    "autoclip_before_recording": lambda: grads_case(
        varjax.autoclip(50.0, 7), AutoClipBeforeRecording(50.0, 7), AUTOCLIP_TOLERANCE
    ),
    "gsnr_second_moment_for_variance": gsnr_case,
}


@pytest.mark.parametrize("name", list(WRONG))
def test_reference_tolerance_rejects_a_wrong_variant(name: str) -> None:
    ours, wrong, tolerance = WRONG[name]()
    with pytest.raises(AssertionError):
        assert_sequences_close(ours, wrong, **tolerance)


def test_tvr_tolerance_rejects_the_population_standard_deviation() -> None:
    """One rescaling of a 32 x 24 matrix: ``ddof=0`` is 1.3e-3 of the deviations off."""
    params = {"w": jnp.zeros((32, 24), jnp.float32)}
    grads = {"w": weights_with(3.0 * TARGET, 0.5)}
    tx = varjax.target_variance_rescaling(TARGET, every=1)
    updates, _ = tx.update(grads, tx.init(params), params)
    ours = np.asarray(optax.apply_updates(params, updates)["w"], np.float64)
    w = np.asarray(grads["w"], np.float64)

    def rescaled(ddof):
        return (w - w.mean()) / w.std(ddof=ddof) * TARGET + w.mean()

    largest = np.max(np.abs(w))
    assert_close(ours, rescaled(1), rtol=0, ulps=TVR_ULPS, scale=largest)
    with pytest.raises(AssertionError):
        assert_close(ours, rescaled(0), rtol=0, ulps=TVR_ULPS, scale=largest)


# Reference tests whose float32 results change in their last bits without AVX and FMA
ANOTHER_ISA_TESTS = [
    "tests/test_weight_rescaling.py::test_tvr_matches_reference_over_many_steps",
    "tests/test_multi_ema.py::test_grokfast_matches_reference",
    "tests/test_rectification.py::test_block_matches_float64_reference[adamp]",
    "tests/test_variance_reduction.py::test_exact_form_matches_float64_reference[mars_shampoo]",
]


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 instruction sets"
)
def test_reference_tests_pass_with_another_instruction_set() -> None:
    """``--xla_cpu_max_isa=SSE4_2``: 128-bit vectors and no FMA, so other reduction
    orders and roundings of ``jnp.std``, ``exp`` and ``a * b + c`` (what another
    CPU gives); these tests failed a fixed ``atol`` there or on an AVX-512 EPYC."""
    root = pathlib.Path(__file__).parent.parent
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_max_isa=SSE4_2".strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # xdist's
    env |= {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0"]
    result = subprocess.run(
        [*command, *ANOTHER_ISA_TESTS], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
