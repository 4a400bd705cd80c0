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
# # 01 · The data
#
# One dataset at a glance: images per split, original image sizes, lesion areas and a
# grid of examples with their masks (green). Run it on the `egeunet` kernel in JupyterLab,
# or headless: `papermill notebooks/01_data.ipynb out.ipynb -p dataset isic2017 -p data_root data/`.
# The study runner runs it once per dataset of a study.

# %% tags=["parameters"]
dataset: str = "synthetic"  # synthetic, isic2017, isic2018 or folder
data_root: str = ""  # folder holding the dataset's files; "" for synthetic
image_size: int = 256  # side of the prepared square images
num_synthetic: int = 0  # synthetic only: number of images; 0 for the default
num_examples: int = 8  # images in the example grid
seed: int = 0  # which examples are drawn
output_dir: str = ""  # where tables and figures are written; "" to only show them

# %%
from IPython.display import display

from egeunet.data import get_prepared
from egeunet.data_overview import overview
from egeunet.figures import show
from egeunet.paths import resolve_existing, resolve_output

root = resolve_existing(data_root, "data_root") if data_root else None
prepared = get_prepared(dataset, root, size=image_size, num_synthetic=num_synthetic or None)
data = overview(prepared, num_examples=num_examples, seed=seed)
data.summary()

# %% [markdown]
# ## Images per split
# `challenge`: the official parts as given; `paper`: the EGE-UNet protocol (train/test, 7:3).

# %%
data.counts

# %% [markdown]
# ## Original sizes and lesion areas

# %%
display(data.images.describe())
show(data.distributions)

# %% [markdown]
# ## Examples with their masks

# %%
show(data.examples)

# %%
if output_dir:
    for path in data.save(resolve_output(output_dir)):
        print("wrote", path)
