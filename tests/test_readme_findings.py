"""The README's findings block is the study's findings.md, re-linked, never hand-edited."""

from __future__ import annotations

from pathlib import Path

import pytest

from egeunet.cli import main
from egeunet.readme_findings import markers, readme_problems, update_readme

REPO = Path(__file__).resolve().parents[1]

FINDINGS = """# Findings: demo

- Headline: DSC 88.1 ± 0.3 over 3 seeds ([table](tables/main.csv), [paper](https://x.org/a)).

Tables, figures and every number's source: [the full report](REPORT.md).
"""


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    study = tmp_path / "reports" / "demo"
    study.mkdir(parents=True)
    (study / "findings.md").write_text(FINDINGS, encoding="utf-8")
    begin, end = markers("reports/demo")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nIntro.\n\n{begin}\nold text\n{end}\n\n## Next\n")
    return study, readme


def test_block_is_written_between_the_markers_with_links_from_the_readme(project) -> None:
    study, readme = project
    assert update_readme(study, readme) is True
    text = readme.read_text()
    assert "old text" not in text and "# Findings: demo" not in text
    assert "([table](reports/demo/tables/main.csv), [paper](https://x.org/a))" in text
    assert "[the full report](reports/demo/REPORT.md)" in text
    assert text.startswith("# Title\n\nIntro.\n\n<!-- findings: reports/demo")
    assert text.endswith("<!-- end findings: reports/demo -->\n\n## Next\n")
    assert readme_problems(study, readme) == []
    assert update_readme(study, readme) is False  # a second run changes nothing


def test_out_of_date_block_is_reported(project) -> None:
    study, readme = project
    update_readme(study, readme)
    (study / "findings.md").write_text(FINDINGS.replace("88.1", "87.9"), encoding="utf-8")
    problems = readme_problems(study, readme)
    assert len(problems) == 1 and "out of date" in problems[0]


def test_missing_markers_say_what_to_add(project) -> None:
    study, readme = project
    readme.write_text("# Title\n")
    with pytest.raises(ValueError, match="no findings block for reports/demo; add the two"):
        update_readme(study, readme)
    assert "no findings block" in readme_problems(study, readme)[0]


def test_report_check_fails_on_a_stale_readme(project, capsys) -> None:
    study, readme = project
    assert main(["report", str(study), "--check", "--readme", str(readme)]) == 1
    assert "out of date" in capsys.readouterr().err


@pytest.mark.skipif(
    not (REPO / "reports" / "isic" / "findings.md").is_file(), reason="no committed study"
)
def test_committed_readme_carries_the_committed_findings() -> None:
    assert readme_problems(REPO / "reports" / "isic", REPO / "README.md") == []
