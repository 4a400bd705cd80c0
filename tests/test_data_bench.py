"""``make bench`` entry for the data benchmarks: runs benchmarks/bench_data.py and shows
its figures (preparation time, synthetic generation time, loader wait share)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data.py"


@pytest.mark.bench
def test_data_benchmarks_print_their_figures(shared_data):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(shared_data)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    print(result.stdout, result.stderr, sep="\n")
    assert result.returncode == 0
    for line in (
        "prepare isic2017 (2150 pairs",
        "generate + cache synthetic",
        "loader wait share, 2 workers",
    ):
        assert line in result.stdout
