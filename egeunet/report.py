"""The study report: tables, figures, REPORT.md and REPORT.html, built from run folders.

Everything here reads files only (each run's ``config.json``, ``metrics.json``,
``history.csv``, ``per_image.csv``, ``cases.npz`` and the study runner's ``outcome.json``,
plus the complexity table written by ``02_complexity``), so a report can be rebuilt at any
time and is never edited by hand.

Layout written under the study folder::

    REPORT.md, REPORT.html
    tables/<name>.csv, tables/<name>.tex   (main_results, ablation, complexity, runs)
    figures/<name>.png, figures/<name>.svg

Significance: ablation variants are compared with the full model by a paired t-test over
seeds (runs with the same seed are paired). A Wilcoxon signed-rank test was considered and
rejected: with the study's 5 seeds its smallest attainable two-sided p-value is
2/2^5 = 0.0625, so it could never reach 0.05. The t-test assumes roughly normal
seed-to-seed differences, which 5 pairs cannot verify; the report says so.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import markdown
import numpy as np
import pandas as pd
from scipy import stats

from egeunet import figures
from egeunet.cases import case_figure
from egeunet.fileio import sha256_file, write_text_atomic
from egeunet.model import EGEUNetConfig
from egeunet.study import OUTCOME_FILE

FULL_MODEL = EGEUNetConfig().name
"""Variant name of the published model, the one every ablation is compared with."""

ABLATION_LADDER = ("unet", "unet+ghpa", "unet+ghpa+gab", FULL_MODEL)
"""The paper's macro ablation ladder, in the order tables and figures show it."""

COMPLEXITY_CSV = Path("runs") / "02_complexity" / "complexity.csv"
"""Where ``02_complexity`` writes its table, relative to the study folder."""

RUNS_DIR = "runs"

# (column in the runs table, label, convention) for the main results table.
MAIN_METRICS = (
    ("pooled_iou", "IoU (paper's mIoU)", "pooled"),
    ("pooled_dsc", "DSC", "pooled"),
    ("pooled_accuracy", "accuracy", "pooled"),
    ("pooled_specificity", "specificity", "pooled"),
    ("pooled_sensitivity", "sensitivity", "pooled"),
    ("image_dsc_mean", "DSC mean", "per image"),
    ("image_iou_mean", "IoU mean", "per image"),
    ("image_isic_score", "ISIC 2017 score", "per image"),
    ("image_hd95_mean", "HD95 mean (px)", "per image"),
)
PAPER_KEYS = {"pooled_iou": "miou", "pooled_dsc": "dsc"}
PERCENT_PREFIXES = ("pooled_", "image_dsc", "image_iou", "image_isic")


# ---------------------------------------------------------------- reference figures


def load_reference_results() -> dict:
    """The published and re-run figures (``egeunet/reference_results.json``), each with its
    source and a note on how far it was checked."""
    text = resources.files("egeunet").joinpath("reference_results.json").read_text("utf-8")
    return json.loads(text)


def reported_points(reference: dict, dataset: str) -> pd.DataFrame:
    """The paper's and peers' reported (model, params, dsc, source) for one dataset."""
    rows = []
    paper_params = {c["model"]: c["params"] for c in reference["paper"]["complexity"]}
    for entry in reference["paper"]["results"]:
        if entry["dataset"] == dataset and entry["model"] in paper_params:
            rows.append(
                {
                    "model": entry["model"],
                    "params": paper_params[entry["model"]],
                    "dsc": entry["dsc"],
                    "source": "EGE-UNet paper",
                }
            )
    for entry in reference["peers"]["results"]:
        if dataset in entry:
            rows.append(
                {
                    "model": entry["model"],
                    "params": entry["params"],
                    "dsc": entry[dataset]["dsc"],
                    "source": "peers in the paper's table",
                }
            )
    return pd.DataFrame(rows, columns=["model", "params", "dsc", "source"])


