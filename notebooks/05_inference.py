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

# %% tags=["parameters"]
checkpoint: str = "runs/notebook/checkpoints/best.pt"  # checkpoint (.pt), or isic2017 / isic2018
input_path: str = "my_images"  # an image file or a folder of images; "" for none
output_dir: str = "segmented"  # masks, overlays and lesion_areas.csv go here
threshold: float = 0.5  # probability above which a pixel is lesion
pixel_size_mm: float = 0.0  # side of one pixel in mm, for areas in mm^2; 0 if unknown
device: str = "auto"  # auto, cpu, cuda or cuda:N
interactive: bool = True  # show the upload and slider widgets (set False under papermill)

# %% [markdown] tags=["folder"]
# ## Segment the images in `input_path`
# Every image in the file or folder `input_path`: masks and overlays into `output_dir`,
# areas into `output_dir/lesion_areas.csv`. The web app (`egeunet app`) leaves this part
# out; the interactive part below is what it shows.

# %% tags=["folder"]
from pathlib import Path

from egeunet import figures
from egeunet.fileio import write_text_atomic
from egeunet.lesion import area_table, overlay_figure
from egeunet.predict import predict

areas = None
if input_path:
    summary = predict(
        checkpoint, input_path, output_dir, threshold=threshold, device=device, overwrite=True
    )
    print(summary.message())
    areas = area_table(input_path, output_dir, pixel_size_mm)
    write_text_atomic(Path(output_dir) / "lesion_areas.csv", areas.to_csv(index=False))
areas

# %% [markdown] tags=["folder"]
# ## Overlays (predicted lesion in red)

# %% tags=["folder"]
if areas is not None and len(areas):
    figures.show(overlay_figure(areas, output_dir))

# %% [markdown]
# ## Segment images you upload
# Upload one or several images; move the threshold and the masks and areas follow. The
# links below the pictures download the mask (a PNG of the image's size, 255 = lesion)
# and the areas of every uploaded image (CSV).

# %%
if interactive:
    from IPython.display import display

    from egeunet.app import lesion_app

    display(lesion_app(checkpoint, threshold, pixel_size_mm, device).widget)
