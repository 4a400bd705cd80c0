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
# EGE-UNet segments skin lesions: for each image a mask (the lesion's pixels) and an
# overlay, at the image's own size, and the lesion's area in pixels, as a share of the
# image and in mm² when the side of a pixel is known.

# %% [markdown] tags=["folder"]
# **Weights.** With `checkpoint = ""` this uses the weights the package ships,
# `egeunet/weights/isic2017.pt` (or `isic2018.pt`), trained by the ISIC study
# (`studies/isic.yaml`, see `egeunet/weights/README.md`). Until that study has finished
# they are not installed, and the newest checkpoint a study left in this project is used
# instead, one trained on real images first (the committed `reports/isic` holds
# partly trained ones); the cell below says which. Set `checkpoint` to any checkpoint
# file, e.g. `runs/notebook/checkpoints/best.pt` from `03_train`.
#
# **Images.** With `input_path = ""` it segments a few example images drawn by the
# synthetic generator (this repository stores no ISIC images); point `input_path` at a
# file or folder of your own, or upload images at the end.

# %% tags=["parameters"]
checkpoint: str = ""  # checkpoint (.pt) or isic2017 / isic2018; "" for the default weights
input_path: str = ""  # an image file or a folder of images; "" for generated examples
output_dir: str = "runs/05_inference"  # masks, overlays and lesion_areas.csv go here
threshold: float = 0.5  # probability above which a pixel is lesion
pixel_size_mm: float = 0.0  # side of one pixel in mm, for areas in mm^2; 0 if unknown
device: str = "auto"  # auto, cpu, cuda or cuda:N
interactive: bool = True  # show the upload and slider widgets (set False under papermill)

# %%
from egeunet.checkpoint import SHIPPED_WEIGHTS
from egeunet.notebook_inputs import default_weights, given_or_default

if checkpoint in SHIPPED_WEIGHTS:
    weights = checkpoint  # says clearly if they are not installed
else:
    weights = given_or_default(checkpoint, "checkpoint", default_weights)

# %% [markdown] tags=["folder"]
# ## Segment the images in `input_path`
# Every image in the file or folder `input_path`: masks and overlays into `output_dir`,
# areas into `output_dir/lesion_areas.csv`. The web app (`egeunet app`) leaves this part
# out; the interactive part below is what it shows.

# %% tags=["folder"]
from egeunet import figures
from egeunet.fileio import write_text_atomic
from egeunet.lesion import area_table, overlay_figure
from egeunet.notebook_inputs import example_images
from egeunet.paths import resolve_output
from egeunet.predict import predict

images = given_or_default(input_path, "input_path", example_images)
output = resolve_output(output_dir)
summary = predict(weights, images, output, threshold=threshold, device=device, overwrite=True)
print(summary.message())
areas = area_table(images, output, pixel_size_mm)
write_text_atomic(output / "lesion_areas.csv", areas.to_csv(index=False))
areas

# %% [markdown] tags=["folder"]
# ## Overlays (predicted lesion in red)

# %% tags=["folder"]
if len(areas):
    figures.show(overlay_figure(areas, output))

# %% [markdown]
# ## Segment images you upload
# Upload one or several images; move the threshold and the masks and areas follow. The
# links below the pictures download the mask (a PNG of the image's size, 255 = lesion)
# and the areas of every uploaded image (CSV).

# %%
if interactive:
    from IPython.display import display

    from egeunet.app import lesion_app

    display(lesion_app(weights, threshold, pixel_size_mm, device).widget)