def reported_complexity(reference: dict) -> pd.DataFrame:
    """Parameters and "GFLOPs" (convolution MACs) as the paper reports them for EGE-UNet
    (from :func:`egeunet.complexity.paper_reported_complexity`) and for its peers."""
    from egeunet.complexity import paper_reported_complexity

    paper = paper_reported_complexity()
    rows = [
        {
            "model": "EGE-UNet",
            "params": paper["params_total"],
            "gflops": paper["macs_g"],
            "source": "EGE-UNet paper",
        }
    ]
    rows += [
        {
            "model": e["model"],
            "params": e["params"],
            "gflops": e["gflops"],
            "source": "peers in the paper's table",
        }
        for e in reference["peers"]["results"]
    ]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- reading run folders


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _training_config(config_doc: dict) -> dict:
    """The TrainConfig fields of a run's config.json, whether stored flat or nested."""
    for key in ("config", "train_config"):
        if isinstance(config_doc.get(key), dict):
            return config_doc[key]
    return config_doc


def _hashes(document: dict) -> dict[str, str]:
    found = {}
    for key, value in document.items():
        if isinstance(value, str) and "hash" in key:
            found[key] = value
        elif isinstance(value, dict) and key in ("data", "dataset", "manifest"):
            found.update({f"{key}.{k}": v for k, v in _hashes(value).items()})
    return found


def read_run(run_dir: str | Path) -> dict:
    """One finished run folder as a flat row: identity (run_id, dataset, protocol, variant,
    seed), training facts, every pooled metric as ``pooled_<name>`` and every per-image
    summary as ``image_<name>``, and the data hashes recorded in config.json."""
    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.json"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir}: no {name}; is this a finished run folder?")
    config_doc = _read_json(run_dir / "config.json")
    metrics = _read_json(run_dir / "metrics.json")
    config = _training_config(config_doc)
    model = config.get("model") or metrics.get("model") or {}
    row = {
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "dataset": config.get("dataset", "unknown"),
        "protocol": metrics.get("protocol", config.get("protocol", "unknown")),
        "variant": EGEUNetConfig(**model).name,
        "seed": config.get("seed"),
        "epochs": config.get("epochs"),
        "image_size": config.get("image_size"),
        "selection": metrics.get("selection", ""),
        "best_epoch": metrics.get("best_epoch"),
        "num_images": metrics.get("num_images"),
        "num_parameters": metrics.get("num_parameters"),
        "train_seconds": metrics.get("train_seconds"),
    }
    row.update({f"pooled_{k}": v for k, v in metrics.get("pooled", {}).items()})
    row.update({f"image_{k}": v for k, v in metrics.get("per_image", {}).items()})
    row.update(_hashes(config_doc))
    row.update(_split_hashes(config_doc.get("data_folder")))
    return row


def _split_hashes(data_folder: str | None) -> dict[str, str]:
    """SHA-256 of the split manifests (id lists) in the prepared folder a run used."""
    if not data_folder:
        return {}
    found = {}
    for name in ("challenge", "paper"):
        path = Path(data_folder) / "splits" / f"{name}.json"
        if path.is_file():
            found[f"split_{name}_hash"] = sha256_file(path)
    return found


