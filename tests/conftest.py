"""Shared test fixtures: where the real data and reference files live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
REFERENCE_CHECKPOINT = SHARED / "reference" / "egeunet_official_reference.pt"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real ISIC data beside the project, or a clean skip on a user's machine."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real ISIC data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lesion_images(tmp_path_factory) -> list[Path]:
    """Four lesion images: real ISIC 2018 JPEGs from the shared data, read in place (the
    smallest files of its first twelve), or, where that is absent, four synthetic
    dermoscopy-like JPEGs of other sizes."""
    real = SHARED_DATA / "isic2018_sample" / "ISIC2018_Task1-2_Training_Input"
    found = sorted(real.glob("*.jpg")) if real.is_dir() else []
    if found:
        return sorted(found[:12], key=lambda p: p.stat().st_size)[:4]
    import numpy as np
    from PIL import Image

    from egeunet.data.synthetic import generate_sample

    folder = tmp_path_factory.mktemp("lesion_images")
    paths = []
    for index, (height, width) in enumerate([(300, 384), (384, 384), (250, 320), (320, 272)]):
        image, _ = generate_sample(7, "test", index, 384)
        paths.append(folder / f"generated_lesion_{index}.jpg")
        Image.fromarray(np.asarray(image)[:height, :width]).save(paths[-1], quality=92)
    return paths


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on the shared CPU threads cost a lot."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    """Synthetic data generated once per module into a temporary cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EGEUNET_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def reference_checkpoint() -> dict:
    import torch

    if not REFERENCE_CHECKPOINT.is_file():
        pytest.skip(f"reference checkpoint not found at {REFERENCE_CHECKPOINT}")
    return torch.load(REFERENCE_CHECKPOINT, weights_only=True)


# The trainer compiles the channel LayerNorm (egeunet.model.FusedKernels): seconds per
# process, paid by every test that trains. Tests run the plain ops unless they switch the
# kernels on themselves (tests/test_fused_kernels.py); subprocesses inherit this.
os.environ.setdefault("EGEUNET_FUSED_KERNELS", "0")
# Likewise the trainer's thread count stays fixed in tests (bit-identical resume is tested
# on a machine that may be busy); tests/test_threads.py covers the adaptation.
os.environ.setdefault("EGEUNET_ADAPTIVE_THREADS", "0")
# And one process per training step: a helper process (egeunet.engine.parallel, the default
# on a 2-core machine) costs seconds to start per run; tests/test_parallel.py covers it.
os.environ.setdefault("EGEUNET_PROCESSES", "1")
