"""Test helper: the ``egeunet`` Jupyter kernel the notebooks run on."""

from __future__ import annotations

import subprocess
import sys

from egeunet import study


def ensure_kernel() -> None:
    """Register the ``egeunet`` Jupyter kernel for this Python if it is missing (the
    Makefile registers it for users; a bare ``pytest`` run may come first)."""
    try:
        study.check_kernel()
    except ValueError:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ipykernel",
                "install",
                "--user",
                "--name",
                study.KERNEL_NAME,
                "--display-name",
                study.KERNEL_NAME,
            ],
            check=True,
            capture_output=True,
        )
