"""Numbers and tables for reading: the report's number formats, each report table in its
readable form (the CSV files keep full precision), Markdown and LaTeX tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

MISSING = "–"


def _finite(value: object) -> bool:
    return isinstance(value, int | float | np.number) and bool(np.isfinite(value))


def number(value: object, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, "–" when missing or not finite."""
    return f"{value:.{digits}f}" if _finite(value) else MISSING


def signed(value: object, digits: int = 2) -> str:
    """``value`` with its sign (+0.40, −1.20), "–" when missing."""
    return f"{value:+.{digits}f}".replace("-", "−") if _finite(value) else MISSING


def mean_sd(mean: object, std: object, digits: int = 2) -> str:
    """ "mean ± sd", or the mean alone when sd is undefined, "–" without a mean."""
    if not _finite(mean):
        return MISSING
    return number(mean, digits) + (f" ± {number(std, digits)}" if _finite(std) else "")


def p_value(value: object) -> str:
    """A p-value for a table: three decimals, "<0.001", or "–" when the test is undefined."""
    if not _finite(value):
        return MISSING
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def integer(value: object) -> str:
    """A count with thousands separators, "–" when missing."""
    return f"{int(value):,}" if _finite(value) else MISSING


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
    "→": r"$\rightarrow$",
}


def latex_escape(text: object) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def latex_table(table: pd.DataFrame) -> str:
    """A booktabs LaTeX tabular of a formatted table, every cell escaped."""
    escaped = table.map(latex_escape) if not table.empty else table
    escaped.columns = [latex_escape(c) for c in table.columns]
    return escaped.to_latex(index=False, escape=False)


# ---------------------------------------------------------------- readable tables


def _mean_sd_column(means: pd.Series, stds: pd.Series, sd_alone: bool = False) -> list[str]:
    """ "mean ± sd" per row; with ``sd_alone``, "sd 0.10" where only the sd is known."""
    return [
        f"sd {number(s)}" if sd_alone and pd.isna(m) and pd.notna(s) else mean_sd(m, s)
        for m, s in zip(means, stds, strict=True)
    ]


def _pairs_columns(table: pd.DataFrame, prefix: str = "", label: str = "Δ") -> dict[str, list]:
    return {
        label: [
            signed(m) + (f" ± {number(s)}" if pd.notna(s) else "")
            for m, s in zip(
                table[f"{prefix}difference_mean"], table[f"{prefix}difference_std"], strict=True
            )
        ],
        "pairs": [integer(v) for v in table[f"{prefix}pairs"]],
        "p": [p_value(v) for v in table[f"{prefix}p_value"]],
    }


def hours(value: object) -> str:
    """Estimated hours, "–" when unknown: "0" for none left, else one decimal."""
    if not _finite(value):
        return MISSING
    return "0" if value == 0 else f"{value:.1f} h"


