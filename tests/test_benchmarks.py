"""The benchmark scripts run end to end (tiny settings; the figures themselves are not
checked: speed is measured by `make bench`, never by tests)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_bench_train_prints_every_single_run_figure():
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_train.py"), "--synthetic"]
    command += ["--batches", "1", "--repeats", "1", "--image-size", "32", "--batch-size", "2"]
    command += ["--skip-aggregate", "--skip-contention", "--threads", "2"]
    environment = {**os.environ, "EGEUNET_FUSED_KERNELS": "0"}  # no compilation in tests
    environment.pop("EGEUNET_PROCESSES", None)  # the default: a helper process with 2 threads
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, env=environment, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for figure in (
        "baseline (published formulas",
        "training, whole pipeline (default: 2 processes x 1 thread) on synthetic",
        "training, whole pipeline (one process: 1 process x 2 threads) on synthetic",
        "training, forward+backward+step alone",
        "evaluation pass after an epoch (default;",
        "evaluation pass after an epoch (one process;",
        "inference latency, batch 1:",
        "inference latency, batch 8:",
    ):
        assert figure in result.stdout, figure
