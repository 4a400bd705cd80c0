"""The report built from a fixture set of run folders holds the expected tables, findings
and figures, and a committed report can be checked against a rebuild."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from report_fixtures import (
    EPOCHS,
    FULL_DSC,
    LADDER,
    MANIFEST_HASH,
    write_history,
    write_run,
    write_study,
    write_study_file,
)

from egeunet import cli, figures
from egeunet import report as rep
from egeunet import report_tables as tables

REPO = Path(__file__).resolve().parents[1]
# Pooled DSC of the clean runs: the paper runs' minus 0.4, 0.6 and 0.2 points.
CLEAN_DSC = {1: 0.876, 2: 0.884, 3: 0.898}
# The paper runs' last epoch scores 1, 2 and 3 points below the selected checkpoint.
LAST_EPOCH_DROP = {1: 0.01, 2: 0.02, 3: 0.03}
LONG_DSC = 0.895  # the one longer run (seed 1, twice the epochs)


def write_full_study(study_dir: Path) -> Path:
    """:func:`write_study` plus clean runs of the full model and one longer run."""
    write_study(study_dir)
    runs_dir = study_dir / "runs"
    for seed, dsc in CLEAN_DSC.items():
        write_run(runs_dir, "egeunet", seed, protocol="clean", dsc=dsc)
    for seed, drop in LAST_EPOCH_DROP.items():
        write_history(
            runs_dir / f"isic2017-paper-egeunet-seed{seed}",
            [0.5, FULL_DSC[seed], FULL_DSC[seed] - drop],
        )
    write_run(runs_dir, "egeunet-long", 1, dsc=LONG_DSC, epochs=2 * EPOCHS, model="egeunet")
    return study_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    study_dir = write_full_study(root / "fixture")
    study_file = write_study_file(root / "fixture.yaml")
    return study_dir, rep.build_report(study_dir, study_file=study_file)


def _table(study_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(study_dir / "tables" / f"{name}.csv")


def test_runs_table_reads_every_finished_run(built):
    study_dir, report = built
    runs = _table(study_dir, "runs")
    assert report.runs == 16 and report.failures == 1
    assert sorted(runs["variant"].unique()) == sorted(
        ["unet", "unet+ghpa", "unet+ghpa+gab", "egeunet", "egeunet-long"]
    )
    assert (runs["data_manifest_hash"] == MANIFEST_HASH).all()
    assert "run_dir" not in runs and "data_folder" not in runs  # nothing machine-specific


def test_main_table_sets_ours_beside_the_shown_reference_figures(built):
    study_dir, _ = built
    comparison = _table(study_dir, "comparison")
    ours = comparison[comparison["kind"] == "ours"].set_index("protocol")
    # The longer run is the same model but not one more seed of it.
    assert ours.loc["paper", "runs"] == 3
    assert ours.loc["paper", "dsc_mean"] == pytest.approx(89.0)  # mean of 88, 89, 90
    assert ours.loc["paper", "dsc_std"] == pytest.approx(1.0)
    assert ours.loc["paper", "image_dsc_mean"] == pytest.approx(87.0)  # per image: 2 lower
    expected_iou = sum(100 * d / (2 - d) for d in FULL_DSC.values()) / 3
    assert ours.loc["paper", "iou_mean"] == pytest.approx(expected_iou)
    assert ours.loc["clean", "dsc_mean"] == pytest.approx(100 * sum(CLEAN_DSC.values()) / 3)
    references = comparison[comparison["kind"] != "ours"]
    assert set(references["status"]) == {"verified", "third-party"}
    # ISIC 2017: the paper's mean is unverified, so only its std and the re-runs appear.
    assert references["dsc_mean"].dropna().tolist() == [88.70, 88.07]
    assert references.loc[references["kind"] == "paper", "iou_std"].tolist() == [0.10]
    main = _table(study_dir, "main_results")
    hd95 = main[(main["metric"] == "HD95 mean (px)") & (main["protocol"] == "paper")]
    assert hd95["mean"].item() == pytest.approx(7.0) and set(main["epochs"]) == {EPOCHS}


def test_ablation_paired_t_test_known_answer(built):
    study_dir, _ = built
    ablation = _table(study_dir, "ablation")
    assert list(ablation["variant"]) == ["unet", "unet+ghpa", "unet+ghpa+gab", "egeunet"]
    unet = ablation.set_index("variant").loc["unet"]
    # Differences -2, -3, -1 points: mean -2, sd 1, t = -2 / (1 / sqrt 3) with 2 degrees of
    # freedom, whose two-sided p is 1 - t / sqrt(2 + t^2) by the t(2) CDF in closed form.
    t = -2 / (1 / math.sqrt(3))
    assert unet["difference_mean"] == pytest.approx(-2.0)
    assert unet["difference_std"] == pytest.approx(1.0)
    assert unet["t"] == pytest.approx(t)
    assert unet["p_value"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))
    # A constant difference has no variance: the test is undefined, not "significant".
    assert math.isnan(ablation.set_index("variant").loc["unet+ghpa", "p_value"])


def test_ablation_steps_pair_each_rung_with_the_one_below(built):
    study_dir, _ = built
    ablation = _table(study_dir, "ablation").set_index("variant")
    step = ablation.loc["unet+ghpa"]
    # unet+ghpa - unet per seed: 1, 2, 0 points: mean 1, sd 1, t = sqrt 3.
    assert step["step_from"] == "unet"
    assert (step["step_difference_mean"], step["step_difference_std"]) == pytest.approx((1, 1))
    assert step["step_p_value"] == pytest.approx(1 - math.sqrt(3) / math.sqrt(5))
    assert pd.isna(ablation.loc["unet", "step_difference_mean"])  # the bottom rung


def test_ablation_carries_params_and_macs_from_the_complexity_table(built):
    study_dir, _ = built
    ablation = _table(study_dir, "ablation").set_index("variant")
    assert ablation.loc["unet", "params"] == 40000
    assert ablation.loc["unet+ghpa", "macs_g"] == pytest.approx(0.07)
    assert ablation.loc["egeunet", "macs_g"] == pytest.approx(0.0721)


def test_paper_against_clean_known_answer(built):
    study_dir, _ = built
    protocols = _table(study_dir, "protocols").set_index("metric")
    dsc = protocols.loc["DSC (pooled)"]
    # paper - clean per seed: 0.4, 0.6, 0.2 points: mean 0.4, sd 0.2, t = 2 sqrt 3.
    t = 0.4 / (0.2 / math.sqrt(3))
    assert (dsc["difference_mean"], dsc["difference_std"]) == pytest.approx((0.4, 0.2))
    assert dsc["pairs"] == 3 and dsc["t"] == pytest.approx(t)
    assert dsc["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert (dsc["paper_train_images"], dsc["clean_train_images"]) == (1500, 1350)


def test_selected_checkpoint_against_the_last_epoch_known_answer(built):
    study_dir, _ = built
    selection = _table(study_dir, "selection").iloc[0]
    assert selection["selected_mean"] == pytest.approx(89.0)
    assert selection["last_epoch_mean"] == pytest.approx(87.0)  # 87, 87, 87
    assert selection["oracle_mean"] == pytest.approx(89.0)
    assert (selection["difference_mean"], selection["difference_std"]) == pytest.approx((2, 1))


def test_a_longer_run_is_compared_with_the_budget_and_kept_out_of_it(built):
    study_dir, _ = built
    budget = _table(study_dir, "budget").iloc[0]
    assert (budget["variant"], budget["epochs"], budget["base_epochs"]) == (
        "egeunet-long",
        2 * EPOCHS,
        EPOCHS,
    )
    assert budget["difference_of_means"] == pytest.approx(89.5 - 89.0)
    assert budget["difference_mean"] == pytest.approx(89.5 - 88.0)  # seed 1 against seed 1
    # Its history climbs linearly from 50 to 89.5 over 6 epochs: at epoch 3, 69.75.
    assert budget["val_dsc_at_base_epochs"] == pytest.approx(69.75)
    assert "egeunet-long" not in set(_table(study_dir, "ablation")["variant"])


def test_budget_sentences_read_the_schedule():
    one_cycle = tables.budget_sentence(50, 50, 1e-5)
    assert "one full cycle" in one_cycle and "T_max 50" in one_cycle and "1e-05" in one_cycle
    full = tables.budget_sentence(300, 50, 1e-5)
    assert "full length" in full and "every 100 epochs" in full
    runs = pd.DataFrame({"epochs": [50, 50], "t_max": [50, 50], "eta_min": [1e-5, 1e-5]})
    assert tables.budget_statement(runs).endswith("The published recipe trains 300 epochs.")


def test_run_status_and_cost_tables(built):
    study_dir, report = built
    status = _table(study_dir, "run_status").set_index("run_id")
    assert status.loc["isic2017-paper-egeunet-long-seed1", "stage"] == "4 budget"
    assert status.loc["isic2017-paper-egeunet-long-seed1", "status"] == "done"
    assert status.loc["isic2017-paper-egeunet-seed4", "status"] == "failed"
    cost = _table(study_dir, "cost")
    assert len(cost) == 16 and set(cost["hardware"]) == {"cpu, 1 thread, machine not recorded"}
    assert cost["wall_hours"].sum() == pytest.approx(4.0 * (15 * EPOCHS + 2 * EPOCHS) / 3600)
    text = report.markdown_path.read_text()
    assert "| 1 headline | 3 | 3 | 0 | 0 | 0 |" in text


def test_training_left_counts_the_study_runs_only(tmp_path):
    """The report's total of training still to run covers the study file's runs; a run
    folder outside it (here the failed seed 4, with no estimate) does not hide it."""
    study_dir = write_full_study(tmp_path / "fixture")
    shutil.rmtree(study_dir / "runs" / "isic2017-paper-unet-seed1")
    report = rep.build_report(study_dir, study_file=write_study_file(tmp_path / "f.yaml"))
    text = report.markdown_path.read_text()
    # The unet runs' 4 s epochs estimate the missing one: EPOCHS of them.
    assert f"Training still to run: about {EPOCHS * 4.0 / 3600:.1f} run-hours" in text
    assert "| 2 ladder | 9 | 8 | 0 | 0 | 1 | 0.0 h |" in text


def test_ablation_finding_states_the_range_of_seeds(tmp_path):
    """While a variant lacks a seed, the ablation finding gives the range of seeds per
    variant, not the smallest count as if it held for every variant."""
    study_dir = write_full_study(tmp_path / "fixture")
    shutil.rmtree(study_dir / "runs" / "isic2017-paper-unet-seed1")
    rep.build_report(study_dir)
    text = (study_dir / "findings.md").read_text()
    assert "With 2 to 3 seeds per variant, read the p-values as indicative." in text


def test_findings_state_the_numbers_in_words(built):
    study_dir, report = built
    found = json.loads((study_dir / "findings.json").read_text())
    numbers = found["numbers"]
    assert numbers["runs_done"] == numbers["runs_planned"] == 16  # seed 4 is not planned
    assert numbers["budget_epochs"] == [EPOCHS]
    assert numbers["paper_minus_clean_dsc"]["isic2017"] == pytest.approx(0.4)
    assert numbers["selected_minus_last_epoch_dsc"]["isic2017"] == pytest.approx(2.0)
    assert numbers["headline"]["isic2017"]["ours_vs_reruns"] == "above"  # 89.0 > 88.70
    assert numbers["budget"]["egeunet-long"]["difference_of_means"] == pytest.approx(0.5)
    text = (study_dir / "findings.md").read_text()
    assert "could not be verified" in text and "88.70" in text and "79.81" not in text
    assert "one full cycle of the published cosine schedule" in text
    assert "on cpu, 1 thread, machine not recorded (16 runs); median" in text
    assert "+0.40 ± 0.20" in text and "[the full report](REPORT.md)" in text
    assert (
        "(lowest loss, as published)" in text
        and "picked checkpoint scored 89.00, the best epoch by DSC, an oracle, 89.00" in text
    )
    markdown = report.markdown_path.read_text()
    assert markdown.index("## Findings") < markdown.index("## Run status")


def test_report_sections_credit_and_formats(built):
    study_dir, report = built
    text = report.markdown_path.read_text()
    for heading in (
        "## Findings",
        "## Run status",
        "## 1. Main results",
        "## 2. Ablation ladder",
        "## 3. Test-set model selection",
        "## 4. Budget against the full recipe",
        "## 5. Learning curves",
        "## 6. Per-image DSC",
        "## 7. Complexity",
        "## 8. Cost",
        "## Reference figures and their status",
        "## Data: credit and licence",
    ):
        assert heading in text
    assert "RuntimeError: out of memory" in text
    assert "89.00 ± 1.00" in text and MANIFEST_HASH in text
    for credit in (
        "CC BY-NC",
        "Codella et al. 2018",
        "Codella et al. 2019",
        "Tschandl et al. 2018",
    ):
        assert credit in text
    assert text.count("Budget: 3 epochs, one full cycle") >= 4  # wherever results appear
    html = report.html_path.read_text()
    assert "<table>" in html and "<img" in html and "89.00 ± 1.00" in html
    latex = (study_dir / "tables" / "ablation.tex").read_text()
    assert r"\begin{tabular}" in latex and r"$\pm$" in latex and "unet+ghpa" in latex


def test_every_figure_as_png_and_svg_where_small(built):
    study_dir, report = built
    expected = {
        f"{name}_isic2017_{protocol}"
        for name, protocols in (
            ("learning_curves", ("paper", "clean")),
            ("ablation", ("paper",)),
            ("dsc_vs_params", ("paper",)),
            ("per_image_dsc", ("paper", "clean")),
        )
        for protocol in protocols
    }
    expected |= {"budget_isic2017_paper_egeunet-long", "cases_isic2017-paper-egeunet-seed1"}
    assert set(report.figures) == expected
    for path in report.figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in (study_dir / "figures").iterdir():
        assert path.stat().st_size <= rep.MAX_FILE_BYTES
        if path.suffix == ".svg":
            assert path.stat().st_size <= rep.MAX_SVG_BYTES and "<svg" in path.read_text()[:500]


def test_large_svg_is_skipped_and_png_kept(tmp_path):
    figure = Figure()
    figure.subplots().plot(range(10))
    paths = figures.save_figure(figure, tmp_path / "line", max_svg_bytes=100)
    assert [p.name for p in paths] == ["line.png"]
    assert not (tmp_path / "line.svg").exists()


def test_figures_are_the_same_bytes_each_time_they_are_built(tmp_path):
    """Rebuilding a committed report must not change figures whose data did not change:
    no dates in the files, no random SVG ids, no random jitter."""
    per_image = pd.DataFrame(
        {"variant": ["unet"] * 40 + ["egeunet"] * 40, "dsc": np.linspace(0.2, 1.0, 80)}
    )
    built = []
    for attempt in ("first", "second"):
        figure = figures.per_image_distribution(per_image, ["unet", "egeunet"], title="t")
        paths = figures.save_figure(figure, tmp_path / attempt / "per_image")
        built.append([path.read_bytes() for path in paths])
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert built[0] == built[1]


def test_cases_without_pixels_are_listed_not_drawn(tmp_path):
    """Committed run folders have no cases.npz: the report names the cases from
    per_image.csv and says why there are no pictures."""
    study_dir = write_study(tmp_path / "fixture")
    (study_dir / "runs" / "isic2017-paper-egeunet-seed1" / "cases.npz").unlink()
    report = rep.build_report(study_dir)
    cases = _table(study_dir, "cases")
    assert cases[["case", "id"]].values.tolist() == [
        ["best", "img2"],
        ["median", "img1"],
        ["worst", "img3"],
    ]
    assert not any(name.startswith("cases_") for name in report.figures)
    assert "no pictures" in report.markdown_path.read_text().lower()


def test_rebuild_drops_stale_figures(tmp_path):
    study_dir = write_study(tmp_path / "again")
    (study_dir / "figures").mkdir()
    (study_dir / "figures" / "stale.png").write_bytes(b"old")
    rep.build_report(study_dir, draw=False)
    assert not (study_dir / "figures" / "stale.png").exists()


def test_missing_runs_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs"):
        rep.build_report(tmp_path / "nothing")


def test_a_study_with_no_finished_run_reports_its_status(tmp_path):
    runs_dir = tmp_path / "empty" / "runs"
    running = runs_dir / "isic2017-paper-egeunet-seed1"
    running.mkdir(parents=True)
    write_history(running, [0.5])
    report = rep.build_report(tmp_path / "empty", study_file=write_study_file(tmp_path / "s.yaml"))
    text = report.markdown_path.read_text()
    assert "No finished run of the full model yet." in text
    assert "| 1 headline | isic2017-paper-egeunet-seed1 | unfinished | 1/3 |" in text
    assert "0 of 16 planned runs done" in report.findings_path.read_text()


def test_null_metrics_read_back_as_missing_values(tmp_path):
    """metrics.json stores undefined metrics as null; the report treats them as missing."""
    study_dir = write_study(tmp_path / "fixture")
    path = study_dir / "runs" / "isic2017-paper-egeunet-seed1" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["pooled"]["sensitivity"] = None
    path.write_text(json.dumps(metrics))
    rep.build_report(study_dir, draw=False)
    main = _table(study_dir, "main_results")
    row = main[main["metric"] == "sensitivity"]
    assert row["seeds"].item() == 2  # the seed with null is left out, not counted as 0
    assert row["mean"].item() == pytest.approx(90.0)


# ---------------------------------------------------------------- the committed report


@pytest.fixture
def committed(tmp_path):
    study_dir = write_study(tmp_path / "fixture")
    study_file = write_study_file(tmp_path / "fixture.yaml")
    rep.build_report(study_dir, study_file=study_file, draw=False)
    return study_dir


def test_check_passes_on_a_report_built_from_its_runs(committed):
    assert rep.check_report(committed) == []
    inputs = json.loads((committed / "report.json").read_text())
    assert inputs["study_file"] == "../fixture.yaml"  # relative to the study folder


def test_check_fails_when_a_table_is_edited_by_hand(committed):
    path = committed / "tables" / "ablation.csv"
    table = pd.read_csv(path)
    table.loc[0, "pooled_dsc_mean"] += 0.5
    table.to_csv(path, index=False)
    problems = rep.check_report(committed)
    assert len(problems) == 1 and problems[0].startswith("tables/ablation.csv")


def test_check_fails_on_missing_extra_tables_and_edited_findings(committed):
    (committed / "tables" / "cost.csv").unlink()
    (committed / "tables" / "extra.csv").write_text("a\n1\n")
    (committed / "findings.md").write_text("# Findings\n\n- better than the paper\n")
    problems = rep.check_report(committed)
    assert "tables/cost.csv: built but not committed" in problems
    assert "tables/extra.csv: committed but not built" in problems
    assert "findings.md: differs from a rebuild" in problems


def test_check_fails_when_a_run_changes_after_the_report(committed):
    path = committed / "runs" / "isic2017-paper-unet-seed1" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["pooled"]["dsc"] = 0.5
    path.write_text(json.dumps(metrics))
    assert any(p.startswith("tables/ablation.csv") for p in rep.check_report(committed))


def test_cli_builds_with_the_study_file_and_checks(tmp_path, capsys):
    study_dir = write_study(tmp_path / "fixture")
    study_file = write_study_file(tmp_path / "fixture.yaml")
    assert cli.main(["report", str(study_dir), "--study", str(study_file)]) == 0
    assert "findings.md" in capsys.readouterr().out
    assert "| 3 clean | 3 | 0 | 0 | 0 | 3 |" in (study_dir / "REPORT.md").read_text()
    assert cli.main(["report", str(study_dir), "--check"]) == 0
    (study_dir / "tables" / "runs.csv").write_text("run_id\nforged\n")
    assert cli.main(["report", str(study_dir), "--check"]) == 1
    assert "tables/runs.csv" in capsys.readouterr().err


@pytest.mark.skipif(
    not (REPO / "reports" / "isic" / "REPORT.md").is_file(),
    reason="reports/isic has no committed report yet",
)
def test_the_committed_isic_report_is_what_its_run_folders_build():
    assert rep.check_report(REPO / "reports" / "isic") == []


def test_findings_compare_isic2018_with_the_third_party_paper_figure(tmp_path):
    runs_dir = tmp_path / "study" / "runs"
    for seed, dsc in ((1, 0.890), (2, 0.892), (3, 0.888)):
        write_run(runs_dir, "egeunet", seed, dataset="isic2018", dsc=dsc)
    report = rep.build_report(tmp_path / "study", draw=False)
    text = report.findings_path.read_text()
    assert "the paper reports DSC 89.46 ± 0.07 (third-party" in text
    assert "ours is 0.46 points below it" in text  # 89.00 against 89.46
    assert "scored DSC 89.58" in text and "ours is within their range" in text  # 88.85-89.58
    numbers = json.loads((tmp_path / "study" / "findings.json").read_text())["numbers"]
    assert numbers["headline"]["isic2018"]["ours_minus_paper"] == pytest.approx(-0.46)


def test_a_synthetic_study_says_what_it_is(tmp_path):
    """Study name and description at the top, the smoke-test banner (also in findings), a
    caption that says no published point is plotted, the note on loss scales, and HTML
    tables that scroll inside the page."""
    runs_dir = tmp_path / "quick" / "runs"
    for variant in LADDER:
        write_run(runs_dir, variant, 1, dataset="synthetic")
    study_file = tmp_path / "quick.yaml"
    study_file.write_text(
        "name: quick\ndescription: Smoke-scale ablation ladder\n  on synthetic data.\n"
        "datasets: [synthetic]\nprotocols: [paper]\nseeds: [1]\n"
        "variants: {egeunet: {}}\ntrain: {epochs: 3}\n"
    )
    report = rep.build_report(tmp_path / "quick", study_file=study_file)
    text = report.markdown_path.read_text()
    top = text[: text.index("## Findings")]
    assert "# Study report: quick" in top
    assert "Smoke-scale ablation ladder on synthetic data." in top
    assert "**Synthetic smoke test.**" in top and "say nothing about how EGE-UNet" in top
    assert "**Synthetic smoke test.**" in report.findings_path.read_text()
    assert "no published figure exists for this dataset, so none is plotted" in text
    assert (
        "with deep supervision (egeunet)" in text and "Compare variants by validation DSC" in text
    )
    html = report.html_path.read_text()
    assert html.count('<div class="table-scroll"><table>') == html.count("<table>") > 0
    assert "ablation" in report.readable  # as shown: rounded, "–" where missing


def test_a_real_data_report_has_no_banner_and_plots_the_published_points(built):
    _, report = built
    text = report.markdown_path.read_text()
    assert "Synthetic smoke test" not in text
    assert "(isic2017); with the published figures shown in this report" in text
    assert "with deep supervision (egeunet)" in text
