"""The study report: REPORT.md, REPORT.html, findings, tables and figures, built from run
folders, and the check that a committed report is what they build.

Everything here reads files only (each run's ``config.json``, ``metrics.json``,
``history.csv``, ``per_image.csv``, ``cases.npz`` when present and the study runner's
``outcome.json``, the complexity table written by ``02_complexity``, and the study file
when given), so a report can be rebuilt at any time and is never edited by hand.

Layout written under the study folder::

    REPORT.md, REPORT.html        the report (GitHub renders the Markdown)
    findings.md, findings.json    its "Findings" alone, for the README to quote
    report.json                   what it was built from (study file, full model)
    tables/<name>.csv, .tex       full-precision numbers and booktabs LaTeX
    figures/<name>.png (.svg)     SVG only where it stays small

:func:`check_report` rebuilds a report into a temporary folder and compares its tables
and findings with the ones in the study folder; ``egeunet report --check`` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import markdown
import pandas as pd
import yaml

from egeunet import figures
from egeunet.cases import case_figure
from egeunet.fileio import sha256_file, write_json_atomic, write_text_atomic
from egeunet.findings import Findings, dataset_name, findings
from egeunet.references import (
    load_reference_results,
    reported_points,
    shown_figures,
    withheld_figures,
)
from egeunet.report_format import (
    MISSING,
    format_ablation,
    format_budget,
    format_comparison,
    format_complexity,
    format_cost,
    format_main_results,
    format_per_image,
    format_protocols,
    format_references,
    format_selection,
    format_stage_summary,
    format_status,
    latex_table,
    markdown_table,
    number,
)
from egeunet.report_tables import (
    COMPLEXITY_CSV,
    FULL_MODEL,
    StudyTables,
    budget_statement,
    compute_tables,
    model_variants,
    variant_order,
)
from egeunet.runfolder import CASES_FILE, RunFolder
from egeunet.study_runs import LOCAL_COLUMNS, NOT_IN_STUDY, stage_summary

RUNS_DIR = "runs"
REPORT_INPUTS = "report.json"
MAX_SVG_BYTES = 300_000
MAX_FILE_BYTES = 2_000_000

DATA_CREDIT = """\
Images and lesion masks come from the ISIC Archive of the International Skin Imaging
Collaboration (<https://www.isic-archive.com>), released under the Creative Commons
Attribution-NonCommercial licence (CC BY-NC). Cite the challenge papers when you use them:

- ISIC 2017: N. C. F. Codella, D. Gutman, M. E. Celebi et al., "Skin lesion analysis toward
  melanoma detection: a challenge at the 2017 International Symposium on Biomedical Imaging
  (ISBI), hosted by the International Skin Imaging Collaboration (ISIC)", ISBI 2018
  (Codella et al. 2018, arXiv:1710.05006).
- ISIC 2018: N. Codella, V. Rotemberg, P. Tschandl et al., "Skin lesion analysis toward
  melanoma detection 2018: a challenge hosted by the International Skin Imaging
  Collaboration (ISIC)", arXiv:1902.03368 (Codella et al. 2019); and P. Tschandl,
  C. Rosendahl, H. Kittler, "The HAM10000 dataset, a large collection of multi-source
  dermatoscopic images of common pigmented skin lesions", Scientific Data 5, 180161
  (Tschandl et al. 2018).

No ISIC images or masks are stored with this report; figures of example cases, where
present, show ISIC test images under the same licence.
"""

SYNTHETIC_BANNER = (
    "**Synthetic smoke test.** Every run of this study trained and was scored on generated "
    "images (`egeunet.data.synthetic`), with a small budget. It shows that the pipeline "
    "runs end to end; its numbers say nothing about how EGE-UNet or its variants perform "
    "on skin lesions. For that, run `studies/paper.yaml` on the ISIC data."
)

LOSS_SCALES = (
    "Loss scales differ between variants: with deep supervision ({variants}) the loss is "
    "the final map's BCE + Dice plus five side maps' (weights 0.1 to 0.5, six terms in "
    "all), so its loss curves sit several times above those of the variants without it. "
    "Compare variants by validation DSC, not by loss."
)

SIGNIFICANCE = (
    "Paired t-test over seeds (scipy.stats.ttest_rel; runs with the same seed are paired). "
    "A Wilcoxon signed-rank test cannot reach p < 0.05 with so few pairs (its smallest "
    "two-sided p is 2/2^n: 0.25 with 3 seeds), so the t-test is used; its normality "
    "assumption cannot be checked on so few seeds, so read p as indicative. With fewer than "
    "two pairs, or identical differences, the test is undefined (–)."
)


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    markdown_path: Path
    html_path: Path
    findings_path: Path
    tables: dict[str, Path] = field(default_factory=dict)
    readable: dict[str, pd.DataFrame] = field(default_factory=dict)
    """The tables as the report shows them (rounded, "–" where missing), by name."""
    figures: dict[str, Path] = field(default_factory=dict)
    runs: int = 0
    failures: int = 0


class _Writer:
    """Writes the report's tables and figures and collects the Markdown around them."""

    def __init__(self, output_dir: Path, report: Report, draw: bool) -> None:
        self.tables_dir = _fresh_dir(output_dir / "tables")
        self.figures_dir = _fresh_dir(output_dir / "figures")
        self.report, self.draw = report, draw
        self.parts: list[str] = []

    def text(self, *lines: str) -> None:
        self.parts.extend(lines)

    def table(
        self, name: str, numbers: pd.DataFrame, readable: pd.DataFrame, show: bool = True
    ) -> None:
        """``<name>.csv`` (full precision) and ``<name>.tex`` (readable), shown in the
        Markdown unless ``show`` is false."""
        write_text_atomic(self.tables_dir / f"{name}.csv", numbers.to_csv(index=False))
        write_text_atomic(self.tables_dir / f"{name}.tex", latex_table(readable))
        self.report.tables[name] = self.tables_dir / f"{name}.csv"
        self.report.readable[name] = readable
        if show:
            self.parts.append(markdown_table(readable))

    def figure(self, name: str, title: str, make_figure: Callable, *args: object) -> None:
        """Draw ``make_figure(*args)`` as ``figures/<name>.png`` (and ``.svg`` where small),
        unless this build draws no figures."""
        if not self.draw:
            return
        paths = figures.save_figure(
            make_figure(*args),
            self.figures_dir / name,
            max_svg_bytes=MAX_SVG_BYTES,
            max_png_bytes=MAX_FILE_BYTES,
        )
        self.report.figures[name] = paths[0]
        links = "".join(f" ([SVG](figures/{p.name}))" for p in paths[1:])
        self.parts.append(f"![{title}](figures/{paths[0].name})\n\n*{title}*{links}\n")


def _fresh_dir(path: Path) -> Path:
    """An empty folder at ``path``; only used for the report's own generated folders."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------- sections


def data_overview_table(runs_dir: Path) -> pd.DataFrame:
    """Images per split part of every dataset ``01_data`` summarised for the study."""
    rows = []
    for folder in sorted(runs_dir.glob("01_data-*")):
        summary_path = folder / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text("utf-8"))
            row = {
                "dataset": summary["dataset"],
                "images": summary["num_images"],
                "size": summary["size"],
            }
            row.update(summary.get("splits", {}))
            fractions = summary.get("lesion_fraction", {})
            if "median" in fractions:
                row["median lesion share"] = f"{100 * fractions['median']:.1f}%"
            rows.append(row)
    return pd.DataFrame(rows).convert_dtypes()


def _split_hashes(runs: pd.DataFrame) -> pd.DataFrame:
    """SHA-256 of the split manifests (id lists) in the prepared folder each dataset's
    runs used, where that folder is on this machine (provenance, not a table)."""
    rows = []
    for (dataset, folder), _ in runs.groupby(["dataset", "data_folder"], dropna=True):
        row = {"dataset": dataset}
        for name in ("challenge", "paper"):
            path = Path(folder) / "splits" / f"{name}.json"
            if path.is_file():
                row[f"split_{name}_hash"] = sha256_file(path)
        if len(row) > 1:
            rows.append(row)
    return pd.DataFrame(rows)


def _status_section(writer: _Writer, tables: StudyTables, study_file: str | None) -> None:
    writer.text("## Run status\n")
    status = tables.status
    if study_file:
        shown_path = study_file.lstrip("./")
        writer.text(
            f"Every training run [`{shown_path}`]({study_file}) declares, stage by stage: "
            "*done* (metrics "
            "written), *unfinished* (epochs so far; *resumable* when its `last.pt` is kept), "
            "*failed* or *not started*.\n"
        )
        summary = stage_summary(status)
        writer.text(markdown_table(format_stage_summary(summary)))
        # Runs outside the study file are listed, but the study will not train them.
        left = summary.loc[summary["stage"] != NOT_IN_STUDY, "remaining_hours"]
        if left.notna().all() and left.sum() > 0:
            writer.text(
                f"Training still to run: about {left.sum():.1f} run-hours. Estimated per "
                "run: its epochs left times the median epoch time measured so far (first "
                "epochs excluded) of the run itself, else of the nearest measured runs (same "
                "dataset, model and protocol, then fewer in common). Those epochs ran as "
                "fast as the machine was then: runs side by side, or other work beside them, "
                "slow each run down.\n"
            )
    else:
        writer.text(
            "The run folders found (no study file given: `egeunet report DIR --study FILE` "
            "also lists the runs still to come).\n"
        )
    writer.table(
        "run_status", status.drop(columns=["hardware", "torch", "commit"]), format_status(status)
    )
    if not tables.failures.empty:
        writer.text("\nFailed runs, with their errors:\n", markdown_table(tables.failures))


def _setup_section(writer: _Writer, tables: StudyTables, runs_dir: Path) -> None:
    runs = tables.runs
    writer.text("## Setup\n")
    lines = [
        "- Generated by `egeunet report` from the run folders: regenerate it, never edit it.",
    ]
    for column, label in (
        ("image_size", "image size"),
        ("seed", "seeds"),
        ("selection", "model selection"),
        ("validation_source", "selection data"),
    ):
        if column in runs.columns:
            values = sorted({str(v) for v in runs[column].dropna()} - {""})
            if values:
                lines.append(f"- {label}: {', '.join(values)}")
    writer.text("\n".join(lines) + "\n")
    hash_columns = [c for c in runs.columns if "hash" in c]
    if hash_columns:
        writer.text("\nData manifests (SHA-256, from each run's config.json):\n")
        writer.text(
            markdown_table(runs[["dataset", *hash_columns]].drop_duplicates().fillna(MISSING))
        )
    splits = _split_hashes(runs) if "data_folder" in runs else pd.DataFrame()
    if not splits.empty:
        writer.text("\nSplit manifests (SHA-256, read from the prepared data on this machine):\n")
        writer.text(markdown_table(splits.fillna(MISSING)))
    data = data_overview_table(runs_dir)
    if not data.empty:
        # Counts are nullable integers (a split one dataset lacks): fill as text.
        table = data.astype(object).fillna(MISSING)
        writer.text("\nImages per split (from `01_data`):\n", markdown_table(table))


def _main_section(writer: _Writer, tables: StudyTables, full_model: str) -> None:
    runs = tables.runs
    writer.text("## 1. Main results\n")
    if tables.comparison.empty:
        writer.text("No finished run of the full model yet.\n")
        return
    writer.text(
        f"The full model ({full_model}), mean ± sample sd over seeds, in percent. "
        f"{budget_statement(runs[runs['variant'] == full_model])} *Pooled* = one confusion "
        "matrix over every test pixel (the paper's convention; its 'mIoU' is the lesion "
        "IoU); *per image* = the mean over test images. Under the *paper* protocol the "
        "checkpoint is selected on the test split itself, as the published code does; "
        "*clean* selects on held-out validation data. Published figures are pooled and were "
        "selected on the split they were scored on, so they compare with our paper protocol "
        "only; each carries its verification status (*verified*: seen in the named source; "
        "*third-party*: seen only where someone else quotes the paper). Figures that could "
        "not be verified are not shown (see *Reference figures*).\n"
    )
    writer.table("comparison", tables.comparison, format_comparison(tables.comparison), show=False)
    for dataset, rows in tables.comparison.groupby("dataset", sort=True):
        writer.text(f"### {dataset_name(dataset)}\n", markdown_table(format_comparison(rows)))
    writer.text("\nEvery metric of the full model:\n")
    writer.table("main_results", tables.main, format_main_results(tables.main))


def _ablation_section(writer: _Writer, tables: StudyTables, reference: dict) -> None:
    writer.text("\n## 2. Ablation ladder\n")
    ablation = tables.ablation
    if ablation.empty:
        writer.text("No dataset has finished runs of more than one model variant yet.\n")
        return
    variants = model_variants(tables.runs)
    writer.text(
        "Mean ± sd over seeds (percent). Each rung adds one module to the one below it "
        "(GHPA, then GAB, then deep supervision: the full model). ΔDSC = pooled DSC of the "
        "variant minus the rung below / minus the full model, paired by seed. Parameters and "
        "convolution MACs (the paper's 'GFLOPs') at 256x256 come from `02_complexity`. "
        f"{budget_statement(variants[variants['variant'].isin(ablation['variant'])])} "
        f"{SIGNIFICANCE}\n"
    )
    writer.table("ablation", ablation, format_ablation(ablation))
    for (dataset, protocol), rows in ablation.groupby(["dataset", "protocol"], sort=True):
        group = variants[(variants["dataset"] == dataset) & (variants["protocol"] == protocol)]
        order = variant_order(group["variant"])
        key = f"{dataset}_{protocol}"
        writer.figure(
            f"ablation_{key}",
            f"Pooled DSC per variant, mean ± sd over seeds, seeds as dots ({dataset}, {protocol})",
            figures.ablation_bars,
            group,
            "pooled_dsc",
            "pooled DSC",
            order,
        )
        if protocol != "paper":
            continue
        ours = pd.DataFrame(
            {
                "variant": rows["variant"],
                "params": rows["params"],
                "dsc_mean": rows["pooled_dsc_mean"],
                "dsc_std": rows["pooled_dsc_std"],
            }
        )
        published = reported_points(reference, dataset)
        shown = (
            "with the published figures shown in this report"
            if not published.empty
            else "no published figure exists for this dataset, so none is plotted"
        )
        writer.figure(
            f"dsc_vs_params_{key}",
            f"Pooled DSC against parameters ({dataset}); {shown}",
            figures.dsc_against_parameters,
            ours,
            published,
        )


def _selection_section(writer: _Writer, tables: StudyTables) -> None:
    writer.text("\n## 3. Test-set model selection: paper against clean\n")
    protocols, selection = tables.protocols, tables.selection
    if protocols.empty:
        writer.text("No dataset has finished runs of the full model under both protocols yet.\n")
    else:
        writer.text(
            "How much selecting the checkpoint on the test split (the published protocol) "
            "inflates the figures: the full model under the paper protocol minus the clean "
            "protocol, same dataset and seeds, paired by seed, on the same test split. The "
            "clean protocol holds some training images out to select on, so it trains on "
            f"fewer. {budget_statement(tables.runs[tables.runs['dataset'].isin(protocols['dataset'])])}"
            f" {SIGNIFICANCE}\n"
        )
        writer.table("protocols", protocols, format_protocols(protocols))
    if not selection.empty:
        writer.text(
            "\nWithin the paper-protocol runs, whose validation split is the test split: the "
            "pooled test DSC of the checkpoint selected there (lowest loss) against the "
            "model of the last epoch, which no selection touched, and against the best epoch "
            "by DSC (an oracle no honest protocol can reach).\n"
        )
        writer.table("selection", selection, format_selection(selection))


def _budget_section(writer: _Writer, tables: StudyTables) -> None:
    budget = tables.budget
    writer.text("\n## 4. Budget against the full recipe\n")
    if budget.empty:
        writer.text("No run with a longer budget has finished yet.\n")
        return
    compared = set(budget["variant"]) | set(budget["base_variant"])
    writer.text(
        "Runs of the same model trained for more epochs against the declared budget, same "
        "dataset and protocol; the longer run's validation DSC at the epoch where the "
        "declared budget ends shows where it stood then. "
        f"{budget_statement(tables.runs[tables.runs['variant'].isin(compared)])}\n"
    )
    writer.table("budget", budget, format_budget(budget))
    histories = tables.histories
    for _, row in budget.iterrows():
        same = (histories["dataset"] == row["dataset"]) & (histories["protocol"] == row["protocol"])
        long = histories[same & (histories["variant"] == row["variant"])]
        short = histories[same & (histories["variant"] == row["base_variant"])]
        if long.empty or "val_dsc" not in histories:
            continue
        writer.figure(
            f"budget_{row['dataset']}_{row['protocol']}_{row['variant']}",
            f"Validation DSC per epoch: {row['variant']} ({row['epochs']} epochs) against "
            f"{row['base_variant']} ({row['base_epochs']} epochs, mean ± sd over seeds); "
            f"{row['dataset']}, {row['protocol']} protocol",
            figures.budget_curves,
            short.assign(val_dsc=100 * short["val_dsc"]),
            long.assign(val_dsc=100 * long["val_dsc"]),
            "val_dsc",
            "validation DSC (%)",
        )


def _curves_section(writer: _Writer, tables: StudyTables) -> None:
    writer.text("\n## 5. Learning curves\n")
    histories = tables.histories
    if histories.empty:
        writer.text("No history yet.\n")
        return
    writer.text(
        "Training and validation loss and validation DSC per epoch, mean over seeds with a "
        "band of ± 1 sd. Under the paper protocol the validation split is the test split. "
        "Runs with another budget are in section 4.\n"
    )
    variants = model_variants(tables.runs)
    for (dataset, protocol), group in variants.groupby(["dataset", "protocol"], sort=True):
        history = histories[histories["run_id"].isin(group["run_id"])]
        if history.empty:
            continue
        writer.text(f"\n{budget_statement(group)}\n")
        supervised = sorted(v for v in set(group["model"]) if has_deep_supervision(v))
        if supervised and len(supervised) < group["model"].nunique():
            writer.text(f"{LOSS_SCALES.format(variants=', '.join(supervised))}\n")
        writer.figure(
            f"learning_curves_{dataset}_{protocol}",
            f"Learning curves per variant ({dataset}, {protocol})",
            figures.learning_curves,
            history,
            variant_order(group["variant"]),
        )


def _per_image_section(writer: _Writer, tables: StudyTables) -> None:
    writer.text("\n## 6. Per-image DSC; best, median and worst cases\n")
    summary, per_image = tables.per_image_summary, tables.per_image
    if summary.empty:
        writer.text("No per-image scores yet.\n")
        return
    writer.text("Per-image DSC (percent) over every test image of every seed.\n")
    writer.table("per_image", summary, format_per_image(summary))
    for (dataset, protocol), group in per_image.groupby(["dataset", "protocol"], sort=True):
        writer.figure(
            f"per_image_dsc_{dataset}_{protocol}",
            f"Per-image DSC, all seeds ({dataset}, {protocol})",
            figures.per_image_distribution,
            group,
            variant_order(group["variant"]),
        )
    cases = tables.cases
    if cases.empty:
        return
    writer.text(
        "\nThe best, median and worst test image of the full model's lowest-seed run, by "
        "per-image DSC:\n"
    )
    writer.table("cases", cases, cases.assign(dsc=[number(v, 1) for v in cases["dsc"]]))
    run_dirs = tables.runs.set_index("run_id")["run_dir"]
    for run_id in dict.fromkeys(cases["run_id"]):
        if not RunFolder(Path(run_dirs[run_id])).cases.is_file():
            writer.text(
                f"\n_No pictures of {run_id}'s cases: its `{CASES_FILE}` (dataset pixels) is "
                "not in the run folder; committed run folders never keep it._\n"
            )
            continue
        writer.figure(
            f"cases_{run_id}",
            f"Best, median and worst test images of {run_id} (ISIC Archive, CC BY-NC)",
            case_figure,
            run_dirs[run_id],
        )


def _complexity_section(writer: _Writer, tables: StudyTables) -> None:
    writer.text("\n## 7. Complexity\n")
    complexity = tables.complexity
    if complexity.empty:
        writer.text(
            f"No complexity table at `{COMPLEXITY_CSV}`; run `02_complexity` for this study.\n"
        )
        return
    writer.text(
        "Parameters; convolution multiply-accumulates in the paper's convention (what it "
        "calls GFLOPs); fvcore FLOPs with every op counted; CPU latency per image where "
        "measured.\n"
    )
    writer.table("complexity", complexity, format_complexity(complexity))


def _cost_section(writer: _Writer, tables: StudyTables) -> None:
    writer.text("\n## 8. Cost\n")
    cost, total = tables.cost, tables.total
    if cost.empty:
        writer.text("No run has trained an epoch yet.\n")
        return
    writer.text(
        "Every run that trained: training wall time (the sum of its epochs' seconds, "
        "validation included), median training images per second over its epochs, and the "
        "hardware its config.json records. Runs that share a machine side by side slow each "
        f"other down. Total: **{number(total['wall_hours'], 1)} h** of training wall time over "
        f"{total['runs']} run(s), {number(total['core_hours'], 1)} core-hours (hours times "
        "the most threads a run had; an upper bound for a run resumed with more).\n"
    )
    writer.table("cost", cost, format_cost(cost))


def _references_section(writer: _Writer, reference: dict) -> None:
    writer.text("\n## Reference figures and their status\n")
    writer.text(
        "From `egeunet/reference_results.json`. Statuses: "
        + "; ".join(f"*{k}*: {v}" for k, v in reference["statuses"].items())
        + ". Shown:\n"
    )
    shown = shown_figures(reference)
    writer.table("references", shown, format_references(shown))
    withheld = withheld_figures(reference)
    if not withheld.empty:
        writer.text("\nNot shown (their values are not quoted anywhere in this report):\n")
        writer.text(markdown_table(withheld.replace("", MISSING)))


# ---------------------------------------------------------------- build and check


HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse;margin:1rem 0;font-size:0.9rem}}
th,td{{border:1px solid #ccc;padding:0.25rem 0.5rem;text-align:left}}
.table-scroll{{overflow-x:auto;max-width:100%}}
blockquote{{border-left:4px solid #c90;background:#fff8e6;margin:1rem 0;padding:0.5rem 1rem}}
img{{max-width:100%}}</style></head><body>
{body}
</body></html>
"""


def scrolling_tables(html: str) -> str:
    """``html`` with every table inside a box that scrolls sideways, so wide tables stay
    within the page."""
    html = html.replace("<table>", '<div class="table-scroll"><table>')
    return html.replace("</table>", "</table></div>")


def study_description(study_file: str | Path | None) -> str:
    """The ``description`` of the study file, "" without one (or without a file)."""
    if study_file is None:
        return ""
    try:
        document = yaml.safe_load(Path(study_file).read_text("utf-8"))
    except (OSError, yaml.YAMLError):
        return ""
    description = document.get("description") if isinstance(document, dict) else None
    return " ".join(str(description).split()) if description else ""


def is_synthetic(tables: StudyTables) -> bool:
    """Whether every dataset of the study is the synthetic one."""
    datasets = _datasets(tables)
    return bool(datasets) and datasets == {"synthetic"}


def has_deep_supervision(model: str) -> bool:
    """Whether the model variant named ``model`` (:attr:`EGEUNetConfig.name`) trains with
    deep supervision: the full model, or a ladder rung with ``+ds``."""
    parts = model.split("[")[0].split("+")
    return parts[0] == "egeunet" or "ds" in parts


def _relative_study_file(study_file: str | Path | None, study_dir: Path) -> str | None:
    """The study file as a path relative to the study folder (how report.json keeps it)."""
    if study_file is None:
        return None
    return Path(os.path.relpath(Path(study_file).resolve(), study_dir.resolve())).as_posix()


def build_report(
    study_dir: str | Path,
    study_name: str | None = None,
    full_model: str = FULL_MODEL,
    study_file: str | Path | None = None,
    output_dir: str | Path | None = None,
    draw: bool = True,
) -> Report:
    """Regenerate a study's report from the run folders in ``<study_dir>/runs`` and the
    complexity table of ``02_complexity``, into ``output_dir`` (default: the study
    folder). ``study_file`` (the study's YAML) adds the runs still to come to the run
    status; ``draw=False`` skips the figures (the tables and findings are the same)."""
    study_dir = Path(study_dir)
    runs_dir = study_dir / RUNS_DIR
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: no runs folder; run the study first")
    output_dir = Path(output_dir) if output_dir is not None else study_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    study_name = study_name or study_dir.name
    reference = load_reference_results()
    tables = compute_tables(study_dir, reference, study_file, full_model)
    report = Report(
        output_dir / "REPORT.md",
        output_dir / "REPORT.html",
        output_dir / "findings.md",
        runs=len(tables.runs),
        failures=len(tables.failures),
    )
    writer = _Writer(output_dir, report, draw)
    relative_file = _relative_study_file(study_file, study_dir)
    found = findings(tables, reference, full_model)
    runs = tables.runs
    budget = budget_statement(runs[runs["variant"] == full_model]) if not runs.empty else ""
    writer.text(f"# Study report: {study_name}\n")
    description = study_description(study_file)
    if description:
        writer.text(f"{description}\n")
    synthetic = is_synthetic(tables)
    if synthetic:
        writer.text(f"> {SYNTHETIC_BANNER}\n")
    if budget:
        writer.text(f"> {budget}\n")
    writer.text(found.markdown())
    _status_section(writer, tables, relative_file)
    _setup_section(writer, tables, runs_dir)
    if not runs.empty:
        writer.table(
            "runs",
            runs.drop(columns=list(LOCAL_COLUMNS)),
            runs.drop(columns=list(LOCAL_COLUMNS)),
            show=False,
        )
        writer.text("\nOne row per finished run: `tables/runs.csv`.\n")
    _main_section(writer, tables, full_model)
    _ablation_section(writer, tables, reference)
    _selection_section(writer, tables)
    _budget_section(writer, tables)
    _curves_section(writer, tables)
    _per_image_section(writer, tables)
    _complexity_section(writer, tables)
    _cost_section(writer, tables)
    _references_section(writer, reference)
    if any(str(d).startswith("isic") for d in _datasets(tables)):
        writer.text("\n## Data: credit and licence\n", DATA_CREDIT)
    _write_findings(found, output_dir, study_name, synthetic)
    write_json_atomic(
        output_dir / REPORT_INPUTS, {"study_file": relative_file, "full_model": full_model}
    )
    text = "\n".join(writer.parts)
    write_text_atomic(report.markdown_path, text)
    body = scrolling_tables(markdown.markdown(text, extensions=["tables"]))
    write_text_atomic(
        report.html_path, HTML_TEMPLATE.format(title=f"Study report: {study_name}", body=body)
    )
    return report


def _datasets(tables: StudyTables) -> set[str]:
    """Datasets the study has runs of, finished or not (read off run ids when needed)."""
    found = set(tables.runs["dataset"]) if not tables.runs.empty else set()
    found |= {str(run_id).split("-")[0] for run_id in tables.status["run_id"]}
    return found


def _write_findings(found: Findings, output_dir: Path, study_name: str, synthetic: bool) -> None:
    heading = f"# Findings: {study_name}"
    if synthetic:
        heading += f"\n\n> {SYNTHETIC_BANNER}"
    text = found.markdown(heading, link="REPORT.md")
    write_text_atomic(output_dir / "findings.md", text)
    write_json_atomic(output_dir / "findings.json", found.as_json())


COMPARED_FILES = ("findings.md", "findings.json", REPORT_INPUTS)
"""Besides ``tables/*.csv``, the files :func:`check_report` compares."""


def _compare_tables(committed: Path, rebuilt: Path, name: str) -> str | None:
    """None when the CSV tables hold the same columns and values (numbers to 1e-9)."""
    ours, theirs = pd.read_csv(committed), pd.read_csv(rebuilt)
    try:
        pd.testing.assert_frame_equal(ours, theirs, check_dtype=False, rtol=1e-9, atol=1e-12)
    except AssertionError as error:
        first_line = str(error).strip().splitlines()[0]
        return f"tables/{name}: differs from a rebuild ({first_line})"
    return None


def check_report(study_dir: str | Path, study_file: str | Path | None = None) -> list[str]:
    """Rebuild the report of ``study_dir`` into a temporary folder, from its run folders and
    the study file it was built with (``report.json``, unless ``study_file`` is given), and
    compare every ``tables/*.csv``, ``findings.md``, ``findings.json`` and ``report.json``
    with the committed ones. Returns the differences, one line each (empty: the same)."""
    study_dir = Path(study_dir)
    if not (study_dir / REPORT_INPUTS).is_file():
        return [f"{study_dir}: no {REPORT_INPUTS}; build the report with `egeunet report`"]
    inputs = json.loads((study_dir / REPORT_INPUTS).read_text("utf-8"))
    if study_file is None and inputs.get("study_file"):
        study_file = study_dir / inputs["study_file"]
    problems = []
    with tempfile.TemporaryDirectory(prefix="egeunet-report-check-") as scratch:
        rebuilt = Path(scratch)
        build_report(
            study_dir,
            full_model=inputs.get("full_model", FULL_MODEL),
            study_file=study_file,
            output_dir=rebuilt,
            draw=False,
        )
        committed_tables = {p.name for p in (study_dir / "tables").glob("*.csv")}
        rebuilt_tables = {p.name for p in (rebuilt / "tables").glob("*.csv")}
        problems += [
            f"tables/{n}: committed but not built"
            for n in sorted(committed_tables - rebuilt_tables)
        ]
        problems += [
            f"tables/{n}: built but not committed"
            for n in sorted(rebuilt_tables - committed_tables)
        ]
        for name in sorted(committed_tables & rebuilt_tables):
            problem = _compare_tables(study_dir / "tables" / name, rebuilt / "tables" / name, name)
            if problem:
                problems.append(problem)
        for name in COMPARED_FILES:
            committed = study_dir / name
            if not committed.is_file():
                problems.append(f"{name}: missing")
            elif committed.read_text("utf-8") != (rebuilt / name).read_text("utf-8"):
                problems.append(f"{name}: differs from a rebuild")
    return problems
