"""The README's copy of a study's findings, written between two markers, never by hand.

A README holds, for a study folder such as ``reports/isic``::

    <!-- findings: reports/isic (egeunet report --readme; do not edit) -->
    ...
    <!-- end findings: reports/isic -->

``egeunet report reports/isic --readme README.md`` replaces what lies between them with the
study's ``findings.md`` (its bullets, with links made relative to the README), and
``egeunet report reports/isic --check --readme README.md`` reports a README whose copy is
out of date.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from egeunet.fileio import write_text_atomic

FINDINGS_FILE = "findings.md"


def markers(study_key: str) -> tuple[str, str]:
    """The begin and end markers of ``study_key`` (the study folder as the README names it)."""
    return (
        f"<!-- findings: {study_key} (egeunet report --readme; do not edit) -->",
        f"<!-- end findings: {study_key} -->",
    )


def _study_key(study_dir: Path, readme: Path) -> str:
    return Path(os.path.relpath(study_dir.resolve(), readme.resolve().parent)).as_posix()


def _relink(text: str, prefix: str) -> str:
    """Markdown links to relative targets, re-rooted at ``prefix`` (the study folder as seen
    from the README); absolute URLs and anchors stay as they are."""

    def relink(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
            return match.group(0)
        return f"{match.group(1)}({prefix}/{target})"

    return re.sub(r"(\[[^\]]*\])\(([^)\s]+)\)", relink, text)


def readme_block(study_dir: str | Path, readme: str | Path) -> str:
    """What belongs between the markers: the study's findings without their title line."""
    study_dir, readme = Path(study_dir), Path(readme)
    source = study_dir / FINDINGS_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; build the report first")
    lines = source.read_text(encoding="utf-8").strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    body = "\n".join(lines).strip()
    return _relink(body, _study_key(study_dir, readme))


def _split(readme: Path, study_key: str) -> tuple[str, str, str]:
    """The README as (text up to and including the begin marker, the block, the rest)."""
    text = readme.read_text(encoding="utf-8")
    begin, end = markers(study_key)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(
            f"{readme}: no findings block for {study_key}; add the two lines\n{begin}\n{end}\n"
            "where the findings should appear"
        )
    head_end = start + len(begin)
    return text[:head_end], text[head_end:stop], text[stop:]


def update_readme(study_dir: str | Path, readme: str | Path) -> bool:
    """Write the study's findings into the README's block; True when the README changed."""
    readme = Path(readme)
    study_key = _study_key(Path(study_dir), readme)
    head, block, tail = _split(readme, study_key)
    wanted = "\n" + readme_block(study_dir, readme) + "\n"
    if block == wanted:
        return False
    write_text_atomic(readme, head + wanted + tail)
    return True


def readme_problems(study_dir: str | Path, readme: str | Path) -> list[str]:
    """Why the README's findings block is not the study's findings (empty when it is)."""
    readme = Path(readme)
    study_key = _study_key(Path(study_dir), readme)
    try:
        _, block, _ = _split(readme, study_key)
    except ValueError as error:
        return [str(error)]
    if block.strip() != readme_block(study_dir, readme).strip():
        return [
            f"{readme}: the findings of {study_key} are out of date; run "
            f"egeunet report {study_key} --readme {readme.name}"
        ]
    return []
