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
# # 03 · Train and evaluate one run
#
# One training run, then its evaluation on the protocol's test part. Everything lands in
# `run_dir`: `config.json`, `history.csv`, `checkpoints/`, `metrics.json`,
# `per_image.csv`, `predictions/` and `cases.npz` (best, median and worst test images),
# the same run folder `egeunet train` writes.
#
# **Recipes.** `recipe = "quick"` (the default) trains for 5 epochs on 64 images of the
# embedded synthetic data at 64x64: **a few minutes on a 2-core laptop**, enough to see
# every output of a run, not how well EGE-UNet segments. `recipe = "published"` is the
# paper's recipe (AdamW 1e-3, cosine schedule, batch 8, **300 epochs at 256x256**): on
# ISIC 2017 (1500 training images) one epoch takes about 5 minutes on one CPU core, so
# the whole run takes about a day on a CPU and well under an hour on a GPU. For it, set
# `recipe = "published"` and `train = {"dataset": "isic2017", "data_root": "data/isic2017"}`
# (docs/data.md), or run it from a terminal:
# `egeunet train --dataset isic2017 --data-root data/isic2017 --run-dir runs/isic2017`.
#
# **`train`** overrides any field of the recipe (`egeunet.engine.TrainConfig`; model
# switches under `model`), e.g. `{"epochs": 20, "model": {"gab": False}}`.
#
# **Running it again.** With `if_exists = "resume"` a second Run All continues the run in
# `run_dir` (or just shows it, when it has finished); it must have the same settings
# (more epochs are fine). To start over with other settings, set `if_exists = "restart"`
# (the old run in `run_dir` is deleted) or choose another `run_dir`. The study runner
# executes this notebook once per run with the whole configuration in `train`.

# %% tags=["parameters"]
recipe: str = "quick"  # quick (synthetic data, minutes) or published (300 epochs, 256x256)
train: dict = {}  # TrainConfig fields on top of the recipe, e.g. {"epochs": 20}
run_dir: str = "runs/notebook"  # the run folder; a relative path starts at the project root
if_exists: str = "resume"  # resume (continue the run in run_dir) or restart (delete it first)
num_threads: int = 0  # torch threads; 0: the cores other processes leave free
progress: bool = True  # progress bars (widgets in JupyterLab); the study runner prints lines

# %%
import pandas as pd
import torch
from IPython.display import Image, display

from egeunet import figures
from egeunet.cases import case_figure
from egeunet.engine import TrainConfig, train_run
from egeunet.paths import resolve_existing, resolve_output
from egeunet.runfolder import RunFolder

if num_threads:
    torch.set_num_threads(num_threads)
settings = dict(train)
if settings.get("data_root"):
    settings["data_root"] = str(resolve_existing(settings["data_root"], "train.data_root"))
config = TrainConfig.from_recipe(recipe, settings)
run = RunFolder(resolve_output(run_dir))
print(f"{recipe} recipe, {config.model.name}: {config}")

# %% [markdown]
# ## Training
# A progress bar per epoch and one line per epoch (the study runner also reports them
# from `history.csv`).

# %%
metrics = train_run(config, run.root, if_exists, progress=progress, threads=num_threads)

# %% [markdown]
# ## Learning curves

# %%
history = pd.read_csv(run.history).assign(variant=config.model.name, seed=config.seed)
figures.show(figures.learning_curves(history))

# %% [markdown]
# ## Final metrics
# Pooled: one confusion matrix over every test pixel (the paper's convention; IoU is what
# the paper calls mIoU). Per image: computed per image, then summarised.

# %%
print(f"{metrics['protocol']} protocol, {metrics['selection']}, best epoch {metrics['best_epoch']}")
pd.DataFrame(
    {
        "pooled": pd.Series(metrics["pooled"]),
        "per image": pd.Series(metrics["per_image"]),
    }
)

# %% [markdown]
# ## Predictions
# A fixed sample of test images (input | truth | prediction), then the best, median and
# worst test images by per-image DSC.

# %%
for panel in sorted(run.predictions.glob("*.png"))[:4]:
    display(Image(filename=str(panel)))

# %%
figures.show(case_figure(run.root))
