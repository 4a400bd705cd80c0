"""The study report's tables, computed from the finished runs (pandas, numbers only).

Metrics are in percent (HD95 in pixels). *Pooled* = one confusion matrix over every test
pixel (the paper's convention, its "mIoU" is the lesion IoU); *per image* = the mean over
images. Runs are paired by seed wherever two sets of runs are compared (same dataset,
same seeds): ablation variants against the full model and against the rung below them,
``paper`` against ``clean`` protocol, a longer budget against the declared one.

Significance: paired t-test over seeds (``scipy.stats.ttest_rel``). A Wilcoxon
signed-rank test was considered and rejected: with 3 to 5 seeds its smallest attainable
two-sided p-value is 2/2^n (0.25 with 3 seeds, 0.0625 with 5), so it could never reach
0.05. The t-test assumes roughly normal seed-to-seed differences, which so few pairs cannot
verify; the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from egeunet import study_runs
from egeunet.cases import CASE_LABELS, pick_cases
from egeunet.engine import TEST_SELECTION, TrainConfig
from egeunet.metrics import METRICS, metric_for_column
from egeunet.model import EGEUNetConfig
from egeunet.references import reference_figures
from egeunet.runfolder import RunFolder

FULL_MODEL = EGEUNetConfig().name
"""Variant name of the published model, the one every ablation is compared with."""

ABLATION_LADDER = ("unet", "unet+ghpa", "unet+ghpa+gab", FULL_MODEL)
"""The paper's macro ablation ladder, in the order tables and figures show it."""

PUBLISHED_EPOCHS = TrainConfig().epochs
"""The published recipe's training length."""

COMPLEXITY_CSV = Path("runs") / "02_complexity" / "complexity.csv"
"""Where ``02_complexity`` writes its table, relative to the study folder."""

# (column in the runs table, label, convention) for the main results table.
MAIN_METRICS = tuple(
    (m.run_column, m.titled, m.reduction.replace("_", " ")) for m in METRICS if m.main_table
)
# (runs column, comparison-table column) of the headline metrics, both conventions.
HEADLINE_METRICS = (
    ("pooled_iou", "iou"),
    ("pooled_dsc", "dsc"),
    ("image_iou_mean", "image_iou"),
    ("image_dsc_mean", "image_dsc"),
)
# Metrics of the paired comparisons: (runs column, label).
PAIRED_METRICS = (
    ("pooled_dsc", "DSC (pooled)"),
    ("pooled_iou", "IoU (pooled)"),
    ("image_dsc_mean", "DSC (per image)"),
)


# ---------------------------------------------------------------- helpers


def variant_order(variants: list[str] | pd.Series) -> list[str]:
    """The ablation ladder first (in its order), then any other variant alphabetically."""
    present = list(dict.fromkeys(variants))
    ladder = [v for v in ABLATION_LADDER if v in present]
    return ladder + sorted(v for v in present if v not in ladder)


def _scaled(runs: pd.DataFrame, column: str) -> pd.Series:
    """A metric column as numbers, in percent where it is a ratio."""
    values = pd.to_numeric(runs[column], errors="coerce")
    metric = metric_for_column(column)
    return metric.shown(values) if metric is not None else values


def _mean_sd(values: pd.Series) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN where undefined)."""
    values = values.dropna()
    mean = values.mean() if len(values) else math.nan
    return mean, (values.std(ddof=1) if len(values) > 1 else math.nan)


def model_variants(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of the model variants (study name = model name), without the study variants
    that change only training settings (e.g. ``egeunet-300ep``): those are compared on
    their own, never pooled with or ranked against the model ablations."""
    return runs[runs["variant"] == runs["model"]]


