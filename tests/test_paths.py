"""Relative paths given to notebooks mean the same from notebooks/, the root and elsewhere."""

from pathlib import Path

import pytest

from egeunet.paths import project_root, resolve_existing, resolve_output


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "notebooks").mkdir(parents=True)
    (root / "reports" / "quick").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "egeunet"\n', encoding="utf-8")
    return root


def test_project_root_is_found_from_a_subfolder(project: Path) -> None:
    assert project_root(project / "notebooks") == project.resolve()
    assert project_root(project) == project.resolve()


def test_another_projects_pyproject_is_not_a_root(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n', encoding="utf-8")
    assert project_root(tmp_path) is None


@pytest.mark.parametrize("where", ["", "notebooks"])
def test_existing_path_resolves_the_same_from_root_and_notebooks(
    project: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project / where)
    found = resolve_existing("reports/quick", "study_dir")
    assert found.resolve() == (project / "reports" / "quick").resolve()


def test_working_directory_wins_over_the_root(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "notebooks" / "reports" / "quick").mkdir(parents=True)
    monkeypatch.chdir(project / "notebooks")
    found = resolve_existing("reports/quick", "study_dir")
    assert found.resolve() == (project / "notebooks" / "reports" / "quick").resolve()


def test_missing_path_names_the_parameter_and_every_place_tried(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project / "notebooks")
    with pytest.raises(FileNotFoundError) as error:
        resolve_existing("reports/nothing", "study_dir")
    message = str(error.value)
    assert message.startswith("study_dir: reports/nothing does not exist")
    assert str(project / "notebooks" / "reports" / "nothing") in message
    assert str(project.resolve() / "reports" / "nothing") in message


def test_missing_absolute_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"input_path: .*absent does not exist"):
        resolve_existing(tmp_path / "absent", "input_path")


def test_outputs_go_under_the_root_inside_the_project(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project / "notebooks")
    assert resolve_output("runs/notebook") == project.resolve() / "runs" / "notebook"


def test_outputs_outside_a_project_go_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_output("segmented") == tmp_path / "segmented"
    assert resolve_output(tmp_path / "x") == tmp_path / "x"
