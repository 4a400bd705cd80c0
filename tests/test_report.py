"""The report built from a fixture set of run folders holds the expected tables and figures."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from report_fixtures import FULL_DSC, LADDER, MANIFEST_HASH, write_study

from egeunet import report as rep


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    study_dir = write_study(tmp_path_factory.mktemp("study") / "fixture")
    return study_dir, rep.build_report(study_dir)


def test_runs_table_reads_every_finished_run(built):
    study_dir, report = built
    runs = pd.read_csv(study_dir / "tables" / "runs.csv")
    assert report.runs == 12 and report.failures == 1
    assert sorted(runs["variant"].unique()) == sorted(LADDER)
    assert set(runs["seed"]) == {1, 2, 3}
    assert (runs["data_manifest_hash"] == MANIFEST_HASH).all()


def test_a_failed_rerun_hides_the_metrics_it_left_behind(tmp_path):
    """A run that finished, was run again and failed still holds the earlier attempt's
    metrics.json; the report lists it with the failures, not with the results."""
    from report_fixtures import write_run

    runs_dir = tmp_path / "runs"
    kept = write_run(runs_dir, "egeunet", 1)
    rerun = write_run(runs_dir, "egeunet", 2)
    (rerun / "outcome.json").write_text('{"status": "failed", "error": "KeyboardInterrupt"}')
    (kept / "outcome.json").write_text('{"status": "finished"}')
    assert list(rep.collect_runs(runs_dir)["run_id"]) == [kept.name]
    assert list(rep.collect_failures(runs_dir)["run_id"]) == [rerun.name]


def test_main_results_against_paper(built):
    study_dir, _ = built
    main = pd.read_csv(study_dir / "tables" / "main_results.csv")
    dsc = main[(main["metric"] == "DSC") & (main["convention"] == "pooled")].iloc[0]
    assert dsc["seeds"] == 3
    assert dsc["mean"] == pytest.approx(89.0)  # mean of 88, 89, 90
    assert dsc["std"] == pytest.approx(1.0)
    assert dsc["paper"] == pytest.approx(88.77)
    assert dsc["difference"] == pytest.approx(89.0 - 88.77)
    assert (dsc["reruns_min"], dsc["reruns_max"]) == (88.1, 88.7)
    iou = main[main["metric"] == "IoU (paper's mIoU)"].iloc[0]
    expected_iou = sum(100 * d / (2 - d) for d in FULL_DSC.values()) / 3
    assert iou["mean"] == pytest.approx(expected_iou)
    assert iou["paper"] == pytest.approx(79.81)
    per_image = main[main["convention"] == "per image"]
    assert "HD95 mean (px)" in set(per_image["metric"])
    assert per_image.loc[per_image["metric"] == "HD95 mean (px)", "mean"].iloc[0] == pytest.approx(
        7.0
    )


def test_ablation_paired_t_test_known_answer(built):
    study_dir, _ = built
    ablation = pd.read_csv(study_dir / "tables" / "ablation.csv")
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
    assert ablation.set_index("variant").loc["unet", "params"] == 40000


def test_markdown_html_and_latex(built):
    study_dir, report = built
    text = report.markdown_path.read_text()
    for heading in ("## 1. Main results", "## 2. Ablations", "## 3. Complexity", "## Failed runs"):
        assert heading in text
    assert "RuntimeError: out of memory" in text
    assert "89.00 ± 1.00" in text and "88.77" in text
    assert MANIFEST_HASH in text
    assert "| isic2017 | 2150 | 256 | 2000 | 150 | 1500 | 650 | 20.0% |" in text
    html = report.html_path.read_text()
    assert "<table>" in html and "<img" in html and "89.00 ± 1.00" in html
    latex = (study_dir / "tables" / "ablation.tex").read_text()
    assert r"\begin{tabular}" in latex and r"$\pm$" in latex and "unet+ghpa" in latex
    assert (study_dir / "tables" / "complexity.tex").is_file()


def test_every_figure_as_png_and_svg(built):
    study_dir, report = built
    expected = {
        f"{name}_isic2017_paper"
        for name in ("learning_curves", "ablation", "dsc_vs_params", "per_image_dsc", "cases")
    }
    assert set(report.figures) == expected
    for name in expected:
        png = study_dir / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (study_dir / "figures" / f"{name}.svg").read_text()[:500]


def test_rebuild_drops_stale_figures(built, tmp_path):
    study_dir = write_study(tmp_path / "again")
    (study_dir / "figures").mkdir()
    (study_dir / "figures" / "stale.png").write_bytes(b"old")
    rep.build_report(study_dir)
    assert not (study_dir / "figures" / "stale.png").exists()


def test_missing_runs_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs"):
        rep.build_report(tmp_path / "nothing")


def test_reference_figures_each_name_a_source():
    reference = rep.load_reference_results()
    entries = [
        *reference["paper"]["results"],
        *reference["paper"]["complexity"],
        *reference["peers"]["results"],
        *reference["reruns"]["results"],
    ]
    assert entries
    for entry in entries:
        assert entry["source"] and entry["status"]
    points = rep.reported_points(reference, "isic2018")
    assert points.loc[points["model"] == "EGE-UNet", "dsc"].iloc[0] == pytest.approx(89.46)


def test_null_metrics_read_back_as_missing_values(tmp_path):
    """metrics.json stores undefined metrics as null; the report treats them as missing."""
    import json

    study_dir = write_study(tmp_path / "fixture")
    path = study_dir / "runs" / "isic2017-paper-egeunet-seed1" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["pooled"]["sensitivity"] = None
    path.write_text(json.dumps(metrics))
    runs = rep.collect_runs(study_dir / "runs")
    main = rep.main_results(runs, rep.load_reference_results())
    row = main[main["metric"] == "sensitivity"]
    assert len(row) == 1
    assert row["seeds"].iloc[0] == 2  # the seed with null is left out, not counted as 0
    assert row["mean"].iloc[0] == pytest.approx(90.0)


def test_study_variants_sharing_a_model_stay_apart(tmp_path):
    """``egeunet`` and ``egeunet-imagenet`` (same model, other normalisation) must not be
    pooled into one variant with six seeds."""
    import shutil

    study_dir = write_study(tmp_path / "fixture")
    runs_dir = study_dir / "runs"
    for seed in (1, 2, 3):
        source = runs_dir / f"isic2017-paper-egeunet-seed{seed}"
        shutil.copytree(source, runs_dir / f"isic2017-paper-egeunet-imagenet-seed{seed}")
    runs = rep.collect_runs(runs_dir)
    counts = runs.groupby("variant")["seed"].count()
    assert counts["egeunet"] == 3 and counts["egeunet-imagenet"] == 3
    assert counts["unet"] == 3  # variants whose study name is their model's keep it
    main = rep.main_results(runs, rep.load_reference_results())
    assert set(main["seeds"]) == {3}