def format_stage_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Runs per stage by status for reading, with the estimated training time left."""
    shown = summary.drop(columns=["remaining_hours"], errors="ignore")
    if "remaining_hours" in summary:
        shown["training left (est.)"] = [hours(v) for v in summary["remaining_hours"]]
    return shown


def format_status(status: pd.DataFrame) -> pd.DataFrame:
    """Run status for reading: epochs done of planned, resumable marked, training time
    left (estimated) where the table has it."""
    if status.empty:
        return status
    progress = []
    for _, row in status.iterrows():
        planned = row["epochs_planned"]
        text = (
            f"{row['epochs_done']}/{integer(planned)}"
            if pd.notna(planned)
            else str(row["epochs_done"])
        )
        progress.append(text + (" (resumable)" if row["resumable"] else ""))
    shown = pd.DataFrame(
        {
            "stage": status["stage"].replace("", MISSING),
            "run": status["run_id"],
            "status": status["status"],
            "epochs": progress,
        }
    )
    if "remaining_hours" in status:
        shown["training left (est.)"] = [hours(v) for v in status["remaining_hours"]]
    return shown


def format_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """One dataset's comparison for reading: who, protocol, runs, IoU and DSC in both
    conventions, status and source."""
    who = []
    for _, row in table.iterrows():
        if row["kind"] == "ours":
            label = f"ours, {row['protocol']} protocol, {row['epochs']} epochs"
        elif row["kind"] == "paper":
            label = f"paper, {integer(row['runs'])} runs" if pd.notna(row["runs"]) else "paper"
        else:
            label = str(row["kind"])
        who.append(label + (f" ({row['note']})" if row["note"] else ""))
    readable = {"": who, "runs": [integer(v) for v in table["runs"]]}
    for name, label in (
        ("iou", "IoU pooled (paper's mIoU)"),
        ("dsc", "DSC pooled"),
        ("image_iou", "IoU per image"),
        ("image_dsc", "DSC per image"),
    ):
        readable[label] = _mean_sd_column(
            table[f"{name}_mean"], table[f"{name}_std"], sd_alone=True
        )
    readable["status"] = table["status"]
    readable["source"] = table["source"]
    return pd.DataFrame(readable)


def format_main_results(table: pd.DataFrame) -> pd.DataFrame:
    """Every metric of the full model for reading: mean ± sd over seeds."""
    if table.empty:
        return table
    return pd.DataFrame(
        {
            "dataset": table["dataset"],
            "protocol": table["protocol"],
            "metric": table["metric"],
            "convention": table["convention"],
            "mean ± sd": _mean_sd_column(table["mean"], table["std"]),
            "seeds": table["seeds"],
        }
    )


def format_ablation(table: pd.DataFrame) -> pd.DataFrame:
    """The ablation ladder for reading: size, scores, step and full-model differences."""
    if table.empty:
        return table
    readable = {
        "dataset": table["dataset"],
        "protocol": table["protocol"],
        "variant": table["variant"],
        "params": [integer(p) for p in table["params"]],
        "MACs (G)": [number(m, 4) for m in table["macs_g"]],
        "seeds": table["seeds"],
    }
    for column, label in (
        ("pooled_dsc", "DSC"),
        ("pooled_iou", "IoU"),
        ("image_dsc_mean", "per-image DSC"),
    ):
        if f"{column}_mean" in table.columns:
            readable[label] = _mean_sd_column(table[f"{column}_mean"], table[f"{column}_std"])
    formatted = pd.DataFrame(readable)
    if "step_difference_mean" in table.columns:
        step = _pairs_columns(table, "step_")
        formatted["ΔDSC vs rung below"] = step["Δ"]
        formatted["p (step)"] = step["p"]
    if "difference_mean" in table.columns:
        full = _pairs_columns(table)
        formatted["ΔDSC vs full"] = full["Δ"]
        formatted["p (vs full)"] = full["p"]
    return formatted.fillna(MISSING)


def format_protocols(table: pd.DataFrame) -> pd.DataFrame:
    """Paper against clean protocol for reading."""
    pairs = _pairs_columns(table, label="paper − clean")
    return pd.DataFrame(
        {
            "dataset": table["dataset"],
            "metric": table["metric"],
            "paper (test-set selection)": _mean_sd_column(table["paper_mean"], table["paper_std"]),
            "clean (validation selection)": _mean_sd_column(
                table["clean_mean"], table["clean_std"]
            ),
            **pairs,
            "train images paper / clean": [
                f"{integer(a)} / {integer(b)}"
                for a, b in zip(
                    table["paper_train_images"], table["clean_train_images"], strict=True
                )
            ],
            "clean selects on": table["clean_selection_on"],
        }
    )


def format_selection(table: pd.DataFrame) -> pd.DataFrame:
    """Selected checkpoint against last epoch (paper protocol) for reading."""
    return pd.DataFrame(
        {
            "dataset": table["dataset"],
            "seeds": table["seeds"],
            "selected on the test split": _mean_sd_column(
                table["selected_mean"], table["selected_std"]
            ),
            "last epoch (no selection)": _mean_sd_column(
                table["last_epoch_mean"], table["last_epoch_std"]
            ),
            "best epoch by DSC (oracle)": _mean_sd_column(
                table["oracle_mean"], table["oracle_std"]
            ),
            "mean selected epoch": [number(v, 1) for v in table["best_epoch_mean"]],
            **_pairs_columns(table, label="selected − last"),
        }
    )


def format_budget(table: pd.DataFrame) -> pd.DataFrame:
    """Longer budgets against the declared one for reading."""
    return pd.DataFrame(
        {
            "dataset": table["dataset"],
            "protocol": table["protocol"],
            "run(s)": [
                f"{v}: {e} epochs, {s} seed(s)"
                for v, e, s in zip(table["variant"], table["epochs"], table["seeds"], strict=True)
            ],
            "DSC": _mean_sd_column(table["dsc_mean"], table["dsc_std"]),
            "against": [
                f"{v}: {e} epochs, {s} seed(s)"
                for v, e, s in zip(
                    table["base_variant"], table["base_epochs"], table["base_seeds"], strict=True
                )
            ],
            "DSC ": _mean_sd_column(table["base_dsc_mean"], table["base_dsc_std"]),
            "Δ of means": [signed(v) for v in table["difference_of_means"]],
            "Δ same seed": [
                signed(m) if n else MISSING
                for m, n in zip(table["difference_mean"], table["pairs"], strict=True)
            ],
            "its val. DSC at the shorter budget": [
                number(v) for v in table["val_dsc_at_base_epochs"]
            ],
            "selected epoch": [number(v, 0) for v in table["best_epoch_mean"]],
        }
    )


def format_per_image(table: pd.DataFrame) -> pd.DataFrame:
    """Per-image DSC summary for reading."""
    return pd.DataFrame(
        {
            "dataset": table["dataset"],
            "protocol": table["protocol"],
            "variant": table["variant"],
            "seeds": table["seeds"],
            "images": table["images"],
            "mean": [number(v) for v in table["mean"]],
            "median": [number(v) for v in table["median"]],
            "10th percentile": [number(v) for v in table["p10"]],
            "images below 50 (%)": [number(v, 1) for v in table["share_below_50"]],
        }
    )


def format_cost(table: pd.DataFrame) -> pd.DataFrame:
    """What each run cost, for reading."""
    return pd.DataFrame(
        {
            "run": table["run_id"],
            "status": table["status"],
            "epochs": table["epochs_done"],
            "wall time (h)": [number(v) for v in table["wall_hours"]],
            "train images/s (median)": [number(v, 1) for v in table["images_per_second"]],
            "hardware": table["hardware"].replace("", MISSING),
            "torch": table["torch"].replace("", MISSING),
            "commit": [str(c)[:10] or MISSING for c in table["commit"].fillna("")],
        }
    )


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
            formatted[column] = [
                pattern.format(v) if pd.notna(v) else MISSING for v in table[column]
            ]
    return formatted.fillna(MISSING)


def format_references(table: pd.DataFrame) -> pd.DataFrame:
    """Every shown reference figure with its status and source."""
    return pd.DataFrame(
        {
            "kind": table["kind"],
            "model": table["model"],
            "dataset": table["dataset"],
            "mIoU": _mean_sd_column(table["miou"], table["miou_std"], sd_alone=True),
            "DSC": _mean_sd_column(table["dsc"], table["dsc_std"]),
            "runs": [integer(v) for v in table["runs"]],
            "note": [
                "; ".join(str(v) for v in (r, n) if pd.notna(v))
                for r, n in zip(table["recipe"], table["note"], strict=True)
            ],
            "status": table["status"],
            "source": table["source"],
        }
    )
