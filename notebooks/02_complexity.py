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
# the GHPA-branch micro ablations (`variant_set` chooses). The conventions are those of
# `egeunet complexity` (see `egeunet.complexity`).
#
# The defaults count the 8 switch combinations, with latency on one thread: a minute or
# two on a laptop, a bar shows how far it got. `variant_set = "all"` adds the 4 branch
# ablations (half as long again); `latency = False` skips the timing.

# %% tags=["parameters"]
image_size: int = 256  # square input side for the counts (the paper uses 256)
variant_set: str = "switches"  # switches, all (switches and branch ablations), or published
latency: bool = True  # measure CPU latency at batch 1 and 8 (slower)
latency_repeats: int = 5  # timed forward passes per latency figure (after 3 warm-up passes)
num_threads: int = 1  # torch threads for the latency; 1 gives steady figures; 0 for torch's default
output_dir: str = ""  # where the table and figure are written; "" to only show them

# %%
import torch
from IPython.display import display

from egeunet import complexity, figures
from egeunet.fileio import write_text_atomic
from egeunet.model import EGEUNetConfig
from egeunet.paths import resolve_output
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
    size=image_size, variants=variants, latency=latency, repeats=latency_repeats, progress=True
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
    output = resolve_output(output_dir)
    write_text_atomic(output / "complexity.csv", table.to_csv(index=False))
    for path in figures.save_figure(figure, output / "params_vs_flops"):
        print("wrote", path)
