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
# Rebuilds `REPORT.md`, `REPORT.html`, the tables (CSV and LaTeX) and the figures (PNG and
# SVG) of a study from its run folders (`<study_dir>/runs/*`). The study runner runs it
# last; run it again any time, the report is regenerated, never edited by hand.

# %% tags=["parameters"]
study_dir: str = "reports/quick"  # the study's folder, holding runs/
study_name: str = ""  # report title; "" for the folder's name

# %%
import pandas as pd
from IPython.display import Image, Markdown, display

from egeunet.report import build_report

report = build_report(study_dir, study_name or None)
print(f"{report.runs} finished run(s), {report.failures} failed")
print("report:", report.markdown_path, "and", report.html_path)

# %% [markdown]
# ## Tables (also in `tables/` as CSV and LaTeX)

# %%
for name, path in report.tables.items():
    display(Markdown(f"### {name}"), pd.read_csv(path))

# %% [markdown]
# ## Figures (also in `figures/` as PNG and SVG)

# %%
for name, path in report.figures.items():
    display(Markdown(f"### {name}"), Image(filename=str(path)))
