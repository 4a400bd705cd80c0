"""The GPU path. CUDA tests skip without a GPU (run them with benchmarks/gpu_check.sh);
the CPU dry run of the GPU check runs everywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_device_batches_match_the_cpu_ones_unaugmented(tmp_path):
    from egeunet.data import get_prepared
    from egeunet.data.device import DeviceLoader

    prepared = get_prepared("synthetic", size=64, cache_dir=tmp_path)
    ids = prepared.ids[:12]
    kwargs = {"batch_size": 4, "shuffle": False, "seed": 0, "augment": False}
    on_gpu = DeviceLoader(prepared, ids, device="cuda", **kwargs)
    on_cpu = DeviceLoader(prepared, ids, device="cpu", **kwargs)
    for (gpu_images, gpu_masks), (cpu_images, cpu_masks) in zip(on_gpu, on_cpu, strict=True):
        assert gpu_images.device.type == "cuda"
        torch.testing.assert_close(gpu_images.cpu(), cpu_images)
        torch.testing.assert_close(gpu_masks.cpu(), cpu_masks)


@cuda
def test_training_on_cuda_matches_cpu_gradients():
    from egeunet.losses import DeepSupervisionLoss
    from egeunet.model import EGEUNet

    torch.manual_seed(0)
    model = EGEUNet()
    x = torch.rand(2, 3, 64, 64) * 255
    masks = (torch.rand(2, 1, 64, 64) > 0.5).float()
    gradients = []
    for device in ("cpu", "cuda"):
        model.zero_grad()
        model.to(device)
        DeepSupervisionLoss()(model(x.to(device)), masks.to(device)).backward()
        gradients.append({n: p.grad.cpu() for n, p in model.named_parameters()})
    for name, cpu_grad in gradients[0].items():
        scale = cpu_grad.abs().max().item()
        assert (gradients[1][name] - cpu_grad).abs().max().item() <= 1e-3 * scale, name


@pytest.mark.slow  # several processes importing torch and training: minutes on 2 cores
def test_gpu_check_dry_run_on_cpu(tmp_path, shared_data):
    # The 47-pair ISIC 2018 sample stands in for the ISIC 2017 bundle: same code path.
    out = tmp_path / "out"
    command = [
        sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"),
        "--dataset", "isic2018", "--data", str(shared_data / "isic2018_sample"),
        "--out", str(out), "--device", "cpu", "--epochs", "1", "--concurrent", "2",
        "--timed-batches", "2", "--image-size", "64", "--max-train-images", "16",
        "--max-eval-images", "8",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "one run, device pipeline" in result.stdout
    assert "2 runs sharing the device" in result.stdout
    assert {p.name for p in out.iterdir()} >= {"config.json", "history.csv", "metrics.json"}
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["one_run_images_per_s"] > 0 and summary["pooled"]["dsc"] is not None