def run_folders(runs_dir: str | Path) -> list[Path]:
    """Sub-folders of ``runs_dir`` that look like run folders (hold config.json or an
    outcome), sorted by name."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted(
        p
        for p in runs_dir.iterdir()
        if p.is_dir() and ((p / "config.json").is_file() or (p / OUTCOME_FILE).is_file())
    )


def collect_runs(runs_dir: str | Path) -> pd.DataFrame:
    """One row per finished run under ``runs_dir``: a run folder with metrics.json whose
    last study outcome, if it has one, is not a failure. (A re-run that failed can leave
    the metrics of an earlier attempt behind; such a run is listed with the failures.)"""
    rows = [
        read_run(p)
        for p in run_folders(runs_dir)
        if (p / "metrics.json").is_file() and _failed_outcome(p) is None
    ]
    table = pd.DataFrame(rows)
    if not table.empty:
        table = _separate_same_model_variants(table)
        table = table.sort_values(["dataset", "protocol", "variant", "seed"]).reset_index(drop=True)
    return table


def _study_label(row: pd.Series) -> str | None:
    """The variant name the study gave a run, read off its id
    ``<dataset>-<protocol>-<variant>-seed<seed>`` (None for other folder names)."""
    prefix, suffix = f"{row['dataset']}-{row['protocol']}-", f"-seed{row['seed']}"
    run_id = str(row["run_id"])
    if run_id.startswith(prefix) and run_id.endswith(suffix):
        return run_id[len(prefix) : -len(suffix)] or None
    return None


def _separate_same_model_variants(table: pd.DataFrame) -> pd.DataFrame:
    """Variants are named after their model, so two study variants with one model and other
    training settings (say ``egeunet`` and ``egeunet-imagenet: {normalization: imagenet}``)
    would be pooled as extra seeds of one variant. Where a model name holds runs of
    several study variants, the runs whose study name differs take that name."""
    labels = table.apply(_study_label, axis=1)
    groups = table.groupby(["dataset", "protocol", "variant"])["run_id"].transform(
        lambda ids: labels[ids.index].nunique()
    )
    rename = (groups > 1) & labels.notna() & (labels != table["variant"])
    table = table.copy()
    table.loc[rename, "variant"] = labels[rename]
    return table


def _failed_outcome(run_dir: Path) -> dict | None:
    """The study runner's outcome of ``run_dir`` if its last attempt failed, else None."""
    path = run_dir / OUTCOME_FILE
    if not path.is_file():
        return None
    outcome = _read_json(path)
    return outcome if outcome.get("status") == "failed" else None


def collect_failures(runs_dir: str | Path) -> pd.DataFrame:
    """Runs whose last outcome (written by the study runner) was a failure."""
    rows = []
    for folder in run_folders(runs_dir):
        outcome = _failed_outcome(folder)
        if outcome is not None:
            rows.append({"run_id": folder.name, "error": outcome.get("error") or ""})
    return pd.DataFrame(rows, columns=["run_id", "error"])


