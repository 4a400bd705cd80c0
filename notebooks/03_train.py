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
# One training run with the published recipe (AdamW, cosine schedule, BceDice with deep
# supervision), then its evaluation on the protocol's test part. Everything lands in
# `run_dir`: `config.json`, `history.csv`, `checkpoints/`, `metrics.json`,
# `per_image.csv`, `predictions/` and `cases.npz` (best, median and worst test images).
# The study runner executes this notebook once per run; interrupted runs continue from
# `checkpoints/last.pt` with `resume=True`.

# %% tags=["parameters"]
dataset: str = "synthetic"  # synthetic, isic2017, isic2018 or folder
data_root: str = ""  # folder holding the dataset's files; "" for synthetic
protocol: str = "paper"  # paper (test-set model selection, as published), clean or challenge
image_size: int = 256  # side of the square inputs, a multiple of 32
ghpa: bool = True  # GHPA blocks in encoder stages 4-6 and decoder blocks 1-3
gab: bool = True  # group aggregation bridges on the skips
deep_supervision: bool = True  # side outputs at five decoder levels, weighted in the loss
ghpa_branches: list[str] = ["hw", "ch", "cw", "dw"]  # active GHPA branches
gab_dilations: list[int] = [1, 2, 5, 7]  # dilation of each GAB group
epochs: int = 300  # training epochs
batch_size: int = 8  # images per batch
lr: float = 0.001  # AdamW learning rate
weight_decay: float = 0.01  # AdamW weight decay
seed: int = 42  # seed of weights, batches and augmentation
normalization: str = "minmax"  # minmax (published) or imagenet
per_run_angle: bool = False  # reproduce the published one-angle-per-run rotation bug
val_interval: int = 1  # evaluate every this many epochs
max_train_images: int = 0  # train on the first N training images; 0 for all
max_eval_images: int = 0  # evaluate on the first N images; 0 for all
device: str = "auto"  # auto, cpu, cuda or cuda:N
num_threads: int = 0  # torch threads; 0: the cores other processes leave free
run_dir: str = "runs/notebook"  # the run folder (relative paths start at the working directory)
resume: bool = False  # continue from run_dir/checkpoints/last.pt

# %%
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Image, display

from egeunet import figures
from egeunet.cases import case_figure, save_run_cases
from egeunet.engine import TrainConfig, train

if num_threads:
    torch.set_num_threads(num_threads)
config = TrainConfig.from_dict(
    {
        "dataset": dataset,
        "data_root": data_root or None,
        "protocol": protocol,
        "image_size": image_size,
        "model": {
            "ghpa": ghpa,
            "gab": gab,
            "deep_supervision": deep_supervision,
            "ghpa_branches": ghpa_branches,
            "gab_dilations": gab_dilations,
        },
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "normalization": normalization,
        "per_run_angle": per_run_angle,
        "val_interval": val_interval,
        "max_train_images": max_train_images or None,
        "max_eval_images": max_eval_images or None,
        "device": device,
    }
)
print(config.model.name, config)

# %% [markdown]
# ## Training
# One line per epoch (the study runner also reports them from `history.csv`).

# %%
metrics = train(config, run_dir, resume=resume, progress=False, threads=num_threads or None)
save_run_cases(run_dir, device=device)

# %% [markdown]
# ## Learning curves

# %%
history = pd.read_csv(Path(run_dir) / "history.csv").assign(variant=config.model.name, seed=seed)
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
for panel in sorted((Path(run_dir) / "predictions").glob("*.png"))[:4]:
    display(Image(filename=str(panel)))

# %%
figures.show(case_figure(run_dir))
