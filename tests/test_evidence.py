"""egeunet evidence: what a long study leaves in the committed folder, and what it keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egeunet.cli import main
from egeunet.evidence import copy_evidence


def _run(root: Path, name: str, finished: bool, config: dict | None = None) -> Path:
    run = root / "runs" / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": config or {}}))
    (run / "history.csv").write_text("epoch,train_loss\n1,0.5\n")
    (run / "checkpoints" / "last.pt").write_bytes(b"last")
    (run / "checkpoints" / "best.pt").write_bytes(b"best")
    (run / "predictions").mkdir()
    (run / "predictions" / "0.png").write_bytes(b"png")
    (run / "cases.npz").write_bytes(b"pixels")
    (root / "runs" / f"{name}.ipynb").write_text("{}")
    if finished:
        _finish(run)
    return run


def _finish(run: Path) -> None:
    (run / "metrics.json").write_text('{"pooled": {"dsc": 0.8}}')
    (run / "per_image.csv").write_text("id,dsc\na,0.8\n")
    (run / "outcome.json").write_text(json.dumps({"status": "finished", "parameters": {}}))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_finished_runs_keep_evidence_only_and_unfinished_ones_their_resume_state(tmp_path):
    source, dest = tmp_path / "study", tmp_path / "repo" / "reports" / "isic"
    _run(source, "a-finished", finished=True)
    unfinished = _run(source, "b-running", finished=False)
    (source / "runs" / "02_complexity").mkdir()
    (source / "runs" / "02_complexity" / "complexity.csv").write_text("variant\negeunet\n")
    (source / "runs" / "01_data-isic2017" / "example_images").mkdir(parents=True)
    (source / "runs" / "01_data-isic2017" / "summary.json").write_text("{}")
    (source / "runs" / "01_data-isic2017" / "example_images" / "a.png").write_bytes(b"x")

    changes = copy_evidence(source, dest)
    assert _files(dest) == {
        "runs/02_complexity/complexity.csv",
        "runs/01_data-isic2017/summary.json",
        "runs/a-finished/config.json",
        "runs/a-finished/history.csv",
        "runs/a-finished/metrics.json",
        "runs/a-finished/per_image.csv",
        "runs/a-finished/outcome.json",
        "runs/b-running/config.json",
        "runs/b-running/history.csv",
        "runs/b-running/checkpoints/last.pt",
        "runs/b-running/checkpoints/best.pt",
    }
    assert (changes.finished, changes.unfinished) == (["a-finished"], ["b-running"])
    assert copy_evidence(source, dest).copied == []  # nothing new: nothing rewritten

    (unfinished / "history.csv").write_text("epoch,train_loss\n1,0.5\n2,0.4\n")
    (unfinished / "checkpoints" / "last.pt").write_bytes(b"last, epoch 2")
    assert sorted(copy_evidence(source, dest).copied) == [
        "b-running/checkpoints/last.pt",
        "b-running/history.csv",
    ]
    assert (dest / "runs/b-running/checkpoints/last.pt").read_bytes() == b"last, epoch 2"

    _finish(unfinished)  # the run finished: its checkpoints leave the evidence folder
    changes = copy_evidence(source, dest)
    assert sorted(changes.removed) == [
        "b-running/checkpoints/best.pt",
        "b-running/checkpoints/last.pt",
    ]
    assert not (dest / "runs/b-running/checkpoints/last.pt").exists()
    assert (dest / "runs/b-running/metrics.json").is_file()


def test_finished_clean_runs_of_the_full_model_keep_best_pt_for_shipping(tmp_path):
    """ship-weights chooses among the clean EGE-UNet runs, which finish in different
    sessions: their best.pt stays in the evidence; last.pt and other runs' checkpoints go."""
    source, dest = tmp_path / "study", tmp_path / "evidence"
    clean = {"protocol": "clean", "model": {}}
    _run(source, "isic2018-clean-egeunet-seed42", finished=False, config=clean)
    _run(source, "isic2018-clean-unet-seed42", finished=False,
         config={"protocol": "clean", "model": {"ghpa": False, "gab": False,
                                                "deep_supervision": False}})  # fmt: skip
    _run(source, "isic2018-paper-egeunet-seed42", finished=False, config={"protocol": "paper"})
    copy_evidence(source, dest)
    for name in ("isic2018-clean-egeunet-seed42", "isic2018-clean-unet-seed42",
                 "isic2018-paper-egeunet-seed42"):  # fmt: skip
        _finish(source / "runs" / name)
    changes = copy_evidence(source, dest)
    kept = {p for p in _files(dest) if p.endswith(".pt")}
    assert kept == {"runs/isic2018-clean-egeunet-seed42/checkpoints/best.pt"}
    assert "isic2018-clean-egeunet-seed42/checkpoints/last.pt" in changes.removed
    assert copy_evidence(source, dest).copied == []  # kept, not copied again


def test_bad_folders_are_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no runs folder"):
        copy_evidence(tmp_path, tmp_path / "dest")
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match="same folder"):
        copy_evidence(tmp_path, tmp_path)
    assert main(["evidence", str(tmp_path / "nowhere"), str(tmp_path / "d")]) == 2
    assert "no runs folder" in capsys.readouterr().err


def test_cli_prints_what_it_kept(tmp_path, capsys):
    _run(tmp_path / "study", "b-running", finished=False)
    assert main(["evidence", str(tmp_path / "study"), str(tmp_path / "dest")]) == 0
    out = capsys.readouterr().out
    assert "0 finished run(s), 1 unfinished" in out and "unfinished: b-running" in out


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("reports/isic/runs/isic2017-paper-egeunet-seed42/history.csv", False),
        ("reports/isic/runs/isic2017-paper-egeunet-seed42/checkpoints/last.pt", False),
        ("reports/isic/runs/02_complexity/complexity.csv", False),
        ("reports/isic/REPORT.md", False),
        ("reports/isic/runs/isic2017-paper-egeunet-seed42.ipynb", True),
        ("reports/isic/runs/isic2017-paper-egeunet-seed42/cases.npz", True),
        ("reports/isic/runs/isic2017-paper-egeunet-seed42/predictions/0.png", True),
        ("reports/isic/runs/01_data-isic2017/examples.png", True),
        ("reports/isic/runs/01_data-isic2017/example_images/ISIC_0000000.png", True),
        ("reports/isic/runs/01_data-isic2017/summary.json", False),
        ("reports/quick/REPORT.md", True),
        ("runs/my-run/checkpoints/last.pt", True),
    ],
)
def test_gitignore_keeps_the_evidence_and_nothing_else(path, ignored):
    import shutil
    import subprocess

    from conftest import REPO_ROOT

    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", path], cwd=REPO_ROOT, check=False
    )
    assert result.returncode == (0 if ignored else 1)
