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

# %% tags=["parameters"]
study_dir: str = "reports/quick"  # the study's folder, holding runs/
study_name: str = ""  # report title; "" for the folder's name
study_file: str = ""  # the study YAML, for the runs still to come; "" lists the runs found

# %%
import pandas as pd
from IPython.display import Image, Markdown, display

from egeunet.report import build_report

report = build_report(study_dir, study_name or None, study_file=study_file or None)
print(f"{report.runs} finished run(s), {report.failures} failed")
print("report:", report.markdown_path, "and", report.html_path)
display(Markdown(report.findings_path.read_text(encoding="utf-8")))

# %% [markdown]
# ## Tables (also in `tables/` as CSV and LaTeX)

# %%
for name, path in report.tables.items():
    display(Markdown(f"### {name}"), pd.read_csv(path))

# %% [markdown]
# ## Figures (also in `figures/`)

# %%
for name, path in report.figures.items():
    display(Markdown(f"### {name}"), Image(filename=str(path)))
