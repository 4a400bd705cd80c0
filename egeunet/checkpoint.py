"""Checkpoint files: atomic saving, safe loading, and models from any supported layout.

Three layouts load into an :class:`~egeunet.model.EGEUNet`:

* this package's checkpoints (``format == CHECKPOINT_FORMAT``): model config, weights,
  and, for training checkpoints, optimiser, scheduler, RNG states and the train config;
* the authors' raw ``state_dict`` (``encoder1.0.weight`` ...), also wrapped in a dict under
  ``model_state_dict`` as their training script saves it, converted with
  :func:`~egeunet.model.convert_official_state_dict`;
* a raw ``state_dict`` with this package's key names.

Everything is read with ``torch.load(..., weights_only=True)``: no code from a file runs.

Commands that take ``--weights`` accept a checkpoint file or the name of weights shipped
with the package (:data:`SHIPPED_WEIGHTS`, files in ``egeunet/weights/``), resolved by
:func:`resolve_weights`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from egeunet.fileio import atomic_open, sha256_file
from egeunet.model import (
    EGEUNet,
    EGEUNetConfig,
    convert_official_state_dict,
    is_official_state_dict,
)

CHECKPOINT_FORMAT = "egeunet-checkpoint-v1"
WEIGHTS_FOLDER = Path(__file__).resolve().parent / "weights"
SHIPPED_WEIGHTS = {
    "isic2017": "isic2017.pt",
    "isic2018": "isic2018.pt",
}
"""Names of the weights the package ships (trained by the real study), and their files in
:data:`WEIGHTS_FOLDER`."""

DEFAULT_SHIPPED_WEIGHTS = "isic2018"
"""The shipped weights the app and the inference notebook use unless told otherwise."""


def resolve_weights(weights: str | os.PathLike) -> Path:
    """The checkpoint file ``weights`` names: an existing file as given, else the file of a
    shipped name (:data:`SHIPPED_WEIGHTS`). FileNotFoundError for anything else, and for a
    shipped name whose file is not installed."""
    path = Path(weights)
    if path.is_file():
        return path
    name = str(weights)
    if name in SHIPPED_WEIGHTS:
        shipped = WEIGHTS_FOLDER / SHIPPED_WEIGHTS[name]
        if shipped.is_file():
            verify_shipped(shipped)
            return shipped
        raise FileNotFoundError(
            f"weights {name!r}: the shipped weights are not installed ({shipped} is missing; "
            "the package ships them from the real study's results); pass a checkpoint file "
            "instead, e.g. --weights runs/<run>/checkpoints/best.pt"
        )
    names = ", ".join(SHIPPED_WEIGHTS)
    raise FileNotFoundError(
        f"weights {name}: no such checkpoint file, and not the name of shipped weights ({names})"
    )


def provenance_path(weights_path: str | os.PathLike) -> Path:
    """The provenance record (JSON) beside a shipped weights file."""
    return Path(weights_path).with_suffix(".json")


def verify_shipped(weights_path: str | os.PathLike) -> None:
    """ValueError unless the shipped file matches the SHA-256 its provenance records."""
    weights_path = Path(weights_path)
    record = provenance_path(weights_path)
    try:
        expected = json.loads(record.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"shipped weights {weights_path}: provenance {record} is missing or damaged "
            f"({type(error).__name__}); reinstall the package"
        ) from None
    if sha256_file(weights_path) != expected:
        raise ValueError(
            f"shipped weights {weights_path} do not match the checksum in {record.name}; "
            "the file was changed or damaged: reinstall the package"
        )


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` with ``torch.save`` to a temporary file and move it into place."""
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)


def model_payload(model: EGEUNet, **extra) -> dict:
    """A checkpoint dict of this package's layout for ``model`` (plus ``extra`` entries)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": model.config.to_dict(),
        "model_state": model.state_dict(),
        **extra,
    }


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint onto the CPU with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file fails in many ways (KeyError, ...)
        if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
            raise ValueError(
                f"checkpoint {path} could not be read: it holds objects other than tensors "
                f"and plain values ({_refused_object(error)}); egeunet never runs code from "
                "a checkpoint, so it cannot load this file"
            ) from None
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise ValueError(
            f"checkpoint {path} could not be read (not a torch checkpoint, or damaged): {reason}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint {path} holds a {type(data).__name__}, not a dict")
    return data


def _refused_object(error: Exception) -> str:
    """What torch's weights-only unpickler refused, without its advice to load unsafely."""
    found = re.search(r"WeightsUnpickler error: (.+?)(?:\. |\.?$)", str(error), re.MULTILINE)
    return found.group(1) if found else "refused by weights-only loading"


@dataclass
class LoadedModel:
    """A model restored from a checkpoint, with what the checkpoint said about itself."""

    model: EGEUNet
    layout: str  # "egeunet", "official" or "state_dict"
    checkpoint: dict  # the whole file (training state included, if any)

    @property
    def train_config(self) -> dict | None:
        return self.checkpoint.get("train_config") if self.layout == "egeunet" else None

    @property
    def epoch(self) -> int | None:
        return self.checkpoint.get("epoch") if self.layout == "egeunet" else None


def _is_state_dict(data: dict) -> bool:
    return bool(data) and all(isinstance(v, Tensor) for v in data.values())


def _check_finite(state: dict, path: str | os.PathLike) -> None:
    """ValueError naming the first tensor of ``state`` holding NaN or infinite values: such
    weights give meaningless masks (typically empty ones) without any error."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not value.isfinite().all():
            raise ValueError(
                f"checkpoint {path} has NaN or infinite weights ({key}); it cannot be used: "
                "the training that wrote it diverged or the file is damaged"
            )


def load_model(path: str | os.PathLike, config: EGEUNetConfig | None = None) -> LoadedModel:
    """Build the model a checkpoint describes and load its weights (eval mode, CPU).

    ``config`` is needed only for raw state dicts of a non-default variant; this package's
    checkpoints carry their own.
    """
    data = load_checkpoint(path)
    if data.get("format") == CHECKPOINT_FORMAT:
        layout = "egeunet"
        try:
            config = EGEUNetConfig(**data["model_config"])
            state = data["model_state"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"checkpoint {path} has a damaged model record: {error!r}") from None
        train_config = data.get("train_config")
        if train_config is not None and not isinstance(train_config, dict):
            raise ValueError(
                f"checkpoint {path} has a damaged train config: expected a mapping, "
                f"got {type(train_config).__name__}"
            )
    else:
        state = data.get("model_state_dict", data)
        if not isinstance(state, dict) or not _is_state_dict(state):
            raise ValueError(
                f"checkpoint {path} is neither an egeunet checkpoint nor a model state_dict"
            )
        config = config or EGEUNetConfig()
        if is_official_state_dict(state):
            layout = "official"
            state = convert_official_state_dict(state, config)
        else:
            layout = "state_dict"
    _check_finite(state, path)
    model = EGEUNet(config)
    where = f"checkpoint {path} does not fit model {config.name} {config.widths}"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"{where}: {error}") from None
    if missing or unexpected:
        raise ValueError(
            f"{where}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.eval()
    return LoadedModel(model=model, layout=layout, checkpoint=data)