def budget_sentence(epochs: int, t_max: int | None, eta_min: float | None) -> str:
    """The training budget in words, against the published cosine schedule."""
    if t_max is None or not np.isfinite(t_max):
        return f"{epochs} epochs"
    t_max = int(t_max)
    floor = f"eta_min {eta_min:g}" if eta_min is not None and np.isfinite(eta_min) else "eta_min"
    if epochs == t_max:
        text = (
            f"{epochs} epochs, one full cycle of the published cosine schedule (T_max {t_max}: "
            f"the learning rate reaches {floor} at epoch {t_max})"
        )
    elif epochs < t_max:
        text = (
            f"{epochs} epochs, stopped before the cosine schedule (T_max {t_max}) reaches {floor}"
        )
    else:
        text = (
            f"{epochs} epochs with T_max {t_max} (the cosine rate reaches {floor} at epoch "
            f"{t_max}, climbs back and is at its floor every {2 * t_max} epochs)"
        )
    if epochs == PUBLISHED_EPOCHS:
        text += ", the published recipe's full length"
    return text


def budget_statement(runs: pd.DataFrame) -> str:
    """ "Budget: ..." for every distinct (epochs, T_max, eta_min) of ``runs``, read from
    their config.json, with the published length beside it when it differs."""
    if runs.empty or "epochs" not in runs:
        return ""
    columns = [c for c in ("epochs", "t_max", "eta_min") if c in runs.columns]
    budgets = runs[columns].drop_duplicates().sort_values("epochs")
    sentences = [
        budget_sentence(int(row["epochs"]), row.get("t_max"), row.get("eta_min"))
        for _, row in budgets.iterrows()
        if pd.notna(row["epochs"])
    ]
    text = "Budget: " + "; ".join(sentences)
    if not (budgets["epochs"] == PUBLISHED_EPOCHS).all():
        text += f". The published recipe trains {PUBLISHED_EPOCHS} epochs"
    return text + "."


# ---------------------------------------------------------------- paired comparisons


@dataclass(frozen=True)
class PairedComparison:
    """Two sets of runs over the seeds both have: differences ``a - b``."""

    pairs: int
    mean_difference: float
    std_difference: float
    t_statistic: float
    p_value: float


def paired_comparison(a: pd.Series, b: pd.Series) -> PairedComparison:
    """Paired t-test (scipy.stats.ttest_rel) of two per-seed series indexed by seed.
    With fewer than two pairs, or identical differences, the test is undefined (NaN)."""
    joined = pd.concat({"a": a, "b": b}, axis=1).dropna()
    differences = joined["a"] - joined["b"]
    pairs = len(differences)
    mean = differences.mean() if pairs else math.nan
    std = differences.std(ddof=1) if pairs > 1 else math.nan
    if pairs < 2 or not np.isfinite(std) or std == 0:
        return PairedComparison(pairs, mean, std, math.nan, math.nan)
    result = stats.ttest_rel(joined["a"], joined["b"])
    return PairedComparison(pairs, mean, std, float(result.statistic), float(result.pvalue))


def _comparison_columns(comparison: PairedComparison, prefix: str = "") -> dict:
    return {
        f"{prefix}pairs": comparison.pairs,
        f"{prefix}difference_mean": comparison.mean_difference,
        f"{prefix}difference_std": comparison.std_difference,
        f"{prefix}t": comparison.t_statistic,
        f"{prefix}p_value": comparison.p_value,
    }


def _by_seed(runs: pd.DataFrame, column: str) -> pd.Series:
    return _scaled(runs.set_index("seed"), column)


# ---------------------------------------------------------------- results


def main_results(runs: pd.DataFrame, full_model: str = FULL_MODEL) -> pd.DataFrame:
    """The full model per dataset and protocol: mean and sd over seeds of every metric,
    both conventions (percent; HD95 in pixels), with the epochs it trained."""
    rows = []
    full = runs[runs["variant"] == full_model]
    for (dataset, protocol), group in full.groupby(["dataset", "protocol"], sort=True):
        for column, label, convention in MAIN_METRICS:
            if column not in group.columns:
                continue
            values = _scaled(group, column).dropna()
            mean, std = _mean_sd(values)
            rows.append(
                {
                    "dataset": dataset,
                    "protocol": protocol,
                    "selection": "; ".join(sorted(set(group["selection"].astype(str)))),
                    "epochs": "; ".join(str(e) for e in sorted(set(group["epochs"]))),
                    "metric": label,
                    "convention": convention,
                    "seeds": len(values),
                    "mean": mean,
                    "std": std,
                }
            )
    return pd.DataFrame(rows)