def _per_run_csv(runs: pd.DataFrame, filename: str) -> pd.DataFrame:
    frames = []
    for _, run in runs.iterrows():
        path = Path(run["run_dir"]) / filename
        if path.is_file():
            frame = pd.read_csv(path)
            for key in ("run_id", "dataset", "protocol", "variant", "seed"):
                frame[key] = run[key]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def collect_histories(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's history.csv, stacked, with the run's identity columns."""
    return _per_run_csv(runs, "history.csv")


def collect_per_image(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's per_image.csv, stacked, with the run's identity columns."""
    return _per_run_csv(runs, "per_image.csv")


# ---------------------------------------------------------------- tables


def variant_order(variants: list[str] | pd.Series) -> list[str]:
    """The ablation ladder first (in its order), then any other variant alphabetically."""
    present = list(dict.fromkeys(variants))
    ladder = [v for v in ABLATION_LADDER if v in present]
    return ladder + sorted(v for v in present if v not in ladder)


def _is_percent(column: str) -> bool:
    return column.startswith(PERCENT_PREFIXES)


def _scaled(runs: pd.DataFrame, column: str) -> pd.Series:
    values = pd.to_numeric(runs[column], errors="coerce")
    return 100 * values if _is_percent(column) else values


def main_results(runs: pd.DataFrame, reference: dict, full_model: str = FULL_MODEL) -> pd.DataFrame:
    """Our full model per dataset and protocol, mean and std over seeds for every metric,
    beside the paper's value and the independent re-runs' range (percent)."""
    paper = {
        (r["dataset"], key): r[key]
        for r in reference["paper"]["results"]
        if r["model"] == "EGE-UNet"
        for key in ("miou", "dsc")
    }
    reruns = {r["dataset"]: r for r in reference["reruns"]["results"]}
    rows = []
    full = runs[runs["variant"] == full_model]
    for (dataset, protocol), group in full.groupby(["dataset", "protocol"], sort=True):
        for column, label, convention in MAIN_METRICS:
            if column not in group.columns:
                continue
            values = _scaled(group, column).dropna()
            paper_key = PAPER_KEYS.get(column)
            paper_value = paper.get((dataset, paper_key), math.nan) if paper_key else math.nan
            rerun = reruns.get(dataset, {})
            rows.append(
                {
                    "dataset": dataset,
                    "protocol": protocol,
                    "selection": "; ".join(sorted(set(group["selection"].astype(str)))),
                    "metric": label,
                    "convention": convention,
                    "seeds": len(values),
                    "mean": values.mean() if len(values) else math.nan,
                    "std": values.std(ddof=1) if len(values) > 1 else math.nan,
                    "paper": paper_value,
                    "difference": (values.mean() - paper_value) if len(values) else math.nan,
                    "reruns_min": rerun.get(f"{paper_key}_min", math.nan)
                    if paper_key
                    else math.nan,
                    "reruns_max": rerun.get(f"{paper_key}_max", math.nan)
                    if paper_key
                    else math.nan,
                }
            )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class PairedComparison:
    """A variant against the full model over seeds both have: differences variant - full."""

    pairs: int
    mean_difference: float
    std_difference: float
    t_statistic: float
    p_value: float


def paired_comparison(variant: pd.Series, full: pd.Series) -> PairedComparison:
    """Paired t-test (scipy.stats.ttest_rel) of two per-seed series indexed by seed.
    With fewer than two pairs, or identical differences, the test is undefined (NaN)."""
    joined = pd.concat({"variant": variant, "full": full}, axis=1).dropna()
    differences = joined["variant"] - joined["full"]
    pairs = len(differences)
    mean = differences.mean() if pairs else math.nan
    std = differences.std(ddof=1) if pairs > 1 else math.nan
    if pairs < 2 or not np.isfinite(std) or std == 0:
        return PairedComparison(pairs, mean, std, math.nan, math.nan)
    result = stats.ttest_rel(joined["variant"], joined["full"])
    return PairedComparison(pairs, mean, std, float(result.statistic), float(result.pvalue))


def ablation_table(
    runs: pd.DataFrame, metric: str = "pooled_dsc", full_model: str = FULL_MODEL
) -> pd.DataFrame:
    """Per dataset, protocol and variant: mean and std over seeds of pooled DSC and IoU and
    per-image DSC (percent), parameters, and the paired difference of ``metric`` against the
    full model with its paired t-test."""
    rows = []
    for (dataset, protocol), group in runs.groupby(["dataset", "protocol"], sort=True):
        full = _scaled(group[group["variant"] == full_model].set_index("seed"), metric)
        for variant in variant_order(group["variant"]):
            subset = group[group["variant"] == variant]
            row = {
                "dataset": dataset,
                "protocol": protocol,
                "variant": variant,
                "params": subset["num_parameters"].iloc[0],
                "seeds": len(subset),
            }
            for column in ("pooled_dsc", "pooled_iou", "image_dsc_mean"):
                if column in subset.columns:
                    values = _scaled(subset, column)
                    row[f"{column}_mean"] = values.mean()
                    row[f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            if variant != full_model and not full.empty:
                comparison = paired_comparison(_scaled(subset.set_index("seed"), metric), full)
                row.update(
                    {
                        "pairs": comparison.pairs,
                        "difference_mean": comparison.mean_difference,
                        "difference_std": comparison.std_difference,
                        "t": comparison.t_statistic,
                        "p_value": comparison.p_value,
                    }
                )
            rows.append(row)
    return pd.DataFrame(rows)


def complexity_summary(study_dir: Path) -> pd.DataFrame:
    """The complexity table ``02_complexity`` wrote for the study, or an empty table."""
    path = study_dir / COMPLEXITY_CSV
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


# ---------------------------------------------------------------- formatting


def _mean_std(mean: float, std: float, digits: int = 2) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" if not np.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _number(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and np.isfinite(value) else "–"


def _p_value(value: float) -> str:
    if not np.isfinite(value):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def format_main_results(table: pd.DataFrame) -> pd.DataFrame:
    """The main results for reading: mean ± std strings, the re-runs as a range."""
    if table.empty:
        return table
    return pd.DataFrame(
        {
            "dataset": table["dataset"],
            "protocol": table["protocol"],
            "metric": table["metric"],
            "convention": table["convention"],
            "ours (mean ± sd)": [
                _mean_std(m, s) for m, s in zip(table["mean"], table["std"], strict=True)
            ],
            "seeds": table["seeds"],
            "paper": [_number(v) for v in table["paper"]],
            "ours − paper": [_number(v) for v in table["difference"]],
            "re-runs": [
                f"{_number(lo, 1)}–{_number(hi, 1)}" if np.isfinite(lo) else "–"
                for lo, hi in zip(table["reruns_min"], table["reruns_max"], strict=True)
            ],
        }
    )


def format_ablation(table: pd.DataFrame, metric_label: str = "DSC") -> pd.DataFrame:
    """The ablation table for reading."""
    if table.empty:
        return table
    formatted = pd.DataFrame(
        {
            "dataset": table["dataset"],
            "protocol": table["protocol"],
            "variant": table["variant"],
            "params": [f"{int(p):,}" if pd.notna(p) else "–" for p in table["params"]],
            "seeds": table["seeds"],
        }
    )
    for column, label in (
        ("pooled_dsc", "DSC"),
        ("pooled_iou", "IoU"),
        ("image_dsc_mean", "per-image DSC"),
    ):
        if f"{column}_mean" in table.columns:
            formatted[label] = [
                _mean_std(m, s)
                for m, s in zip(table[f"{column}_mean"], table[f"{column}_std"], strict=True)
            ]
    if "difference_mean" in table.columns:
        formatted[f"Δ{metric_label} vs full"] = [
            _mean_std(m, s)
            for m, s in zip(table["difference_mean"], table["difference_std"], strict=True)
        ]
        formatted["paired t-test p"] = [_p_value(p) for p in table["p_value"]]
    return formatted


COMPLEXITY_FORMATS = {
    "params_total": "{:,.0f}",
    "params_trainable": "{:,.0f}",
    "macs_g": "{:.4f}",
    "fvcore_default_g": "{:.4f}",
    "fvcore_full_g": "{:.4f}",
    "fvcore_flops_g": "{:.4f}",
    "latency_ms_b1": "{:.1f}",
    "latency_ms_b8": "{:.1f}",
}


def format_complexity(table: pd.DataFrame) -> pd.DataFrame:
    """The complexity table for reading: thousands separators, 4 decimals of G, 0.1 ms."""
    formatted = table.copy().astype(object)
    for column, pattern in COMPLEXITY_FORMATS.items():
        if column in formatted.columns:
            formatted[column] = [pattern.format(v) if pd.notna(v) else "–" for v in table[column]]
    return formatted.fillna("–")


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pipe characters in cells escaped)."""
    if table.empty:
        return "_(no rows)_\n"

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "−": "$-$",
    "–": "--",
    "Δ": r"$\Delta$",
}


def latex_escape(text: object) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def latex_table(table: pd.DataFrame) -> str:
    """A booktabs LaTeX tabular of a formatted table, every cell escaped."""
    escaped = table.map(latex_escape) if not table.empty else table
    escaped.columns = [latex_escape(c) for c in table.columns]
    return escaped.to_latex(index=False, escape=False)


def write_table(numbers: pd.DataFrame, readable: pd.DataFrame, tables_dir: Path, name: str) -> None:
    """``<name>.csv`` with the full-precision numbers and ``<name>.tex`` with the readable form."""
    write_text_atomic(tables_dir / f"{name}.csv", numbers.to_csv(index=False))
    write_text_atomic(tables_dir / f"{name}.tex", latex_table(readable))


# ---------------------------------------------------------------- the report


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    markdown_path: Path
    html_path: Path
    tables: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    runs: int = 0
    failures: int = 0


def _figure_section(name: str, title: str, figure, figures_dir: Path, report: Report) -> str:
    paths = figures.save_figure(figure, figures_dir / name)
    report.figures[name] = paths[0]
    return f"![{title}](figures/{paths[0].name})\n\n*{title}* ([SVG](figures/{paths[1].name}))\n"


def data_overview_table(runs_dir: Path) -> pd.DataFrame:
    """Images per split part of every dataset ``01_data`` summarised for the study."""
    rows = []
    for folder in sorted(runs_dir.glob("01_data-*")):
        summary_path = folder / "summary.json"
        if summary_path.is_file():
            summary = _read_json(summary_path)
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
    return pd.DataFrame(rows)


def _setup_section(runs: pd.DataFrame, study_name: str) -> str:
    lines = [
        f"- Study: `{study_name}`; {len(runs)} finished run(s).",
        f"- Generated: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} "
        "from the run folders (regenerate, do not edit).",
    ]
    for column, label in (
        ("epochs", "epochs"),
        ("image_size", "image size"),
        ("seed", "seeds"),
        ("selection", "model selection"),
    ):
        if column in runs.columns:
            values = sorted({str(v) for v in runs[column].dropna()})
            lines.append(f"- {label}: {', '.join(values)}")
    hash_columns = [c for c in runs.columns if "hash" in c]
    if hash_columns:
        lines.append("\nData and split manifests (SHA-256):\n")
        hashes = runs[["dataset", *hash_columns]].drop_duplicates().fillna("–")
        lines.append(markdown_table(hashes))
    return "\n".join(lines) + "\n"


def _write_group_figures(
    runs: pd.DataFrame,
    histories: pd.DataFrame,
    per_image: pd.DataFrame,
    ablation: pd.DataFrame,
    reference: dict,
    figures_dir: Path,
    report: Report,
) -> str:
    sections = []
    for (dataset, protocol), group in runs.groupby(["dataset", "protocol"], sort=True):
        key = f"{dataset}_{protocol}"
        order = variant_order(group["variant"])
        sections.append(f"### {dataset}, {protocol} protocol\n")
        history = (
            histories[(histories["dataset"] == dataset) & (histories["protocol"] == protocol)]
            if not histories.empty
            else histories
        )
        if not history.empty:
            sections.append(
                _figure_section(
                    f"learning_curves_{key}",
                    f"Learning curves per variant ({dataset}, {protocol})",
                    figures.learning_curves(history, order),
                    figures_dir,
                    report,
                )
            )
        sections.append(
            _figure_section(
                f"ablation_{key}",
                f"Pooled DSC per variant, mean ± sd over seeds ({dataset}, {protocol})",
                figures.ablation_bars(group, "pooled_dsc", "pooled DSC", order),
                figures_dir,
                report,
            )
        )
        rows = ablation[(ablation["dataset"] == dataset) & (ablation["protocol"] == protocol)]
        ours = pd.DataFrame(
            {
                "variant": rows["variant"],
                "params": rows["params"],
                "dsc_mean": rows["pooled_dsc_mean"],
                "dsc_std": rows["pooled_dsc_std"],
            }
        )
        sections.append(
            _figure_section(
                f"dsc_vs_params_{key}",
                f"DSC against parameters with reported points ({dataset})",
                figures.dsc_against_parameters(ours, reported_points(reference, dataset)),
                figures_dir,
                report,
            )
        )
        images = (
            per_image[(per_image["dataset"] == dataset) & (per_image["protocol"] == protocol)]
            if not per_image.empty
            else per_image
        )
        if not images.empty and "dsc" in images.columns:
            sections.append(
                _figure_section(
                    f"per_image_dsc_{key}",
                    f"Per-image DSC, all seeds ({dataset}, {protocol})",
                    figures.per_image_distribution(images, order),
                    figures_dir,
                    report,
                )
            )
        cases_section = _cases_section(group, key, figures_dir, report)
        if cases_section:
            sections.append(cases_section)
    return "\n".join(sections)


def _cases_section(group: pd.DataFrame, key: str, figures_dir: Path, report: Report) -> str:
    """The best/median/worst grid of the full model's lowest-seed run that saved cases."""
    candidates = group[group["variant"] == FULL_MODEL].sort_values("seed")
    if candidates.empty:
        candidates = group.sort_values(["variant", "seed"])
    for _, run in candidates.iterrows():
        grid = case_figure(run["run_dir"])
        if grid is not None:
            return _figure_section(
                f"cases_{key}",
                f"Best, median and worst test images of {run['run_id']}",
                grid,
                figures_dir,
                report,
            )
    return ""


def _fresh_dir(path: Path) -> Path:
    """An empty folder at ``path``; only used for the report's own generated folders."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse;margin:1rem 0;font-size:0.9rem}}
th,td{{border:1px solid #ccc;padding:0.25rem 0.5rem;text-align:left}}
img{{max-width:100%}}</style></head><body>
{body}
</body></html>
"""


def build_report(
    study_dir: str | Path, study_name: str | None = None, full_model: str = FULL_MODEL
) -> Report:
    """Regenerate ``<study_dir>/REPORT.md``, ``REPORT.html``, ``tables/`` and ``figures/``
    from the run folders in ``<study_dir>/runs`` and the complexity table of ``02``."""
    study_dir = Path(study_dir)
    runs_dir = study_dir / RUNS_DIR
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir}: no runs folder; run the study first")
    study_name = study_name or study_dir.name
    reference = load_reference_results()
    runs = collect_runs(runs_dir)
    failures = collect_failures(runs_dir)
    tables_dir = _fresh_dir(study_dir / "tables")
    figures_dir = _fresh_dir(study_dir / "figures")
    report = Report(
        study_dir / "REPORT.md", study_dir / "REPORT.html", runs=len(runs), failures=len(failures)
    )

    parts = [f"# Study report: {study_name}\n", "## Setup\n", _setup_section(runs, study_name)]
    data = data_overview_table(runs_dir)
    if not data.empty:
        parts += ["\nImages per split (from `01_data`):\n", markdown_table(data.fillna("–"))]
    if not failures.empty:
        parts += ["## Failed runs\n", markdown_table(failures)]
    if runs.empty:
        parts.append("\nNo finished runs yet.\n")
    else:
        main = main_results(runs, reference, full_model)
        ablation = ablation_table(runs, full_model=full_model)
        write_table(main, format_main_results(main), tables_dir, "main_results")
        write_table(ablation, format_ablation(ablation), tables_dir, "ablation")
        write_table(
            runs.drop(columns=["run_dir"]), runs.drop(columns=["run_dir"]), tables_dir, "runs"
        )
        parts += [
            "## 1. Main results\n",
            f"The full model ({full_model}), mean ± sample sd over seeds, in percent (HD95 in "
            "pixels). *Pooled* = one confusion matrix over every test pixel (the paper's "
            "convention, its 'mIoU' is the lesion IoU); *per image* = mean over images. The "
            "paper's values and the independent re-runs are pooled figures from "
            "`egeunet/reference_results.json`, recalled, not yet checked against the PDF. "
            "Under the paper protocol the checkpoint is selected on the test split itself "
            "(test-set model selection), as the published code does.\n",
            markdown_table(format_main_results(main)),
            "\n## 2. Ablations\n",
            "Mean ± sd over seeds (percent). Δ = variant − full model on pooled DSC, paired by "
            "seed; p from a paired t-test (scipy.stats.ttest_rel). A Wilcoxon signed-rank test "
            "cannot reach p < 0.05 with 5 pairs (its minimum two-sided p is 0.0625), so the "
            "t-test is used; its normality assumption cannot be checked on so few seeds, so "
            "read p as indicative.\n",
            markdown_table(format_ablation(ablation)),
        ]
        report.tables.update(
            {n: tables_dir / f"{n}.csv" for n in ("main_results", "ablation", "runs")}
        )
    complexity = complexity_summary(study_dir)
    parts.append("\n## 3. Complexity\n")
    if complexity.empty:
        parts.append(
            f"No complexity table at `{COMPLEXITY_CSV}`; run `02_complexity` for this study.\n"
        )
    else:
        parts.append(
            "Parameters; convolution multiply-accumulates in the paper's convention "
            "(what it calls GFLOPs); fvcore FLOPs with every op counted; CPU latency "
            "per image (median after warm-up).\n"
        )
        parts.append(markdown_table(format_complexity(complexity)))
        write_table(complexity, format_complexity(complexity), tables_dir, "complexity")
        report.tables["complexity"] = tables_dir / "complexity.csv"
    if not runs.empty:
        parts.append("\n## 4. Figures\n")
        parts.append(
            _write_group_figures(
                runs,
                collect_histories(runs),
                collect_per_image(runs),
                ablation,
                reference,
                figures_dir,
                report,
            )
        )
    text = "\n".join(parts)
    write_text_atomic(report.markdown_path, text)
    body = markdown.markdown(text, extensions=["tables"])
    write_text_atomic(
        report.html_path, HTML_TEMPLATE.format(title=f"Study report: {study_name}", body=body)
    )
    return report
