"""``python -m varjax compare``: specifications, end-to-end runs, tuning, presets, determinism,
errors, and the dependencies the library and the comparison need."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys
import tomllib

import matplotlib
import numpy as np
import optax
import pytest

import varjax
from varjax.compare import cli, report, spec, tune
from varjax.compare.tasks import CHARLM_SIZES, PRESETS, build_task
from varjax.compare.train import Curve, OptimizerRun, RateTrainer, train

matplotlib.use("Agg")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def compare(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "varjax", "compare", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# --- specifications ------------------------------------------------------------------------


def test_names_resolve_to_varjax_first_then_optax() -> None:
    specs = spec.parse_specs("radam,adamw,optax.radam,varjax.adopt,optax.contrib.muon")
    assert [s.name for s in specs] == [
        "varjax.radam",
        "optax.adamw",
        "optax.radam",
        "varjax.adopt",
        "optax.contrib.muon",
    ]
    assert all(s.kwargs == {} for s in specs)


def test_hyper_parameters_of_every_type() -> None:
    text = "mars_adamw:learning_rate=3e-3,gamma=0.025,exact=false,max_norm=None,"
    text += "optax.adamw:learning_rate=1e-3,weight_decay=0.1,nesterov=True,qhm:b=0.9,nu=1"
    first, second, third = spec.parse_specs(text)
    assert first.kwargs == {"learning_rate": 3e-3, "gamma": 0.025, "exact": False, "max_norm": None}
    assert second.name == "optax.adamw"
    assert second.kwargs == {"learning_rate": 1e-3, "weight_decay": 0.1, "nesterov": True}
    assert third.kwargs == {"b": 0.9, "nu": 1} and isinstance(third.kwargs["nu"], int)
    assert (
        first.label == "varjax.mars_adamw:learning_rate=0.003,gamma=0.025,exact=False,max_norm=None"
    )
    assert spec.parse_value("global") == "global"
    (contrib,) = spec.parse_specs("optax.contrib.ademamix:b1=0.8,alpha=(4, 5)")
    assert contrib.kwargs == {"b1": 0.8, "alpha": (4, 5)}


def test_default_learning_rates() -> None:
    _, kwargs = spec.build_optimizer(spec.OptimizerSpec("varjax.lion_8bit"), 3e-3)
    assert kwargs == {"learning_rate": 1e-3}
    _, kwargs = spec.build_optimizer(spec.OptimizerSpec("optax.adamw", {"b1": 0.8}), 3e-3)
    assert kwargs == {"learning_rate": 3e-3, "b1": 0.8}
    _, kwargs = spec.build_optimizer(spec.OptimizerSpec("varjax.radam", {"learning_rate": 1}), 3e-3)
    assert kwargs == {"learning_rate": 1}
    assert spec.default_learning_rate("optax.contrib.prodigy", 3e-3) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("adamw8bit", "close matches: varjax.adamw_8bit"),
        ("optax.adamww", "close matches: optax.adamw"),
        ("radm", "varjax.radam"),
        ("nothing_like_it", "unknown optimizer 'nothing_like_it'"),
        ("scale_by_adam", "not a ready optimizer"),
        ("radam:b1=0.9x", "cannot parse the value '0.9x'"),
        ("b1=0.9", "before any optimizer name"),
        ("radam,radam", "listed twice"),
    ],
)
def test_bad_specifications(text: str, expected: str) -> None:
    with pytest.raises(spec.SpecError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        spec.parse_specs(text)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("varjax.radam", {"beta1": 0.9}, "no hyper-parameter 'beta1' (close: b1)"),
        ("optax.adamw", {"decay": 0.1}, "no hyper-parameter 'decay'"),
        ("varjax.radam", {"b1": 1.5}, "b1 must be in [0.0, 1.0), got 1.5"),
        ("varjax.mars_adamw", {"gamma": -1.0}, "gamma"),
        ("varjax.adamw_8bit", {"learning_rate": -1.0}, "learning_rate must be"),
    ],
)
def test_rejected_hyper_parameters_name_the_argument(name, kwargs, expected) -> None:
    with pytest.raises(spec.SpecError) as error:
        spec.build_optimizer(spec.OptimizerSpec(name, kwargs), 3e-3)
    assert expected in str(error.value)
    assert str(error.value).startswith(name)


# --- end to end ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "optimizers", "labels"),
    [
        (
            "charlm",
            "optax.adamw,varjax.adamw_8bit:weight_decay=0.1",
            ["optax.adamw", "varjax.adamw_8bit:weight_decay=0.1"],
        ),
        (
            "regression",
            "radam,mars_adamw:learning_rate=3e-3,gamma=0.05",
            ["optax.adamw", "varjax.radam", "varjax.mars_adamw:learning_rate=0.003,gamma=0.05"],
        ),
    ],
)
def test_compare_end_to_end(tmp_path: pathlib.Path, task: str, optimizers: str, labels) -> None:
    out = tmp_path / "out"
    result = compare(
        *("--task", task, "--tiny", "--steps", "30", "--eval-every", "10", "--seeds", "0,1"),
        *("--optimizers", optimizers, "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("\n\n")[1].splitlines()
    assert table[0].split()[:6] == ["optimizer", "lr", "train", "loss,", "last", "10"]
    assert [line.split()[0] for line in table[1:]] == labels
    assert "(baseline)" in table[1] and "±" in table[1]
    assert "sensitivity.png" not in result.stdout  # only with --tune
    for name in ("results.json", "results.csv", "results.md", "curves.png"):
        assert (out / name).stat().st_size > 0
        assert str(out / name) in result.stdout
    assert "100%" in result.stderr  # the progress bar's last line

    record = json.loads((out / "results.json").read_text())
    assert record["settings"]["seeds"] == [0, 1]
    assert record["machine"]["platform"] and record["machine"]["jax"]
    assert list(record["results"]) == labels
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(labels) and csv_lines[0].startswith("optimizer,")
    bytes_per_param = {
        label: run["state_bytes_per_param"] for label, run in record["results"].items()
    }
    assert bytes_per_param["optax.adamw"] == pytest.approx(8.0, abs=0.05)  # mu and nu in float32
    if task == "charlm":  # the embedding and head (4096 entries each) are kept in 8 bits
        assert bytes_per_param["varjax.adamw_8bit:weight_decay=0.1"] < 7
    for label, run in record["results"].items():
        assert run["ms_per_step"] > 0
        assert [curve["seed"] for curve in run["curves"]] == [0, 1]
        for curve in run["curves"]:
            assert curve["steps"] == [0, 10, 20, 30]
            assert len(curve["train"]) == len(curve["valid"]) == 4
            assert all(math.isfinite(x) for x in curve["train"] + curve["valid"]), label
            assert curve["valid"][-1] < curve["valid"][0], label
            assert curve["train"][-1] < curve["train"][0], label

    # same initialisation and batches for every optimizer: same loss before the first update
    for seed in (0, 1):
        starts = {(run["curves"][seed]["train"][0], run["curves"][seed]["valid"][0])
                  for run in record["results"].values()}  # fmt: skip
        assert len(starts) == 1
    # ... but different seeds differ
    first = next(iter(record["results"].values()))["curves"]
    assert first[0]["train"] != first[1]["train"]


def test_same_seed_same_curves() -> None:
    task = build_task("regression", tiny=True)
    settings = dict(steps=20, batch_size=16, eval_every=10, seeds=[3])
    once = train(task, varjax.radam(1e-2), **settings).curves[0]
    again = train(task, varjax.radam(1e-2), **settings).curves[0]
    assert (once.train, once.valid) == (again.train, again.valid)
    assert once.valid[-1] < once.valid[0]


# --- errors before training ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--optimizers", "adamw8bit"], "close matches: varjax.adamw_8bit"),
        (["--optimizers", "radam:b1=1.5"], "varjax.radam:b1=1.5: b1 must be in"),
        (["--optimizers", "radam:beta1=0.9"], "no hyper-parameter 'beta1'"),
        (["--optimizers", "mars_adamw:exact=True"], "previous_grads"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--batch-size", "-2"], "--batch-size must be at least 1"),
        (["--seeds", "0,x"], "--seeds"),
        (["--steps", "ten"], "invalid int value"),
    ],
)
def test_errors_exit_2_with_one_line(tmp_path, capsys, args: list[str], expected: str) -> None:
    out = tmp_path / "out"
    status = cli.main(["compare", "--task", "regression", "--tiny", "--out", str(out), *args])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.count("\n") == 1 and expected in captured.err
    assert captured.err.startswith("python -m varjax compare: error: ")
    assert captured.out == ""
    assert not (out / "results.json").exists()


def test_unknown_command_exits_2(capsys) -> None:
    assert cli.main(["comapre"]) == 2
    assert "unknown command 'comapre'" in capsys.readouterr().err


def test_unwritable_output_folder_exits_2(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = compare("--out", str(blocker / "out"), timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"--out {blocker / 'out'}: cannot write there" in result.stderr
    assert result.stdout == ""


def test_help_lists_the_options() -> None:
    help_text = cli.build_parser().format_help()
    for option in ("--optimizers", "--steps", "--batch-size", "--seeds", "--task", "--out"):
        assert option in help_text
    assert "--platform" in help_text and "--eval-every" in help_text
    assert "default learning rates" in help_text


def test_help_says_why_storm_is_refused() -> None:
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "are refused as such: scale_by_* building blocks, varjax.storm" in help_text
    for name in ("storm", "gradient_noise_scale", "scale_by_adam"):
        with pytest.raises(spec.SpecError, match="is not a ready optimizer"):
            spec.parse_specs(name)


# --- evaluation schedule, table and plot ----------------------------------------------------


@pytest.mark.parametrize(("steps", "every"), [(600, 30), (100, 5), (30, 2), (7, 1)])
def test_default_evaluation_every_twentieth_of_the_run(steps: int, every: int) -> None:
    args = cli.parse_args(["--task", "regression", "--steps", str(steps)])
    assert args.eval_every == every
    assert cli.parse_args(["--steps", "100", "--eval-every", "50"]).eval_every == 50


def test_steps_to_baseline_resolves_within_a_short_run() -> None:
    """At --steps 100 the default schedule evaluates every 5 steps from step 0, so a rate
    10 times AdamW's reaches AdamW's final loss before the last step."""
    task = build_task("regression", tiny=True)
    every = cli.parse_args(["--steps", "100"]).eval_every
    settings = dict(steps=100, batch_size=16, eval_every=every, seeds=[0])
    runs = {"slow": train(task, optax.adamw(1e-3), **settings)}
    runs["fast"] = train(task, optax.adamw(1e-2), **settings)
    assert runs["slow"].curves[0].steps == list(range(0, 101, 5))
    rows = report.summarize(runs, "slow")
    assert rows[0].steps_to_baseline == 100
    assert rows[1].steps_to_baseline is not None and rows[1].steps_to_baseline < 50
    assert rows[1].train_window == 5
    assert "train loss, last 5 steps" in report.format_table(rows)


def _run(steps: list[int], train_losses: list[float], valid: list[float]) -> OptimizerRun:
    return OptimizerRun([Curve(0, steps, train_losses, valid)], 1.0, 0.0, 8, 1)


def test_curves_plot_shows_step_0() -> None:
    import matplotlib.pyplot as plt

    runs = {
        "a": _run([0, 10, 20], [4.8, 3.0, 2.5], [4.85, 3.1, 2.6]),
        "diverged": _run([0, 10, 20], [4.8, 9.0, math.nan], [4.85, 40.0, math.nan]),
    }
    fig, ax = plt.subplots()
    report._limits(ax, runs)
    low, high = ax.get_ylim()
    plt.close(fig)
    assert low < 2.5 and 4.85 < high < 5.0  # step 0 drawn; the divergence above it clipped


# --- learning-rate tuning -------------------------------------------------------------------


def test_rate_grid_is_log_spaced_around_the_default() -> None:
    grid = tune.rate_grid(3e-3, points=5, span=10.0)
    assert grid[0] == pytest.approx(3e-4) and grid[2] == 3e-3 and grid[-1] == pytest.approx(3e-2)
    ratios = np.diff(np.log(grid))
    np.testing.assert_allclose(ratios, np.log(10) / 2, rtol=1e-3)  # 3 significant digits
    assert tune.rate_grid(1e-3, points=4, span=4.0) == [0.00025, 0.00063, 0.00159, 0.004]
    with pytest.raises(ValueError):
        tune.rate_grid(1e-3, points=0, span=10.0)


def test_help_shows_the_default_grid() -> None:
    help_text = " ".join(cli.build_parser().format_help().split())
    factors = [r / 1.0 for r in tune.rate_grid(1.0, points=cli.TUNE_POINTS, span=cli.TUNE_SPAN)]
    shown = ", ".join(f"x{f:.2g}" for f in factors)
    assert f"evenly spaced in log: {shown} by default" in help_text
    for option in ("--tune", "--tune-points", "--tune-span", "--tune-steps", "--preset"):
        assert option in help_text
    assert "points x tune-steps x seeds steps per optimizer" in help_text


def test_best_point_skips_diverged_rates() -> None:
    def point(rate: float, valid: float) -> tune.GridPoint:
        return tune.GridPoint(rate, valid, [valid], valid)

    points = [point(1e-3, 2.5), point(1e-2, math.nan), point(3e-3, 2.2), point(3e-2, math.inf)]
    assert tune.best_point(points).learning_rate == 3e-3
    assert tune.best_point([point(1e-2, 2.0), point(1e-3, 2.0)]).learning_rate == 1e-3  # tie
    assert tune.best_point([point(1e-2, math.nan), point(1e-3, math.nan)]).learning_rate == 1e-3
    tuning = tune.Tuning(1e-3, points, 3e-2, 10, 5.0)
    assert tuning.at_edge and not tune.Tuning(1e-3, points, 3e-3, 10, 5.0).at_edge


def test_one_program_for_every_rate_matches_a_program_per_rate() -> None:
    task = build_task("regression", tiny=True)
    settings = dict(steps=30, batch_size=16, eval_every=10, seeds=[0, 1])
    shared = RateTrainer(task, varjax.mars_adamw, **settings)
    # a factory that needs a concrete rate: float() of a traced one fails
    concrete = RateTrainer(task, lambda rate: optax.adam(float(rate)), **settings)
    for rate in (1e-3, 1e-2):
        once = train(task, varjax.mars_adamw(rate), **settings)
        # the same operations; only how XLA fuses a constant rate or an argument may
        # differ, by a few float32 ulps per step, amplified over 30 steps
        for a, b in zip(shared(rate).curves, once.curves, strict=True):
            np.testing.assert_allclose(a.train + a.valid, b.train + b.valid, rtol=1e-5)
        by_rate = concrete(rate)
        again = train(task, optax.adam(rate), **settings)
        assert [c.valid for c in by_rate.curves] == [c.valid for c in again.curves]
    assert shared.shared is True and concrete.shared is False


@pytest.mark.parametrize("tune_steps", [20, 10])
def test_tune_end_to_end(tmp_path: pathlib.Path, tune_steps: int) -> None:
    out = tmp_path / "out"
    result = compare(
        *("--task", "regression", "--tiny", "--steps", "20", "--seeds", "0,1", "--tune"),
        *("--tune-points", "3", "--tune-span", "30", "--tune-steps", str(tune_steps)),
        *("--optimizers", "radam,optax.contrib.prodigy", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    assert (out / "sensitivity.png").stat().st_size > 0
    assert "not tuned (no numeric learning_rate): optax.contrib.prodigy" in result.stdout
    record = json.loads((out / "results.json").read_text())
    assert record["settings"]["tune_steps"] == tune_steps
    assert record["tuning"]["optax.contrib.prodigy"] is None
    table = {row["optimizer"]: row for row in record["table"]}
    for label in ("optax.adamw", "varjax.radam"):
        tuning = record["tuning"][label]
        assert tuning["default_rate"] == 3e-3 and tuning["steps"] == tune_steps
        rates = [p["learning_rate"] for p in tuning["points"]]
        assert rates == tune.rate_grid(3e-3, points=3, span=30.0)
        means = [float(np.mean(p["valid_per_seed"])) for p in tuning["points"]]
        assert (
            len(set(means)) == 3
        )  # the rates give different losses, so the argmin means something
        assert tuning["best_rate"] == rates[int(np.argmin(means))]
        row = table[label]
        assert row["tuned"] and row["learning_rate"] == tuning["best_rate"]
        final = record["results"][label]["curves"]
        assert [c["steps"][-1] for c in final] == [20, 20]
        assert final[0]["steps"][0] == 0
        if tune_steps == 20:  # the table's run is the best grid run
            assert row["valid_mean"] == pytest.approx(min(means), rel=1e-6)
        assert f"{tuning['best_rate']:.3g}" in result.stdout.split("\n\n")[1]
    assert not table["optax.contrib.prodigy"]["tuned"]
    markdown = (out / "results.md").read_text()
    assert "x0.033" in markdown and "x30" in markdown and "*" in markdown


# --- presets ----------------------------------------------------------------------------------


def test_gpu_preset_sizes_and_defaults() -> None:
    args = cli.parse_args(["--preset", "gpu", "--steps", "2"])
    assert (args.task, args.size, args.steps, args.eval_every) == ("charlm", "gpu", 2, 1)
    assert args.batch_size == PRESETS["gpu"].defaults.batch_size
    assert 20e6 <= CHARLM_SIZES["gpu"].n_params() <= 50e6
    # the count of the sizes matches the model that is built
    assert build_task("charlm", tiny=True).n_params == CHARLM_SIZES["tiny"].n_params()
    assert build_task("charlm").n_params == CHARLM_SIZES["default"].n_params()
    assert f"{CHARLM_SIZES['gpu'].n_params() / 1e6:.1f}M" in PRESETS["gpu"].description


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--preset", "gpu", "--task", "regression"], "is a charlm task, not regression"),
        (["--preset", "gpu", "--tiny"], "exclude each other"),
        (["--preset", "cpu"], "invalid choice"),
        (["--tune", "--tune-span", "0.5"], "--tune-span must be at least 1"),
        (["--tune", "--tune-points", "0"], "--tune-points must be at least 1"),
    ],
)
def test_preset_and_tune_errors(capsys, args: list[str], expected: str) -> None:
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


# --- dependencies ---------------------------------------------------------------------------

BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_the_library_imports_without_the_comparison_dependencies() -> None:
    """With Flax, Orbax, TensorStore and Matplotlib unimportable, varjax (and its
    specification parser) imports and an optimizer runs."""
    code = BLOCK.format(names=["flax", "orbax", "tensorstore", "matplotlib"]) + (
        "import jax.numpy as jnp, optax, varjax, varjax.compare\n"
        "from varjax.quantization import quantize_state\n"
        "params = {'w': jnp.ones(3)}\n"
        "tx = varjax.mars_adamw(1e-2)\n"
        "updates, _ = tx.update(params, tx.init(params), params)\n"
        "print(float(optax.global_norm(updates)) > 0, varjax.compare.missing_dependencies())\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "['flax',", "'matplotlib']"]


@pytest.mark.parametrize(
    ("blocked", "named"),
    [(["flax", "matplotlib"], "flax and matplotlib"), (["matplotlib"], "matplotlib")],
)
def test_main_without_the_compare_extra_says_what_to_install(blocked, named) -> None:
    code = BLOCK.format(names=blocked) + (
        "import runpy\nrunpy.run_module('varjax', run_name='__main__', alter_sys=True)\n"
    )
    result = _python(code)
    assert result.returncode == 1
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert f"needs {named} (varjax itself does not)" in result.stderr
    assert "pip install 'varjax[compare]'" in result.stderr
    assert "pip install -e '.[compare]'" in result.stderr


def test_dependency_lists() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split(">")[0].split("=")[0].split("<")[0].split("[")[0] for r in requirements}

    assert names(project["dependencies"]) == {"jax", "jaxlib", "optax", "chex", "numpy"}
    extras = project["optional-dependencies"]
    assert names(extras["compare"]) == {"flax", "matplotlib"}
    assert "varjax[compare]" in extras["test"] and "torch==2.13.0" in extras["test"]
    assert {"orbax-checkpoint", "pytest", "ruff"} <= names(extras["test"])
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e '.[compare]' && python -m varjax\n" in readme
    assert "pip install -e '.[test]'" in readme
    # the notebooks install from the clone with the same extra; no placeholder address
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        text = path.read_text()
        assert '%pip install -q -e \\"{CLONE}[compare]\\"' in text, path.name
        assert "github.com" not in text and "OWNER" not in text, path.name
