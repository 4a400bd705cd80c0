"""Reproducibility: seeds, every RNG state in a checkpoint, the resume fast-forward, and
the provenance a run folder's config.json records (versions, commit, data hash).

Resuming restores model, optimiser, scheduler, gradient scaler, every RNG state, the
loaders' positions, epoch, best-so-far and history from ``last.pt``; on CPU the finished
run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import platform
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from egeunet.data import PreparedDataset
from egeunet.data.device import DeviceLoader
from egeunet.engine.config import TrainConfig
from egeunet.engine.protocols import ProtocolSplits


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("egeunet")
    except metadata.PackageNotFoundError:
        return "unknown"


GENERATED_FOLDERS = ("reports",)
"""Top-level folders of the checkout that hold what runs write, not code: changes there
(a study writing its run folders into a clone) do not make a commit ``-dirty``."""


def git_commit(where: Path | None = None) -> str | None:
    """HEAD of the checkout holding this package (or ``where``), with ``-dirty`` if its
    tracked files other than :data:`GENERATED_FOLDERS` have changes."""
    where = where or Path(__file__).resolve().parent
    excluded = [f":(top,exclude){folder}/" for folder in GENERATED_FOLDERS]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", *excluded],
            cwd=where, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        if dirty.returncode:  # clean or not is unknown: say only the commit's name
            return head.stdout.strip() + "-unknown-changes"
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The processor's name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_description(device: torch.device) -> dict:
    """The hardware a run trains on: CPU model and logical cores, and the GPU if it uses one."""
    machine = {"cpu": cpu_model(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def record_machine(description: dict, device: torch.device) -> bool:
    """Add this machine to a run description's ``machines`` (a run resumed elsewhere lists
    each machine once); True when it was not listed yet."""
    machine = machine_description(device)
    machines = description.setdefault("machines", [])
    if machine in machines:
        return False
    machines.append(machine)
    return True


def run_description(
    config: TrainConfig,
    prepared: PreparedDataset,
    splits: ProtocolSplits,
    device: torch.device,
    amp: bool,
) -> dict:
    return {
        "config": config.to_dict(),
        "protocol": splits.protocol,
        "selection": splits.selection,
        "counts": splits.counts(),
        "validation_source": splits.val_source,
        "data_manifest_hash": prepared.manifest_hash,
        "data_folder": str(prepared.root),
        "package_version": package_version(),
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "device": str(device),
        "amp": amp,
        "num_threads": torch.get_num_threads(),
        "machines": [machine_description(device)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# What a checkpoint needs to continue a run (last.pt has them; best.pt only the weights).
TRAINING_STATE_KEYS = (
    "train_config",
    "data_manifest_hash",
    "model_state",
    "optimizer_state",
    "scheduler_state",
    "rng",
    "loader_generator",
    "training_state",
)


def check_training_checkpoint(checkpoint: dict, path: Path) -> None:
    """ValueError naming ``path`` unless it holds a full training state to resume from."""
    missing = [key for key in TRAINING_STATE_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(
            f"cannot resume from {path}: it is not a training checkpoint (it has no "
            f"{', '.join(missing)}); only the last.pt egeunet train writes holds the full "
            "training state (best.pt holds the weights only)"
        )
    for key in ("train_config", "training_state"):
        if not isinstance(checkpoint[key], dict):
            raise ValueError(f"cannot resume from {path}: its {key} is damaged")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """Every global RNG state, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fast_forward(loader, epochs: int) -> None:
    """Advance a fresh loader's sampler as ``epochs`` passes would have (resume)."""
    if isinstance(loader, DeviceLoader):
        loader.fast_forward(epochs)
        return
    for _ in range(epochs):
        for _ in loader.sampler:
            pass
