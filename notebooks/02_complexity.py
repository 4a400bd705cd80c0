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
# # 02 · Complexity
#
# Parameters, multiply-accumulates of convolutions (the paper's "GFLOPs"), fvcore FLOPs
# with every op counted and CPU latency, for each variant: the 8 switch combinations and
# the GHPA-branch micro ablations (`variant_set` can narrow that down). The conventions are those of
# `egeunet complexity` (see `egeunet.complexity`).

# %% tags=["parameters"]
image_size: int = 256  # square input side for the counts (the paper uses 256)
variant_set: str = "all"  # all (switches and branch ablations), switches, or published
latency: bool = True  # measure CPU latency at batch 1 and 8 (slower)
latency_repeats: int = 10  # timed forward passes per latency figure (after 3 warm-up passes)
num_threads: int = 0  # torch threads for the latency; 0 for torch's default
output_dir: str = ""  # where the table and figure are written; "" to only show them

# %%
from pathlib import Path

import torch
from IPython.display import display

from egeunet import complexity, figures
from egeunet.fileio import write_text_atomic
from egeunet.model import EGEUNetConfig
from egeunet.references import load_reference_results, reported_complexity

if num_threads:
    torch.set_num_threads(num_threads)
variant_sets = {
    "all": complexity.switch_variants() + complexity.branch_variants(),
    "switches": complexity.switch_variants(),
    "published": [EGEUNetConfig()],
}
if variant_set not in variant_sets:
    raise ValueError(f"variant_set: {variant_set!r} is not one of {sorted(variant_sets)}")
variants = variant_sets[variant_set]
table = complexity.complexity_table(
    size=image_size, variants=variants, latency=latency, repeats=latency_repeats
)
print(complexity.conventions_header(image_size))
table

# %% [markdown]
# ## Parameters against FLOPs, with the paper's reported points

# %%
reported = reported_complexity(load_reference_results())
figure = figures.parameters_against_flops(table, reported)
display(reported)
figures.show(figure)

# %%
if output_dir:
    write_text_atomic(Path(output_dir) / "complexity.csv", table.to_csv(index=False))
    for path in figures.save_figure(figure, Path(output_dir) / "params_vs_flops"):
        print("wrote", path)
