"""Reference figures: what the paper and independent re-runs report, and how far each is
verified (``egeunet/reference_results.json``).

Every entry there carries a ``source`` and a ``status``: ``verified`` (seen in the named
source), ``third-party`` (seen only where someone else quotes the paper), ``unverified``
(no source found) or ``wrong``. Only verified and third-party figures are ever shown,
each beside its status and source; the others are listed as not shown, with the reason.
"""

from __future__ import annotations

import json
from importlib import resources

import pandas as pd

SHOWN_STATUSES = ("verified", "third-party")
"""Statuses whose figures the report may show (always with the status beside them)."""

REFERENCE_MODEL = "EGE-UNet"
METRIC_KEYS = ("miou", "miou_std", "dsc", "dsc_std")
FIGURE_COLUMNS = [
    "kind",
    "model",
    "dataset",
    *METRIC_KEYS,
    "runs",
    "recipe",
    "note",
    "status",
    "source",
]


def load_reference_results() -> dict:
    """The published and re-run figures (``egeunet/reference_results.json``), each with its
    source and verification status."""
    text = resources.files("egeunet").joinpath("reference_results.json").read_text("utf-8")
    return json.loads(text)


def is_shown(entry: dict) -> bool:
    """Whether an entry's figures may be shown: its status is verified or third-party."""
    return entry.get("status") in SHOWN_STATUSES


def _entries(reference: dict) -> list[tuple[str, dict]]:
    """(kind, entry) for every result entry: the paper's, then the re-runs."""
    return [("paper", e) for e in reference["paper"]["results"]] + [
        ("re-run", e) for e in reference["reruns"]["results"]
    ]


def shown_figures(reference: dict) -> pd.DataFrame:
    """Every shown result entry (verified or third-party) of any model and dataset: kind
    (paper or re-run), model, dataset, IoU/DSC and their std where reported, runs, recipe,
    note, status and source."""
    rows = [
        {"kind": kind, **{k: entry.get(k) for k in FIGURE_COLUMNS if k != "kind"}}
        for kind, entry in _entries(reference)
        if is_shown(entry) and any(key in entry for key in METRIC_KEYS)
    ]
    table = pd.DataFrame(rows, columns=FIGURE_COLUMNS)
    for key in (*METRIC_KEYS, "runs"):
        table[key] = pd.to_numeric(table[key], errors="coerce")
    return table


def reference_figures(reference: dict, dataset: str, model: str = REFERENCE_MODEL) -> pd.DataFrame:
    """The shown figures of ``model`` on ``dataset``: the paper's, then the individual
    re-runs (unverified and wrong entries are left out)."""
    table = shown_figures(reference)
    selected = (table["model"] == model) & (table["dataset"] == dataset)
    return table[selected].reset_index(drop=True)


def paper_figure(reference: dict, dataset: str, metric: str) -> dict | None:
    """The paper's shown mean ``metric`` ("miou" or "dsc") for EGE-UNet on ``dataset``, as
    {value, std, status, source}, or None when the paper's figure is not verified."""
    figures = reference_figures(reference, dataset)
    rows = figures[(figures["kind"] == "paper") & figures[metric].notna()]
    if rows.empty:
        return None
    row = rows.iloc[0]
    std = row[f"{metric}_std"]
    return {
        "value": float(row[metric]),
        "std": float(std) if pd.notna(std) else None,
        "status": row["status"],
        "source": row["source"],
    }


def rerun_figures(reference: dict, dataset: str) -> pd.DataFrame:
    """The individual verified re-runs of EGE-UNet on ``dataset``."""
    figures = reference_figures(reference, dataset)
    return figures[figures["kind"] == "re-run"].reset_index(drop=True)


def withheld_figures(reference: dict) -> pd.DataFrame:
    """Every entry the report does not show (unverified or wrong), without its values:
    what it is, its status, note and source, and the corrected claims."""
    rows = []
    for kind, entry in _entries(reference):
        if not is_shown(entry):
            what = f"{kind}: {entry.get('model', '')} {entry.get('dataset', '')}".strip()
            rows.append(
                {
                    "figure": what,  # its values are not repeated: they are not to be quoted
                    "status": entry["status"],
                    "note": entry.get("note", ""),
                    "source": entry["source"],
                }
            )
    for entry in reference.get("corrections", []):
        rows.append(
            {
                "figure": entry["claim"],
                "status": entry["status"],
                "note": entry.get("note", ""),
                "source": entry["source"],
            }
        )
    return pd.DataFrame(rows, columns=["figure", "status", "note", "source"])


def reported_complexity(reference: dict) -> pd.DataFrame:
    """The model's parameters and "GFLOPs" (convolution MACs) as reported, from shown
    entries only: model, params, gflops, status, source (one row per model)."""
    rows: dict[str, dict] = {}
    for entry in reference["paper"]["complexity"]:
        if not is_shown(entry) or "value" not in entry:
            continue
        row = rows.setdefault(entry["model"], {"model": entry["model"], "sources": []})
        key = {"params": "params", "macs_g": "gflops"}[entry["quantity"]]
        row[key] = entry["value"]
        row["sources"].append(f"{key}: {entry['source']} ({entry['status']})")
    return pd.DataFrame(
        [
            {
                "model": r["model"],
                "params": r.get("params"),
                "gflops": r.get("gflops"),
                "source": "; ".join(r["sources"]),
            }
            for r in rows.values()
            if "params" in r and "gflops" in r
        ],
        columns=["model", "params", "gflops", "source"],
    )


def reported_points(reference: dict, dataset: str) -> pd.DataFrame:
    """Shown DSC figures of EGE-UNet on ``dataset`` that can be drawn against the model's
    verified parameter count: model, label, params, dsc, status, source."""
    params = reported_complexity(reference).set_index("model")["params"]
    figures = reference_figures(reference, dataset)
    figures = figures[figures["dsc"].notna() & figures["model"].isin(params.index)]
    return pd.DataFrame(
        {
            "model": figures["model"],
            "label": [
                f"{kind} ({status})"
                for kind, status in zip(figures["kind"], figures["status"], strict=True)
            ],
            "params": figures["model"].map(params),
            "dsc": figures["dsc"],
            "status": figures["status"],
            "source": figures["source"],
        }
    ).reset_index(drop=True)
