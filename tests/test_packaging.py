"""Packaging: environment.yml and pyproject.toml list the same dependencies; CLI wiring."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def normalise(requirement: str) -> str:
    return requirement.replace(" ", "").lower()


def test_environment_matches_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = {
        normalise(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]
    }
    environment = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    listed = {normalise(r) for r in pip_section if not r.startswith("-e")}
    assert listed == wanted, (
        f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"
    )


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make test" in readme and "make study" in readme


def test_console_script_lists_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "egeunet.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "complexity" in result.stdout


def test_unknown_subcommand_fails_clearly():
    result = subprocess.run(
        [sys.executable, "-m", "egeunet.cli", "complexitee"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "complexitee" in result.stderr