def _protocol_order(protocols: pd.Series) -> list[str]:
    """``paper`` first (the published figures compare with it), then the others."""
    present = sorted(set(protocols))
    return [p for p in ("paper", "clean") if p in present] + [
        p for p in present if p not in ("paper", "clean")
    ]


def comparison_table(
    runs: pd.DataFrame, reference: dict, full_model: str = FULL_MODEL
) -> pd.DataFrame:
    """Per dataset: our full model per protocol (mean and sd over seeds, pooled and
    per-image IoU and DSC), then the paper's shown figures and each verified re-run, every
    reference row with its status and source. Reference figures are pooled and selected
    on the split they are scored on, like our ``paper`` protocol."""
    rows = []
    full = runs[runs["variant"] == full_model]
    for dataset in sorted(set(full["dataset"])):
        ours = full[full["dataset"] == dataset]
        for protocol in _protocol_order(ours["protocol"]):
            group = ours[ours["protocol"] == protocol]
            row = {
                "dataset": dataset,
                "kind": "ours",
                "protocol": protocol,
                "selection": "; ".join(sorted(set(group["selection"].astype(str)))),
                "runs": len(group),
                "epochs": "; ".join(str(e) for e in sorted(set(group["epochs"]))),
                "status": "this study",
                "source": "tables/runs.csv",
                "note": f"seeds {', '.join(str(s) for s in sorted(group['seed']))}",
            }
            for column, name in HEADLINE_METRICS:
                values = _scaled(group, column) if column in group else pd.Series(dtype=float)
                row[f"{name}_mean"], row[f"{name}_std"] = _mean_sd(values)
            rows.append(row)
        for _, figure in reference_figures(reference, dataset).iterrows():
            note = "; ".join(str(v) for v in (figure["recipe"], figure["note"]) if pd.notna(v))
            rows.append(
                {
                    "dataset": dataset,
                    "kind": figure["kind"],
                    "protocol": "as published (selection on the scored split)",
                    "selection": TEST_SELECTION,
                    "runs": figure["runs"],
                    "epochs": "",
                    "status": figure["status"],
                    "source": figure["source"],
                    "note": note,
                    "iou_mean": figure["miou"],
                    "iou_std": figure["miou_std"],
                    "dsc_mean": figure["dsc"],
                    "dsc_std": figure["dsc_std"],
                }
            )
    columns = ["dataset", "kind", "protocol", "selection", "runs", "epochs"]
    columns += [f"{name}_{stat}" for _, name in HEADLINE_METRICS for stat in ("mean", "std")]
    return pd.DataFrame(rows, columns=[*columns, "status", "source", "note"])


def _complexity_lookup(complexity: pd.DataFrame) -> pd.DataFrame:
    if complexity.empty or "variant" not in complexity:
        return pd.DataFrame(columns=["params_total", "macs_g"])
    return complexity.drop_duplicates("variant").set_index("variant")


