"""The report's "Findings": a few plain sentences generated from the study's tables.

:func:`findings` turns :class:`egeunet.report_tables.StudyTables` into bullet points and
the numbers behind them; the report puts them at its top and writes them to
``findings.md`` (for the README to quote or link) and ``findings.json``. Nothing here is
typed by hand: each sentence appears only when its numbers exist, and says so when a
stage has not produced them yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from egeunet.references import paper_figure, rerun_figures
from egeunet.report_format import MISSING, mean_sd, number, p_value, signed
from egeunet.report_tables import (
    ABLATION_LADDER,
    FULL_MODEL,
    StudyTables,
    budget_statement,
)
from egeunet.study_runs import DONE, NOT_IN_STUDY

HEADLINE_NUMBERS = (
    "runs",
    "dsc_mean",
    "dsc_std",
    "iou_mean",
    "iou_std",
    "image_dsc_mean",
    "image_dsc_std",
)
DATASET_NAMES = {"isic2017": "ISIC 2017", "isic2018": "ISIC 2018"}


def dataset_name(dataset: str) -> str:
    """The dataset as a reader knows it (``isic2017`` -> ``ISIC 2017``)."""
    return DATASET_NAMES.get(dataset, dataset)


def _p(value: float) -> str:
    """A p-value in a sentence: "p = 0.031", "p < 0.001" or "p undefined"."""
    text = p_value(value)
    return "p undefined" if text == MISSING else "p < 0.001" if text == "<0.001" else f"p = {text}"


def _seeds(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def _plain(value: object) -> object:
    """``value`` with numpy scalars (nested in dicts and lists) as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


@dataclass
class Findings:
    """The findings as bullet points (Markdown) and the numbers behind them."""

    bullets: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        """Bullets and numbers with numpy scalars as plain Python values."""
        return {"bullets": self.bullets, "numbers": _plain(self.numbers)}

    def markdown(self, heading: str = "## Findings", link: str | None = None) -> str:
        lines = [heading, ""]
        lines += [f"- {bullet}" for bullet in self.bullets]
        if link:
            lines += ["", f"Tables, figures and every number's source: [the full report]({link})."]
        return "\n".join(lines) + "\n"


def _status_bullet(tables: StudyTables, findings: Findings) -> None:
    status = tables.status
    done = int((status["status"] == DONE).sum()) if not status.empty else 0
    findings.numbers["runs_done"] = done
    if not tables.with_study_file:
        findings.bullets.append(
            f"{done} finished training run(s) found; without the study file the runs still "
            "to come are not known (see *Run status*)."
        )
        return
    planned = status[status["stage"] != NOT_IN_STUDY]
    planned_done = int((planned["status"] == DONE).sum())
    total = len(planned)
    findings.numbers["runs_planned"] = total
    stages = []
    for stage, group in planned.groupby("stage", sort=False):
        finished = int((group["status"] == DONE).sum())
        stages.append(f"{stage}: {finished}/{len(group)}")
    text = f"Progress: {planned_done} of {total} planned runs done ({'; '.join(stages)})."
    if planned_done < total:
        text += " Findings cover the finished runs only and will change as the others finish."
    findings.bullets.append(text)


def _reference_clause(dataset: str, ours_dsc: float, reference: dict) -> tuple[str, dict]:
    """What the paper and the verified re-runs report for ``dataset``, against our mean
    pooled DSC (paper protocol)."""
    numbers: dict = {}
    parts = []
    paper = paper_figure(reference, dataset, "dsc")
    if paper is None:
        parts.append(
            f"the paper's own {dataset_name(dataset)} figure could not be verified (no source "
            "found), so it is not compared"
        )
    else:
        difference = ours_dsc - paper["value"]
        numbers.update(paper_dsc=paper["value"], ours_minus_paper=difference)
        parts.append(
            f"the paper reports DSC {mean_sd(paper['value'], paper['std'])} ({paper['status']}: "
            f"{paper['source']}); ours is {number(abs(difference))} points "
            f"{'above' if difference > 0 else 'below'} it"
        )
    reruns = rerun_figures(reference, dataset).dropna(subset=["dsc"])
    if not reruns.empty:
        listed = ", ".join(
            f"{number(row['dsc'])} ({row['source']}"
            + (f"; {row['note']}" if isinstance(row["note"], str) else "")
            + ")"
            for _, row in reruns.iterrows()
        )
        low, high = reruns["dsc"].min(), reruns["dsc"].max()
        where = "within" if low <= ours_dsc <= high else "above" if ours_dsc > high else "below"
        numbers.update(reruns_dsc=list(reruns["dsc"]), ours_vs_reruns=where)
        parts.append(
            f"single independent re-runs (verified) scored DSC {listed}: ours is {where} "
            "their range"
        )
    return "; ".join(parts), numbers


