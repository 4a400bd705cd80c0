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
# # 05 · Segment your own images
#
# Loads a checkpoint (a run's `checkpoints/best.pt`, or the authors' published weights)
# and segments every image in `input_path` (a file or a folder): a binary mask and an
# overlay per image at its own size, and a table of lesion areas. In JupyterLab
# (`interactive=True`) a file upload and a threshold slider let you try single images.

# %% tags=["parameters"]
checkpoint: str = "runs/notebook/checkpoints/best.pt"  # model checkpoint (.pt)
input_path: str = "my_images"  # an image file or a folder of images
output_dir: str = "segmented"  # masks, overlays and lesion_areas.csv go here
threshold: float = 0.5  # probability above which a pixel is lesion
pixel_size_mm: float = 0.0  # side of one pixel in mm, for areas in mm^2; 0 if unknown
device: str = "auto"  # auto, cpu, cuda or cuda:N
interactive: bool = True  # show the upload and slider widgets (set False under papermill)

# %%
from pathlib import Path

from IPython.display import display

from egeunet import figures
from egeunet.fileio import write_text_atomic
from egeunet.lesion import area_table, overlay_figure
from egeunet.predict import predict

summary = predict(
    checkpoint, input_path, output_dir, threshold=threshold, device=device, overwrite=True
)
print(summary.message())
areas = area_table(input_path, output_dir, pixel_size_mm)
write_text_atomic(Path(output_dir) / "lesion_areas.csv", areas.to_csv(index=False))
areas

# %% [markdown]
# ## Overlays (predicted lesion in red)

# %%
if len(areas):
    figures.show(overlay_figure(areas, output_dir))

# %% [markdown]
# ## Try an image interactively
# Upload an image, then move the threshold; the overlay and the lesion area follow.

# %%
if interactive:
    from egeunet.lesion import LesionExplorer, Segmenter, interactive_view

    explorer = LesionExplorer(Segmenter(checkpoint, device), threshold, pixel_size_mm)
    display(interactive_view(explorer))