def ablation_table(
    runs: pd.DataFrame,
    complexity: pd.DataFrame | None = None,
    metric: str = "pooled_dsc",
    full_model: str = FULL_MODEL,
) -> pd.DataFrame:
    """The ablation ladder per dataset and protocol that has more than one model variant:
    mean and sd over seeds of pooled DSC and IoU and per-image DSC (percent), parameters and
    convolution MACs (from ``02_complexity``), and two paired differences of ``metric``
    with their t-tests: against the rung below (``step_*``) and against the full model.
    Study variants that change only training settings (``egeunet-300ep``) are left out."""
    lookup = _complexity_lookup(complexity if complexity is not None else pd.DataFrame())
    rows = []
    variants = model_variants(runs)
    for (dataset, protocol), group in variants.groupby(["dataset", "protocol"], sort=True):
        order = variant_order(group["variant"])
        if len(order) < 2:
            continue
        full = _by_seed(group[group["variant"] == full_model], metric)
        ladder = [v for v in order if v in ABLATION_LADDER]
        for variant in order:
            subset = group[group["variant"] == variant]
            known = variant in lookup.index
            row = {
                "dataset": dataset,
                "protocol": protocol,
                "variant": variant,
                "seeds": len(subset),
                "params": lookup.loc[variant, "params_total"]
                if known
                else subset["num_parameters"].iloc[0],
                "macs_g": lookup.loc[variant, "macs_g"] if known else math.nan,
            }
            for column, _ in PAIRED_METRICS:
                if column in subset.columns:
                    row[f"{column}_mean"], row[f"{column}_std"] = _mean_sd(_scaled(subset, column))
            position = ladder.index(variant) if variant in ladder else 0
            if position > 0:
                below = ladder[position - 1]
                step = paired_comparison(
                    _by_seed(subset, metric), _by_seed(group[group["variant"] == below], metric)
                )
                row.update(step_from=below, **_comparison_columns(step, "step_"))
            if variant != full_model and not full.empty:
                row.update(_comparison_columns(paired_comparison(_by_seed(subset, metric), full)))
            rows.append(row)
    return pd.DataFrame(rows)


def protocol_table(runs: pd.DataFrame, full_model: str = FULL_MODEL) -> pd.DataFrame:
    """How much test-set model selection inflates the figures: per dataset with both
    protocols, the full model's ``paper`` (checkpoint selected on the test split) against
    ``clean`` (selected on held-out validation data), paired by seed, difference paper -
    clean per metric with its paired t-test, and the training images each protocol had."""
    rows = []
    full = runs[runs["variant"] == full_model]
    for dataset, group in full.groupby("dataset", sort=True):
        paper, clean = (group[group["protocol"] == p] for p in ("paper", "clean"))
        if paper.empty or clean.empty:
            continue
        for column, label in PAIRED_METRICS:
            if column not in group.columns:
                continue
            row = {"dataset": dataset, "metric": label}
            row["paper_mean"], row["paper_std"] = _mean_sd(_scaled(paper, column))
            row["clean_mean"], row["clean_std"] = _mean_sd(_scaled(clean, column))
            comparison = paired_comparison(_by_seed(paper, column), _by_seed(clean, column))
            row.update(_comparison_columns(comparison))
            row["paper_train_images"] = paper["train_images"].max()
            row["clean_train_images"] = clean["train_images"].max()
            row["clean_selection_on"] = "; ".join(sorted(set(clean["validation_source"])))
            rows.append(row)
    return pd.DataFrame(rows)


def selection_table(
    runs: pd.DataFrame, histories: pd.DataFrame, full_model: str = FULL_MODEL
) -> pd.DataFrame:
    """Within the ``paper`` runs, whose validation split is the test split: the pooled
    DSC of the checkpoint selected on it (lowest loss) against the last epoch's model,
    which no selection touched, and against the best epoch by DSC (an oracle), per dataset,
    mean and sd over seeds, with the paired selected - last difference."""
    rows = []
    if histories.empty or "val_dsc" not in histories:
        return pd.DataFrame()
    paper = runs[(runs["variant"] == full_model) & (runs["protocol"] == "paper")]
    for dataset, group in paper.groupby("dataset", sort=True):
        history = histories[histories["run_id"].isin(group["run_id"])]
        last = history.sort_values("epoch").groupby("seed")["val_dsc"].last() * 100
        oracle = history.groupby("seed")["val_dsc"].max() * 100
        selected = _by_seed(group, "pooled_dsc")
        row = {"dataset": dataset, "seeds": len(group)}
        for name, values in (("selected", selected), ("last_epoch", last), ("oracle", oracle)):
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_sd(values)
        row["best_epoch_mean"] = pd.to_numeric(group["best_epoch"]).mean()
        row["epochs"] = int(group["epochs"].max())
        row.update(_comparison_columns(paired_comparison(selected, last)))
        rows.append(row)
    return pd.DataFrame(rows)


