"""Run a script on several host (CPU) devices, in a fresh process: JAX fixes its
device count when it starts, and the test process has already started it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence


def run_on_host_devices(
    script: str, tmp_path: pathlib.Path, devices: int = 8, args: Sequence[str] = ()
) -> str:
    """Run ``script args`` with ``devices`` CPU devices; assert it succeeds, return its stdout."""
    path = tmp_path / "on_host_devices.py"
    path.write_text(script)
    env = os.environ | {
        # keep the caller's XLA_FLAGS (e.g. --xla_cpu_max_isa=AVX2 to test another CPU)
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
        f"--xla_force_host_platform_device_count={devices}".strip(),
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
