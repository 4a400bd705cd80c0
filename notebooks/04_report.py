# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: egeunet
#     language: python
#     name: egeunet
# ---

# %% [markdown]
# # 04 · Study report
#
# Rebuilds `REPORT.md`, `REPORT.html`, `findings.md`, the tables (CSV and LaTeX) and the
# figures (PNG, and SVG where small) of a study from its run folders
# (`<study_dir>/runs/*`). The study runner runs it last; run it again any time, the report
# is regenerated, never edited by hand. Given the study file, the run status lists every
# run it declares, stage by stage, also those not started yet.
#
# With `study_dir = ""` it takes the study under `reports/` whose runs changed last: after
# `make study` that is `reports/quick` (a synthetic smoke test), in a fresh checkout the
# committed `reports/isic`. The first cell says which.

# %% tags=["parameters"]
study_dir: str = ""  # the study's folder, holding runs/; "" for the newest under reports/
study_name: str = ""  # report title; "" for the folder's name
study_file: str = ""  # the study YAML, for the runs still to come; "" for the one used last

# %%
from IPython.display import Image, Markdown, display

from egeunet.notebook_inputs import given_or_default, newest_study, recorded_study_file
from egeunet.paths import resolve_existing
from egeunet.report import build_report

folder = given_or_default(study_dir, "study_dir", newest_study)
source = resolve_existing(study_file, "study_file") if study_file else recorded_study_file(folder)
report = build_report(folder, study_name or None, study_file=source)
print(f"{report.runs} finished run(s), {report.failures} failed")
print("report:", report.markdown_path, "and", report.html_path)
display(Markdown(report.findings_path.read_text(encoding="utf-8")))

# %% [markdown]
# ## Tables (also in `tables/` as CSV and LaTeX)

# %%
for name, table in report.readable.items():
    display(Markdown(f"### {name}"), table.style.hide(axis="index"))

# %% [markdown]
# ## Figures (also in `figures/`)

# %%
for name, path in report.figures.items():
    display(Markdown(f"### {name}"), Image(filename=str(path)))