def budget_table(runs: pd.DataFrame, histories: pd.DataFrame) -> pd.DataFrame:
    """Study variants that train their model for another number of epochs (e.g.
    ``egeunet-300ep``) against that model's runs at the declared budget, same dataset and
    protocol: pooled DSC of each, the difference of means and paired by seed, and the
    longer runs' validation DSC at the epoch where the declared budget ends."""
    rows = []
    base_runs = model_variants(runs)
    for (dataset, protocol, variant), group in runs.groupby(
        ["dataset", "protocol", "variant"], sort=True
    ):
        model = group["model"].iloc[0]
        if variant == model:
            continue
        base = base_runs[
            (base_runs["dataset"] == dataset)
            & (base_runs["protocol"] == protocol)
            & (base_runs["variant"] == model)
        ]
        if base.empty or set(base["epochs"]) == set(group["epochs"]):
            continue
        base_epochs = int(base["epochs"].max())
        row = {
            "dataset": dataset,
            "protocol": protocol,
            "variant": variant,
            "epochs": int(group["epochs"].max()),
            "seeds": len(group),
            "base_variant": model,
            "base_epochs": base_epochs,
            "base_seeds": len(base),
            "best_epoch_mean": pd.to_numeric(group["best_epoch"]).mean(),
        }
        row["dsc_mean"], row["dsc_std"] = _mean_sd(_scaled(group, "pooled_dsc"))
        row["base_dsc_mean"], row["base_dsc_std"] = _mean_sd(_scaled(base, "pooled_dsc"))
        row["difference_of_means"] = row["dsc_mean"] - row["base_dsc_mean"]
        paired = paired_comparison(_by_seed(group, "pooled_dsc"), _by_seed(base, "pooled_dsc"))
        row.update(_comparison_columns(paired))
        at_budget = math.nan
        if not histories.empty and "val_dsc" in histories:
            history = histories[histories["run_id"].isin(group["run_id"])]
            at_budget = 100 * history.loc[history["epoch"] == base_epochs, "val_dsc"].mean()
        row["val_dsc_at_base_epochs"] = at_budget
        rows.append(row)
    return pd.DataFrame(rows)


def per_image_summary(per_image: pd.DataFrame) -> pd.DataFrame:
    """Per-image DSC per dataset, protocol and variant, all seeds' test images together
    (percent): images, mean, median, 10th percentile and the share of images below 50."""
    if per_image.empty or "dsc" not in per_image:
        return pd.DataFrame()
    rows = []
    for (dataset, protocol, variant), group in per_image.groupby(
        ["dataset", "protocol", "variant"], sort=True
    ):
        dsc = 100 * pd.to_numeric(group["dsc"], errors="coerce").dropna()
        rows.append(
            {
                "dataset": dataset,
                "protocol": protocol,
                "variant": variant,
                "seeds": group["seed"].nunique(),
                "images": len(dsc),
                "mean": dsc.mean(),
                "median": dsc.median(),
                "p10": dsc.quantile(0.1),
                "share_below_50": 100 * (dsc < 50).mean(),
            }
        )
    table = pd.DataFrame(rows)
    order = {v: i for i, v in enumerate(variant_order(table["variant"]))}
    return table.sort_values(
        ["dataset", "protocol", "variant"], key=lambda c: c.map(order) if c.name == "variant" else c
    ).reset_index(drop=True)


def cases_table(runs: pd.DataFrame, full_model: str = FULL_MODEL) -> pd.DataFrame:
    """The best, median and worst test image (by per-image DSC) of the full model's
    lowest-seed run per dataset and protocol, read from its per_image.csv (so it works
    without the pixels of ``cases.npz``)."""
    rows = []
    full = runs[runs["variant"] == full_model]
    for (dataset, protocol), group in full.groupby(["dataset", "protocol"], sort=True):
        for _, run in group.sort_values("seed").iterrows():
            path = RunFolder(Path(run["run_dir"])).per_image
            if not path.is_file():
                continue
            per_image = pd.read_csv(path)
            chosen = pick_cases(per_image)
            scores = per_image.set_index("id")["dsc"]
            rows += [
                {
                    "dataset": dataset,
                    "protocol": protocol,
                    "run_id": run["run_id"],
                    "case": label,
                    "id": chosen[label],
                    "dsc": 100 * float(scores[chosen[label]]),
                }
                for label in CASE_LABELS
            ]
            break
    return pd.DataFrame(rows, columns=["dataset", "protocol", "run_id", "case", "id", "dsc"])