def _headline_bullets(tables: StudyTables, reference: dict, findings: Findings) -> None:
    comparison = tables.comparison
    ours = comparison[comparison["kind"] == "ours"] if not comparison.empty else comparison
    if ours.empty:
        findings.bullets.append("Headline results: no finished run of the full model yet.")
        return
    for dataset, rows in ours.groupby("dataset", sort=True):
        by_protocol = rows.set_index("protocol")
        numbers: dict = {}
        sentences = []
        for protocol, row in by_protocol.iterrows():
            numbers[protocol] = {key: row[key] for key in HEADLINE_NUMBERS}
            what = (
                "test-set model selection, as published"
                if protocol == "paper"
                else "selection on held-out validation data"
                if protocol == "clean"
                else row["selection"]
            )
            sentences.append(
                f"{protocol} protocol ({what}; {_seeds(int(row['runs']))}): pooled DSC "
                f"{mean_sd(row['dsc_mean'], row['dsc_std'])}, IoU (the paper's mIoU) "
                f"{mean_sd(row['iou_mean'], row['iou_std'])}; per-image DSC "
                f"{mean_sd(row['image_dsc_mean'], row['image_dsc_std'])}"
            )
        text = f"**{dataset_name(dataset)}**, EGE-UNet: " + "; ".join(sentences) + "."
        if "paper" in by_protocol.index:
            clause, reference_numbers = _reference_clause(
                dataset, by_protocol.loc["paper", "dsc_mean"], reference
            )
            numbers.update(reference_numbers)
            text += f" Against published figures (paper protocol, pooled): {clause}."
        findings.numbers.setdefault("headline", {})[dataset] = numbers
        findings.bullets.append(text)


def _ablation_bullets(tables: StudyTables, findings: Findings) -> None:
    ablation = tables.ablation
    if ablation.empty:
        findings.bullets.append("Ablation ladder: no finished ablation runs yet.")
        return
    for (dataset, protocol), group in ablation.groupby(["dataset", "protocol"], sort=True):
        rows = group.set_index("variant")
        ladder = [v for v in ABLATION_LADDER if v in rows.index]
        if not ladder:
            continue
        first = rows.loc[ladder[0]]
        steps = [f"{ladder[0]} {mean_sd(first['pooled_dsc_mean'], first['pooled_dsc_std'])}"]
        for variant in ladder[1:]:
            row = rows.loc[variant]
            steps.append(
                f"{variant} {signed(row['step_difference_mean'])} ({_p(row['step_p_value'])})"
            )
        text = (
            f"**Ablation ladder**, {dataset_name(dataset)}, {protocol} protocol, pooled DSC "
            f"paired by seed (paired t-test): {' → '.join(steps)}."
        )
        numbers = {
            v: {
                "dsc_mean": rows.loc[v, "pooled_dsc_mean"],
                "step_difference": rows.loc[v].get("step_difference_mean", math.nan),
                "step_p": rows.loc[v].get("step_p_value", math.nan),
            }
            for v in ladder
        }
        if FULL_MODEL in rows.index and ladder[0] != FULL_MODEL:
            base = rows.loc[ladder[0]]
            text += (
                f" The full model against {ladder[0]}: "
                f"{signed(-base['difference_mean'])} ({_p(base['p_value'])})."
            )
        seeds_per_variant = group.loc[group["variant"].isin(ladder), "seeds"]
        fewest, most = int(seeds_per_variant.min()), int(seeds_per_variant.max())
        seeds = _seeds(most) if fewest == most else f"{fewest} to {most} seeds"
        text += f" With {seeds} per variant, read the p-values as indicative."
        findings.numbers.setdefault("ablation", {})[f"{dataset}/{protocol}"] = numbers
        findings.bullets.append(text)


