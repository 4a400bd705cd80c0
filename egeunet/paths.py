"""Paths given to notebooks and commands, resolved the same from anywhere in the project.

JupyterLab starts a notebook's kernel in ``notebooks/``, a terminal usually sits at the
project root, and the study runner executes notebooks inside their run folders. A relative
path such as ``reports/quick`` or ``data/isic2017`` means the same thing in all three:

- an existing input (:func:`resolve_existing`) is looked up from the working directory
  first, then from the project root; the error names every place it looked;
- an output (:func:`resolve_output`) is placed under the project root when the working
  directory lies inside the project, else under the working directory.

The project root is the nearest folder at or above the working directory that holds this
project's ``pyproject.toml``; outside a checkout (an installed package used elsewhere)
there is none, and paths are plain working-directory paths.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_NAME_LINE = 'name = "egeunet"'


def is_project_root(folder: Path) -> bool:
    """True when ``folder`` holds this project's ``pyproject.toml``."""
    marker = folder / "pyproject.toml"
    try:
        return marker.is_file() and PROJECT_NAME_LINE in marker.read_text(encoding="utf-8")
    except OSError:
        return False


def project_root(start: str | os.PathLike | None = None) -> Path | None:
    """The project checkout holding ``start`` (default: the working directory), or None."""
    folder = Path(start if start is not None else Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        if is_project_root(candidate):
            return candidate
    return None


def resolve_existing(value: str | os.PathLike, what: str) -> Path:
    """The existing file or folder that ``value`` names, for the parameter ``what``.

    Absolute paths are taken as they are. A relative path is tried from the working
    directory, then from the project root. FileNotFoundError names every place tried.
    """
    path = Path(value).expanduser()
    if path.is_absolute():
        if path.exists():
            return path
        raise FileNotFoundError(f"{what}: {path} does not exist")
    tried = [Path.cwd() / path]
    root = project_root()
    if root is not None and root.resolve() != Path.cwd().resolve():
        tried.append(root / path)
    for candidate in tried:
        if candidate.exists():
            return candidate
    places = " nor ".join(str(candidate) for candidate in tried)
    raise FileNotFoundError(f"{what}: {value} does not exist (looked for {places})")


def resolve_output(value: str | os.PathLike) -> Path:
    """Where an output named ``value`` goes: absolute paths as they are; relative ones under
    the project root when the working directory is inside the project, else under the
    working directory."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    root = project_root()
    return (root if root is not None else Path.cwd()) / path