COST_COLUMNS = [
    "run_id",
    "stage",
    "status",
    "epochs_done",
    "wall_hours",
    "images_per_second",
    "hardware",
    "torch",
    "commit",
]


def cost_table(status: pd.DataFrame) -> pd.DataFrame:
    """What every run that trained at least one epoch cost: training wall time (hours,
    the sum of its epochs' seconds), median training images per second, hardware."""
    if status.empty:
        return pd.DataFrame(columns=COST_COLUMNS)
    trained = status[status["epochs_done"] > 0]
    return trained[COST_COLUMNS].reset_index(drop=True)


def total_compute(status: pd.DataFrame) -> dict[str, float]:
    """Training wall hours of every run together, and core-hours (hours x the most threads
    the run had: exact for a run that kept its arrangement, an upper bound for one resumed
    with more threads)."""
    if status.empty:
        return {"runs": 0, "wall_hours": 0.0, "core_hours": 0.0}
    hours = status["wall_hours"].fillna(0)
    threads = pd.to_numeric(status["threads"], errors="coerce").fillna(1)
    return {
        "runs": int((status["epochs_done"] > 0).sum()),
        "wall_hours": float(hours.sum()),
        "core_hours": float((hours * threads).sum()),
    }


def complexity_summary(study_dir: Path) -> pd.DataFrame:
    """The complexity table ``02_complexity`` wrote for the study, or an empty table."""
    path = study_dir / COMPLEXITY_CSV
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


# ---------------------------------------------------------------- all tables of a study


@dataclass
class StudyTables:
    """Every table of a study's report, computed from its folder (and study file)."""

    runs: pd.DataFrame
    failures: pd.DataFrame
    status: pd.DataFrame
    with_study_file: bool
    histories: pd.DataFrame
    per_image: pd.DataFrame
    complexity: pd.DataFrame
    main: pd.DataFrame
    comparison: pd.DataFrame
    ablation: pd.DataFrame
    protocols: pd.DataFrame
    selection: pd.DataFrame
    budget: pd.DataFrame
    per_image_summary: pd.DataFrame
    cases: pd.DataFrame
    cost: pd.DataFrame
    total: dict


def compute_tables(
    study_dir: Path,
    reference: dict,
    study_file: str | Path | None = None,
    full_model: str = FULL_MODEL,
) -> StudyTables:
    """Read ``<study_dir>/runs`` (and the study file, for the runs still to come) and
    compute every table of the report."""
    runs_dir = study_dir / "runs"
    runs = study_runs.collect_runs(runs_dir)
    status = study_runs.study_status(runs_dir, study_file)
    histories = study_runs.collect_histories(runs) if not runs.empty else pd.DataFrame()
    per_image = study_runs.collect_per_image(runs) if not runs.empty else pd.DataFrame()
    complexity = complexity_summary(study_dir)
    finished = not runs.empty

    def when_finished(table: Callable[..., pd.DataFrame], *args: object) -> pd.DataFrame:
        return table(*args) if finished else pd.DataFrame()

    return StudyTables(
        runs=runs,
        failures=study_runs.collect_failures(runs_dir),
        status=status,
        with_study_file=study_file is not None,
        histories=histories,
        per_image=per_image,
        complexity=complexity,
        main=when_finished(main_results, runs, full_model),
        comparison=when_finished(comparison_table, runs, reference, full_model),
        ablation=when_finished(ablation_table, runs, complexity, "pooled_dsc", full_model),
        protocols=when_finished(protocol_table, runs, full_model),
        selection=when_finished(selection_table, runs, histories, full_model),
        budget=when_finished(budget_table, runs, histories),
        per_image_summary=per_image_summary(per_image),
        cases=when_finished(cases_table, runs, full_model),
        cost=cost_table(status),
        total=total_compute(status),
    )
