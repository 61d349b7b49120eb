"""Quantized optimizers over two JAX processes equal the same steps in one process.

Past one machine, users run one JAX process per host joined by
``jax.distributed``; each process holds only its own devices' shards of the
parameters and of the quantized state. ``tests/multiprocess_worker.py`` trains a
small sharded model six steps with ``varjax.adamw_8bit`` and with
``quantize_state(optax.adafactor(...))``, two of them with a corrupted
gradient on an element that lies on the second process only. It runs twice, at
the same time: as two processes of two CPU devices each, joined on 127.0.0.1
(collectives over Gloo, JAX's default on CPU), and as one process of four host
devices. Both build the same 2 x 2 mesh over the four devices and compile the same
SPMD program, which differs only in how the collectives move data (Gloo between
processes, memory within one). Every all-reduce in the compiled steps (jax
0.10.2, read from ``step.lower(...).compile().as_text()``) runs over one mesh
axis, two devices, and a sum of two float32 values is the same in either
order. So the parameters, the codes and absmax of the quantized state and the
skip counts must agree bit for bit, after every step. A process that decided
alone whether a step overflowed (the second process sees the corrupted element,
the first does not) would step where the other skips, and its shards would differ.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import varjax

WORKER = pathlib.Path(__file__).resolve().parent / "multiprocess_worker.py"
OPTIMIZERS = ("adamw_8bit", "adafactor")
TIMEOUT = 240  # seconds for all workers together; about 30 s on 2 idle cores
NAN_STEP, OVERFLOW_STEP = 2, 4  # the worker's corrupted steps (CORRUPTED there)

# the tests share one worker (and one run of the processes) under pytest-xdist
pytestmark = pytest.mark.xdist_group("multiprocess")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the coordinator binds it a moment later)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(runs: dict[str, tuple[int, list[str]]], tmp: pathlib.Path) -> None:
    """Start every worker of ``runs`` (name -> host devices, arguments) at once; wait
    for all, at most ``TIMEOUT`` seconds together. If one fails or time runs out, kill
    the rest (a process waiting for a dead peer would wait for minutes) and fail with
    the logs."""
    # the workers import the varjax this test imports, whatever PYTHONPATH says
    root = str(pathlib.Path(varjax.__file__).resolve().parents[1])
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    procs, logs, problem = {}, {}, None
    try:
        for name, (devices, args) in runs.items():
            env = os.environ | {
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "PYTHONPATH": path,
            }
            logs[name] = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (closed below)
            command = [sys.executable, str(WORKER), *args]
            procs[name] = subprocess.Popen(
                command, env=env, stdout=logs[name], stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + TIMEOUT
        while problem is None and any(p.poll() is None for p in procs.values()):
            if failed := [name for name, p in procs.items() if p.poll() not in (None, 0)]:
                problem = f"failed: {failed}"
            elif time.monotonic() > deadline:
                problem = f"timed out after {TIMEOUT} s"
            time.sleep(0.1)
        if problem is None and any(p.returncode for p in procs.values()):
            problem = "failed"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs.values():
            log.close()
    if problem is not None:
        tails = [
            f"--- {name} (exit status {p.returncode}):\n{(tmp / f'{name}.log').read_text()[-3000:]}"
            for name, p in procs.items()
        ]
        raise AssertionError("\n".join([problem, *tails]))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``results[optimizer][run]``: the record of run ``one`` (one process, four
    devices), ``p0`` and ``p1`` (the two processes of two devices)."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    (tmp / "one").mkdir()
    (tmp / "two").mkdir()
    port = str(free_port())
    two = ["--processes", "2", "--port", port, "--process-id"]
    runs = {"one": (4, [str(tmp / "one")])}
    runs |= {f"p{i}": (2, [str(tmp / "two"), *two, str(i)]) for i in range(2)}
    run_workers(runs, tmp)
    folders = {"one": (tmp / "one", 0), "p0": (tmp / "two", 0), "p1": (tmp / "two", 1)}
    results = {}
    for name in OPTIMIZERS:
        results[name] = {}
        for run, (folder, i) in folders.items():
            with np.load(folder / f"{name}.process{i}.npz") as record:
                results[name][run] = dict(record)
    return results


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_two_processes_equal_one_bit_for_bit(results, name) -> None:
    one, p0, p1 = (results[name][run] for run in ("one", "p0", "p1"))
    # some state is quantized and, over two processes, spread over both
    assert one["quantized_leaves"] > 0 and p0["quantized_leaves"] == one["quantized_leaves"]
    assert p0["spread_leaves"] > 0 and one["spread_leaves"] == 0
    keys = set(one) - {"spread_leaves"}
    assert set(p0) - {"spread_leaves"} == keys == set(p1) - {"spread_leaves"}
    for key in sorted(keys):
        np.testing.assert_array_equal(p0[key], one[key], err_msg=f"{name} {key}")
        np.testing.assert_array_equal(p1[key], one[key], err_msg=f"{name} {key}")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_corrupted_steps_are_skipped_whole(results, name) -> None:
    record = results[name]["p0"]
    expected_finite = np.arange(len(record["skipped"])) != NAN_STEP
    np.testing.assert_array_equal(record["finite_gradient"], expected_finite)
    skipped = record["skipped"]
    assert skipped[NAN_STEP - 1] == 0 and skipped[NAN_STEP] == 1, skipped
    if name == "adamw_8bit":
        # a finite 1e20 squares past float32 in the quantized second moment of w1:
        # only the absmax check of the new state (across processes) catches it
        np.testing.assert_array_equal(skipped, [0, 0, 1, 1, 2, 2])
    # (which of Adafactor's leaves are quantized decides whether the overflow is seen;
    # the count equals the one-process run's all the same, checked above)
    steps = [NAN_STEP] + [OVERFLOW_STEP] * int(skipped[OVERFLOW_STEP] > skipped[OVERFLOW_STEP - 1])
    for i in steps:
        for key in record:
            if key.startswith(f"step{i}/") and not key.endswith(".skipped"):
                before = record[key.replace(f"step{i}/", f"step{i - 1}/")]
                np.testing.assert_array_equal(record[key], before, err_msg=f"{name} {key}")
    # a clean step moves every parameter
    for key in ("['w1']", "['b1']", "['w2']", "['b2']"):
        assert np.any(record[f"step1/params{key}"] != record[f"step0/params{key}"]), key
