"""The benchmark scripts run end to end at a tiny size (no timing is asserted)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARS_EXACT = "mars_adamw exact"


def test_step_time_runs_and_writes_results(tmp_path: pathlib.Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--params", "2e4"]
    command += ["--repeats", "1", "--steps", "1", "--only", "radam,adamp", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    record = json.loads(next(tmp_path.glob("step_time_*.json")).read_text())
    assert [row["optimizer"] for row in record["rows"]] == ["radam", "adamp"]
    assert all(row["ratio"] > 0 for row in record["rows"])
    # mu and nu in float32, plus the 4-byte step count
    assert record["rows"][0]["varjax_state_bytes_per_param"] == pytest.approx(8.0, rel=1e-3)
    assert "| radam | optax.radam |" in next(tmp_path.glob("step_time_*.md")).read_text()


@pytest.mark.parametrize(
    ("suite", "names"),
    [
        ("ademamix", ["adamw", "ademamix", "ademamix+schedulers"]),
        (
            "mars",
            ["adamw", "adamw (2x lr)", "mars_adamw", "mars_adamw (2x lr)", "mars_adamw exact"],
        ),
        ("quantized", ["adamw", "adamw_8bit", "adamw_4bit", "adamw_4bit stochastic"]),
    ],
)
def test_convergence_runs_and_writes_results(tmp_path: pathlib.Path, suite, names) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--suite", suite]
    command += ["--steps", "20", "--seeds", "1", "--batch", "8", "--log-every", "10"]
    command += ["--chars", "20000", "--tag", "smoke", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    record = json.loads((tmp_path / f"convergence_{suite}_smoke.json").read_text())
    assert list(record["results"]) == names
    for (run,) in record["results"].values():
        assert run["step"] == [10, 20]
        assert all(np.isfinite(run["valid"])) and run["valid"][-1] < np.log(200)
    assert (tmp_path / f"convergence_{suite}_smoke.png").stat().st_size > 0


def test_noise_diagnostics_runs_and_writes_results(tmp_path: pathlib.Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "noise_diagnostics.py"),
        *("--steps", "20", "--log-every", "10", "--chars", "200000", "--out", str(tmp_path)),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    record = json.loads((tmp_path / "noise_diagnostics.json").read_text())
    assert record["history"]["step"] == [10, 20]
    assert all(np.isfinite(record["history"]["gsnr/hidden"]))
    assert (tmp_path / "noise_diagnostics.png").stat().st_size > 0


def test_size_sweep_runs_and_writes_results(tmp_path: pathlib.Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "size_sweep.py"), "--sizes", "1e5,5e5"]
    command += ["--repeats", "1", "--steps", "1", "--only", "qhm", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    record = json.loads(next(tmp_path.glob("size_sweep_*.json")).read_text())
    assert len(record["sizes"]) == 2 and record["sizes"][0] < record["sizes"][1]
    assert [row["optimizer"] for row in record["rows"]] == ["qhm"] * 2
    table = next(tmp_path.glob("size_sweep_*.md")).read_text()
    assert "| qhm | optax.sgd(momentum) |" in table
    assert next(tmp_path.glob("size_sweep_*.png")).stat().st_size > 10_000


def test_step_temps_runs_and_writes_results(tmp_path: pathlib.Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "step_temps.py"), "--shapes", "64x512"]
    command += ["--trees", "large:2:65536", "--only", "optax.adamw,adamw_8bit"]
    command += ["--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    record = json.loads(next(tmp_path.glob("step_temps_*.json")).read_text())
    temps = {(r["tree"], r["optimizer"]): r["temp_bytes_per_param"] for r in record["rows"]}
    assert temps["64x512", "optax.adamw"] < 0.01  # fused into apply_updates, in place
    assert temps["64x512", "adamw_8bit"] > 0.0  # at least the new codes beside the old
    assert temps["large:2:65536", "adamw_8bit"] > 0.0  # two leaves of 2 x 16384
    table = next(tmp_path.glob("step_temps_*.md")).read_text()
    assert "| 64x512 | adamw_8bit |" in table and "| large:2:65536 | adamw_8bit |" in table


def test_step_fusions_runs_and_writes_results(tmp_path: pathlib.Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "step_fusions.py"), "--rows", "64"]
    command += ["--only", "adamw_8bit segments;adamw_8bit tables", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    record = json.loads(next(tmp_path.glob("step_fusions_*.json")).read_text())
    assert set(record["variants"]) == {"adamw_8bit segments", "adamw_8bit tables"}
    for variant in record["variants"].values():
        # the codes of both moments are written by some kernel, and the step was timed
        assert sum("u8[64,4096]" in kernel for kernel in variant["kernels"]) >= 2
        assert variant["timed_step_compiles_alike"] and variant["step_ms"] > 0
    assert "| adamw_8bit tables |" in next(tmp_path.glob("step_fusions_*.md")).read_text()


def test_encoder_check_runs_and_writes_results(tmp_path: pathlib.Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "encoder_check.py"), "--size", "100000"]
    command += ["--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    record = json.loads(next(tmp_path.glob("encoder_check_*.json")).read_text())
    rows = record["results"]
    assert len(rows) == 15  # 5 maps, 3 kinds of values
    # codes differ only next to a midpoint, and by one entry
    assert all(row["largest_difference"] <= 1 for row in rows.values())
    assert all(row["farthest_from_midpoint"] < 1e-3 for row in rows.values())
    assert rows["8-bit dynamic, signed / uniform"]["share"] < 1e-4
    assert (
        "| 8-bit dynamic, signed / moments |"
        in next(tmp_path.glob("encoder_check_*.md")).read_text()
    )