def _selection_bullets(tables: StudyTables, findings: Findings) -> None:
    protocols, selection = tables.protocols, tables.selection
    sentences = []
    if not protocols.empty:
        for dataset, group in protocols.groupby("dataset", sort=True):
            row = group[group["metric"] == "DSC (pooled)"].iloc[0]
            findings.numbers.setdefault("paper_minus_clean_dsc", {})[dataset] = row[
                "difference_mean"
            ]
            text = (
                f"{dataset_name(dataset)}: paper {number(row['paper_mean'])} against clean "
                f"{number(row['clean_mean'])}, {signed(row['difference_mean'])}"
                f" ± {number(row['difference_std'])} ({int(row['pairs'])} seed pairs, "
                f"{_p(row['p_value'])})"
            )
            paper_images, clean_images = row["paper_train_images"], row["clean_train_images"]
            if pd.notna(paper_images) and pd.notna(clean_images) and paper_images != clean_images:
                text += (
                    f"; clean trains on {int(clean_images)} instead of {int(paper_images)} "
                    "images (the rest select its checkpoint), so part of this gap may come "
                    "from the smaller training set"
                )
            sentences.append(text)
        findings.bullets.append(
            "**Test-set model selection** (the published protocol) against clean selection, "
            "pooled DSC, same seeds: " + "; ".join(sentences) + "."
        )
    if not selection.empty:
        parts = [
            f"{dataset_name(row['dataset'])} {signed(row['difference_mean'])} "
            f"± {number(row['difference_std'])} ({_seeds(int(row['pairs']))}, "
            f"{_p(row['p_value'])}; the picked checkpoint scored "
            f"{number(row['selected_mean'])}, the best epoch by DSC, an oracle, "
            f"{number(row['oracle_mean'])})"
            for _, row in selection.iterrows()
        ]
        findings.numbers["selected_minus_last_epoch_dsc"] = dict(
            zip(selection["dataset"], selection["difference_mean"], strict=True)
        )
        findings.bullets.append(
            "Within the paper-protocol runs, the checkpoint picked on the test split (lowest "
            "loss, as published) scores, in pooled DSC on that same split, against the last "
            "epoch's model (which no selection touched): " + "; ".join(parts) + "."
        )
    if protocols.empty:
        findings.bullets.append(
            "Test-set model selection against clean selection: no dataset has finished runs "
            "under both protocols yet."
        )


def _budget_bullets(tables: StudyTables, findings: Findings) -> None:
    budget = tables.budget
    if budget.empty:
        findings.bullets.append("Budget against the full recipe: no longer run finished yet.")
        return
    for _, row in budget.iterrows():
        same_seed = (
            f", {signed(row['difference_mean'])} against the same seed" if row["pairs"] >= 1 else ""
        )
        findings.numbers.setdefault("budget", {})[row["variant"]] = {
            "dsc": row["dsc_mean"],
            "base_dsc": row["base_dsc_mean"],
            "difference_of_means": row["difference_of_means"],
        }
        findings.bullets.append(
            f"**{row['base_epochs']} against {row['epochs']} epochs** "
            f"({dataset_name(row['dataset'])}, {row['protocol']} protocol): the "
            f"{row['epochs']}-epoch {'runs' if row['seeds'] != 1 else 'run'} "
            f"({_seeds(int(row['seeds']))}) {'score' if row['seeds'] != 1 else 'scores'} pooled DSC {mean_sd(row['dsc_mean'], row['dsc_std'])} "
            f"against {mean_sd(row['base_dsc_mean'], row['base_dsc_std'])} at {row['base_epochs']} "
            f"epochs ({_seeds(int(row['base_seeds']))}): {signed(row['difference_of_means'])} "
            f"points{same_seed}. Its validation DSC at epoch {row['base_epochs']} was "
            f"{number(row['val_dsc_at_base_epochs'])}; its checkpoint was selected at epoch "
            f"{number(row['best_epoch_mean'], 0)}."
        )


def _cost_bullet(tables: StudyTables, findings: Findings) -> None:
    total, cost = tables.total, tables.cost
    findings.numbers["compute"] = total
    if cost.empty:
        return
    hardware = cost["hardware"].fillna("").astype(str)
    counts = hardware[hardware != ""].value_counts()
    devices = [
        f"{name} ({count} run{'s' if count != 1 else ''})"
        for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]
    findings.bullets.append(
        f"**Compute**: {number(total['wall_hours'], 1)} h of training wall time over "
        f"{total['runs']} run(s) ({number(total['core_hours'], 1)} core-hours), on "
        f"{'; '.join(devices) or 'unrecorded hardware'}; median "
        f"{number(cost['images_per_second'].median(), 1)} training images/s per run."
    )


def findings(tables: StudyTables, reference: dict, full_model: str = FULL_MODEL) -> Findings:
    """The findings of a study, from its tables: progress, budget, headline per dataset
    against the paper and the re-runs (with their status), the ablation ladder, how much
    test-set selection inflates the figures, the budget gap, and the compute."""
    result = Findings()
    _status_bullet(tables, result)
    runs = tables.runs
    if not runs.empty:
        statement = budget_statement(runs[runs["variant"] == full_model])
        if statement:
            result.bullets.append(statement + " It applies to every result below unless stated.")
            result.numbers["budget_epochs"] = sorted(
                int(e) for e in set(runs.loc[runs["variant"] == full_model, "epochs"])
            )
    _headline_bullets(tables, reference, result)
    _ablation_bullets(tables, result)
    _selection_bullets(tables, result)
    _budget_bullets(tables, result)
    _cost_bullet(tables, result)
    return result
