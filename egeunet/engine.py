"""Training and evaluation: the published recipe, run folders, resumable runs, protocols.

:func:`train` runs one configuration (:class:`TrainConfig`, defaults = the published
recipe) into a run folder::

    <run>/config.json          resolved config, versions, data hash, protocol and counts
    <run>/history.csv          one row per epoch
    <run>/checkpoints/last.pt  full training state after the latest epoch (atomic)
    <run>/checkpoints/best.pt  weights with the lowest selection loss so far (atomic)
    <run>/metrics.json         final metrics of best.pt on the protocol's test split
    <run>/per_image.csv        per-image metrics of that evaluation
    <run>/predictions/         input | truth | prediction overlays for a fixed sample

Protocols (``TrainConfig.protocol``):

* ``"paper"`` as published: train on the paper split's train part; its test part is
  evaluated every ``val_interval`` epochs and picks the checkpoint ("test-set model
  selection"), which is then reported on that same test part.
* ``"clean"``: select on data the test split never sees: the challenge split's val part
  when the challenge split also has a test part; otherwise a fixed 10% hold-out of the
  paper train part (seed ``HOLDOUT_SEED``), with the paper test part evaluated once, at
  the end, with best.pt ("validation-set model selection").
* ``"challenge"``: train on the challenge train part and select and report on its val
  part (e.g. ISIC 2017's 2000/150); selection and report share data, so it is labelled
  test-set model selection too.

Resuming (``resume=True``) restores model, optimiser, scheduler, gradient scaler, every
RNG state, the loaders' positions, epoch, best-so-far and history from ``last.pt``; on CPU
the finished run is bit-identical to an uninterrupted one. A non-finite loss stops the
run with :class:`TrainingDiverged`, leaving the checkpoints of the last good epoch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import subprocess
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from egeunet.checkpoint import (
    LoadedModel,
    load_checkpoint,
    load_model,
    model_payload,
    save_checkpoint,
)
from egeunet.data import PreparedDataset, SegmentationDataset, get_prepared, make_loader
from egeunet.data.dataset import NORMALIZATIONS
from egeunet.data.device import DeviceLoader
from egeunet.fileio import (
    folder_lock,
    json_safe,
    remove_temporaries,
    require_writable,
    write_json_atomic,
    write_text_atomic,
)
from egeunet.losses import DeepSupervisionLoss
from egeunet.metrics import POOLED_KEYS, THRESHOLD, MetricAccumulator
from egeunet.model import EGEUNet, EGEUNetConfig, count_parameters, fused_kernels
from egeunet.predict import comparison_panel, resolve_device, save_png
from egeunet.threads import AdaptiveThreads

PROTOCOLS = ("paper", "clean", "challenge")
TEST_SELECTION = "test-set model selection"
VALIDATION_SELECTION = "validation-set model selection"
UNKNOWN_SELECTION = "unknown model selection (the checkpoint records no training run)"
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 20230715
PREDICTION_SAMPLE_SEED = 0
HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "lr",
    *(f"val_{key}" for key in POOLED_KEYS),
    "val_dsc_mean",
    "val_iou_mean",
    "seconds",
    "images_per_second",
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving that epoch."""


# --- Configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the published recipe (AdamW 1e-3, weight decay 1e-2,
    cosine schedule T_max 50 / eta_min 1e-5 stepped per epoch, batch 8, 300 epochs, seed 42,
    256x256); ``max_*_images`` cap the splits (first N ids) for quick runs."""

    dataset: str = "synthetic"
    data_root: str | None = None
    protocol: str = "paper"
    image_size: int = 256
    model: EGEUNetConfig = field(default_factory=EGEUNetConfig)
    epochs: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    t_max: int = 50
    eta_min: float = 1e-5
    seed: int = 42
    device: str = "auto"
    num_workers: int = 0
    val_interval: int = 1
    normalization: str = "minmax"
    per_run_angle: bool = False
    amp: bool = False
    max_train_images: int | None = None
    max_eval_images: int | None = None
    num_prediction_samples: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", _model_config_from_dict(self.model))
        if not isinstance(self.model, EGEUNetConfig):
            raise ValueError(f"model: expected a model config or dict, got {self.model!r}")
        if self.data_root is not None:
            object.__setattr__(self, "data_root", str(self.data_root))
        _check_types(TrainConfig, {f.name: getattr(self, f.name) for f in fields(self)})
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        self._check_values()

    def _check_values(self) -> None:
        checks = [
            ("protocol", self.protocol in PROTOCOLS, f"one of {', '.join(PROTOCOLS)}"),
            ("normalization", self.normalization in NORMALIZATIONS, f"one of {NORMALIZATIONS}"),
            ("image_size", self.image_size > 0 and self.image_size % 32 == 0, "a positive multiple of 32"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("betas", all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("t_max", self.t_max >= 1, ">= 1"),
            ("eta_min", math.isfinite(self.eta_min) and self.eta_min >= 0, "a finite number >= 0"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("val_interval", self.val_interval >= 1, ">= 1"),
            ("max_train_images", self.max_train_images is None or self.max_train_images >= 1, ">= 1 or null"),
            ("max_eval_images", self.max_eval_images is None or self.max_eval_images >= 1, ">= 1 or null"),
            ("num_prediction_samples", self.num_prediction_samples >= 0, ">= 0"),
        ]  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}: must be {expected}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        """Plain JSON-ready values; ``model`` nested as a dict."""
        data = asdict(self)
        return json.loads(json.dumps(data))  # tuples -> lists, as they round-trip through JSON

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build from a dict (e.g. parsed JSON/YAML); unknown keys raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"a train config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown train config key(s): {', '.join(unknown)}")
        return cls(**data)


def _model_config_from_dict(data: dict) -> EGEUNetConfig:
    unknown = sorted(set(data) - {f.name for f in fields(EGEUNetConfig)})
    if unknown:
        raise ValueError(f"unknown model config key(s): {', '.join('model.' + k for k in unknown)}")
    _check_types(EGEUNetConfig, data, prefix="model.")
    try:
        return EGEUNetConfig(**data)
    except ValueError as error:  # its messages start with the field's name
        raise ValueError(f"model.{error}") from None


def field_types(cls: type) -> dict[str, typing.Any]:
    """Resolved annotations of a dataclass's fields."""
    return typing.get_type_hints(cls)


def _check_types(cls: type, values: dict[str, typing.Any], prefix: str = "") -> None:
    """Reject values of the wrong kind early, naming the field (JSON/YAML give loose
    types): ``values`` maps field names of the dataclass ``cls`` to what was given."""
    annotations = field_types(cls)
    for name, value in values.items():
        if not _has_type(value, annotations[name]):
            raise ValueError(
                f"{prefix}{name}: expected {_type_name(annotations[name])}, got {value!r}"
            )


def _has_type(value: typing.Any, annotation: typing.Any) -> bool:
    """Whether a loosely typed ``value`` fits ``annotation`` (lists count as tuples, ints
    as floats, bools as nothing but bools); other classes are checked where they are built."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in typing.get_args(annotation))
    if origin is tuple:
        items = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            return False
        if len(items) == 2 and items[1] is Ellipsis:
            return all(_has_type(v, items[0]) for v in value)
        return len(value) == len(items) and all(map(_has_type, value, items))
    if annotation is type(None):
        return value is None
    if annotation in (bool, str):
        return isinstance(value, annotation)
    if annotation in (int, float):
        numbers = int if annotation is int else int | float
        return isinstance(value, numbers) and not isinstance(value, bool)
    return True


def _type_name(annotation: typing.Any) -> str:
    """``int | None`` -> "int or null", ``<class 'int'>`` -> "int", ``tuple[int, ...]``
    -> "a list of int values" (for messages)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(annotation)]
        return " or ".join("null" if n == "NoneType" else n for n in names)
    if typing.get_origin(annotation) is tuple:
        items = typing.get_args(annotation)
        count = "" if items[-1] is Ellipsis else f"{len(items)} "
        return f"a list of {count}{_type_name(items[0])} values"
    return getattr(annotation, "__name__", str(annotation))


# --- Data for a protocol -----------------------------------------------------------------


@dataclass
class ProtocolSplits:
    """The id lists a protocol trains, selects and reports on."""

    protocol: str
    selection: str
    train: list[str]
    val: list[str]
    test: list[str]
    val_source: str

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def part(self, name: str) -> list[str]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split: expected train, val or test, got {name!r}")
        return getattr(self, name)


def holdout(
    ids: Sequence[str], fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED
) -> tuple[list[str], list[str]]:
    """Split ``ids`` into (kept, held out) with a seeded shuffle; both keep the input order."""
    count = max(1, round(len(ids) * fraction))
    if count >= len(ids):
        raise ValueError(f"cannot hold out {count} of {len(ids)} training images for validation")
    chosen = set(np.random.default_rng(seed).permutation(len(ids))[:count].tolist())
    kept = [i for n, i in enumerate(ids) if n not in chosen]
    held = [i for n, i in enumerate(ids) if n in chosen]
    return kept, held


def protocol_splits(config: TrainConfig, prepared: PreparedDataset) -> ProtocolSplits:
    """Resolve ``config.protocol`` on ``prepared`` (caps from max_*_images applied)."""
    if config.protocol == "paper":
        paper = prepared.split("paper")
        splits = ProtocolSplits(
            "paper", TEST_SELECTION, paper["train"], paper["test"], paper["test"], "paper test"
        )
    elif config.protocol == "challenge":
        challenge = prepared.split("challenge")
        if "val" not in challenge:
            raise ValueError(f"protocol challenge: {prepared.name} has no challenge val split")
        splits = ProtocolSplits(
            "challenge", TEST_SELECTION, challenge["train"], challenge["val"], challenge["val"],
            "challenge val",
        )  # fmt: skip
    else:
        challenge = prepared.split("challenge")
        if "val" in challenge and "test" in challenge:
            splits = ProtocolSplits(
                "clean", VALIDATION_SELECTION, challenge["train"], challenge["val"],
                challenge["test"], "challenge val",
            )  # fmt: skip
        else:
            paper = prepared.split("paper")
            kept, held = holdout(paper["train"])
            source = f"{HOLDOUT_FRACTION:.0%} hold-out of paper train (seed {HOLDOUT_SEED})"
            splits = ProtocolSplits(
                "clean", VALIDATION_SELECTION, kept, held, paper["test"], source
            )
    if config.max_train_images:
        splits.train = splits.train[: config.max_train_images]
    if config.max_eval_images:
        splits.val = splits.val[: config.max_eval_images]
        splits.test = splits.test[: config.max_eval_images]
    for name, ids in splits.counts().items():
        if ids == 0:
            raise ValueError(
                f"protocol {config.protocol}: the {name} part of {prepared.name} is empty"
            )
    return splits


def open_dataset(config: TrainConfig) -> PreparedDataset:
    return get_prepared(config.dataset, config.data_root, size=config.image_size)


def _loader(config: TrainConfig, prepared: PreparedDataset, ids: list[str], train: bool):
    dataset = SegmentationDataset(
        prepared,
        ids,
        augment=train,
        normalization=config.normalization,
        seed=config.seed,
        per_run_angle=config.per_run_angle,
    )
    return make_loader(
        dataset, config.batch_size, shuffle=train, seed=config.seed, num_workers=config.num_workers
    )


PIPELINES = ("auto", "loader", "device")


def resolve_pipeline(name: str, device: torch.device) -> str:
    """ "auto" -> "device" (batches built on the GPU) on CUDA, "loader" (a DataLoader of
    per-sample CPU work) elsewhere; "loader" and "device" as given."""
    if name not in PIPELINES:
        raise ValueError(f"pipeline: expected one of {', '.join(PIPELINES)}, got {name!r}")
    if name == "auto":
        return "device" if device.type == "cuda" else "loader"
    return name


def _device_loader(
    config: TrainConfig, prepared: PreparedDataset, ids: list[str], device, train: bool
) -> DeviceLoader:
    return DeviceLoader(
        prepared,
        ids,
        config.batch_size,
        shuffle=train,
        seed=config.seed,
        augment=train,
        normalization=config.normalization,
        per_run_angle=config.per_run_angle,
        device=device,
    )


def single_threaded_batches(loader) -> Iterator:
    """Iterate ``loader`` with torch limited to one thread while each batch is assembled.

    Per-sample work (normalisation, flips, rotation of one 256x256 image) is too small to
    gain from intra-op threads, and on a busy machine their synchronisation costs many
    times the work (measured on the shared 2-core machine: 2.6 ms vs 90 ms per augmented
    sample; on a quiet machine about 1 ms either way, and switching costs nothing). Loader workers
    already run single-threaded; this gives the in-process loader (``num_workers=0``) the
    same setting, and so the same results. The model keeps every thread.
    """
    if loader.num_workers > 0:
        yield from loader
        return
    iterator = iter(loader)
    while True:
        threads = torch.get_num_threads()  # read each time: the trainer may change it
        torch.set_num_threads(1)
        try:
            batch = next(iterator)
        except StopIteration:
            return
        finally:
            torch.set_num_threads(threads)
        yield batch


# --- Evaluation --------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Loss and metrics of one pass over a split."""

    loss: float
    metrics: MetricAccumulator


@torch.inference_mode()
def evaluate_loader(
    model: nn.Module,
    loader,
    ids: Sequence[str],
    loss_fn: nn.Module,
    device: torch.device,
    amp: bool = False,
    compute_hd95: bool = False,
    threshold: float = THRESHOLD,
) -> Evaluation:
    """Mean loss (weighted by images) and metrics of ``model`` over an unshuffled loader."""
    model.eval()
    accumulator = MetricAccumulator(threshold=threshold, compute_hd95=compute_hd95)
    total = torch.zeros((), dtype=torch.float64)
    seen = 0
    for images, masks in single_threaded_batches(loader):
        images, masks = images.to(device), masks.to(device)
        with torch.autocast(device.type, enabled=amp):
            outputs = model(images)
        total += loss_fn(outputs, masks).double().cpu() * len(images)
        probabilities = torch.sigmoid(outputs[0].float())
        accumulator.update(probabilities, masks, ids[seen : seen + len(images)])
        seen += len(images)
    if seen != len(ids):
        raise RuntimeError(f"the loader gave {seen} images for {len(ids)} ids")
    return Evaluation(loss=float(total) / max(seen, 1), metrics=accumulator)


def metrics_document(
    evaluation: Evaluation, splits: ProtocolSplits, split: str, model_config: EGEUNetConfig
) -> dict:
    """The metrics.json layout for one evaluation; undefined metrics (NaN) are None, as
    the strict JSON file stores them (null)."""
    results = evaluation.metrics.results()
    document = {
        "protocol": splits.protocol,
        "selection": splits.selection,
        "best_epoch": None,
        "pooled": results["pooled"],
        "per_image": results["per_image"],
        "split": split,
        "num_images": evaluation.metrics.num_images,
        "loss": evaluation.loss,
        "threshold": evaluation.metrics.threshold,
        "counts": splits.counts(),
        "validation_source": splits.val_source,
        "conventions": {
            "pooled": "one confusion matrix over every pixel of the split (the paper's); "
            "iou is the lesion IoU the paper calls mIoU",
            "per_image": "computed per image, then mean/median; isic_score = mean per-image "
            "Jaccard with values < 0.65 counted as 0; hd95 in pixels at the evaluated "
            "size, image diagonal when exactly one mask is empty",
            "undefined": "null where a ratio has a zero denominator, e.g. sensitivity of a "
            "split without lesion pixels",
        },
        "model": json.loads(json.dumps(model_config.to_dict())),
        "num_parameters": count_parameters(EGEUNet(model_config)),
    }
    return json_safe(document)


def write_rows_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    write_text_atomic(path, buffer.getvalue())


@torch.inference_mode()
def write_prediction_samples(
    folder: Path,
    model: nn.Module,
    prepared: PreparedDataset,
    ids: Sequence[str],
    count: int,
    normalization: str,
    device: torch.device,
    threshold: float = THRESHOLD,
) -> list[str]:
    """``<id>.png`` panels (input | truth | prediction) for a fixed sample of ``ids``."""
    if count <= 0 or not ids:
        return []
    positions = np.random.default_rng(PREDICTION_SAMPLE_SEED).permutation(len(ids))[:count]
    chosen = [ids[p] for p in sorted(positions.tolist())]
    dataset = SegmentationDataset(prepared, chosen, augment=False, normalization=normalization)
    images = torch.stack([dataset[i][0] for i in range(len(chosen))]).to(device)
    model.eval()
    predictions = (torch.sigmoid(model(images)[0].float()) >= threshold)[:, 0].cpu().numpy()
    rows = prepared.index_of(chosen)
    for image_id, row, prediction in zip(chosen, rows, predictions, strict=True):
        panel = comparison_panel(
            np.asarray(prepared.images[row]), np.asarray(prepared.masks[row]) > 0, prediction
        )
        save_png(folder / f"{image_id}.png", panel)
    return chosen


# --- Run folder and provenance -----------------------------------------------------------


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def per_image(self) -> Path:
        return self.root / "per_image.csv"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def lock(self) -> Path:
        """Held while a process trains here (see :func:`~egeunet.fileio.folder_lock`)."""
        return self.root / ".train.lock"

    def files(self) -> tuple[Path, ...]:
        """The files a run writes (predictions/ holds ``<id>.png`` panels besides)."""
        return (self.config, self.history, self.last, self.best, self.metrics, self.per_image)

    def foreign_file(self) -> Path | None:
        """A file with a run file's name that no run wrote here, or None: any such file
        when config.json is not a run description of ours (a user's own config, say)."""
        if is_run_description(self.config):
            return None
        return next((path for path in self.files() if path.exists()), None)

    def remove_temporaries(self) -> None:
        """Delete the temporary files killed runs left beside the run's files (call it
        holding the run's lock)."""
        for path in self.files():
            remove_temporaries(path.parent, path.name)
        remove_temporaries(self.predictions, "*.png")


def is_run_description(path: Path) -> bool:
    """Whether ``path`` is the config.json :func:`train` writes into a run folder."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("config"), dict)
        and "data_manifest_hash" in data
    )


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("egeunet")
    except metadata.PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """HEAD of the checkout holding this package, with ``-dirty`` if it has changes."""
    where = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _run_description(
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
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# Fields that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = ("epochs", "device", "num_workers", "data_root")
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


def _check_training_checkpoint(checkpoint: dict, path: Path) -> None:
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


def _check_resumable(saved: dict, config: TrainConfig) -> None:
    current = config.to_dict()
    changed = sorted(
        k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]
    )
    if changed:
        raise ValueError(
            "cannot resume with a different configuration; changed: "
            + ", ".join(f"{k} ({saved.get(k)!r} -> {current[k]!r})" for k in changed)
        )


# --- RNG state ---------------------------------------------------------------------------


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


def _fast_forward(loader, epochs: int) -> None:
    """Advance a fresh loader's sampler as ``epochs`` passes would have (resume)."""
    if isinstance(loader, DeviceLoader):
        loader.fast_forward(epochs)
        return
    for _ in range(epochs):
        for _ in loader.sampler:
            pass


# --- Progress ----------------------------------------------------------------------------


def _format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """A tqdm bar per epoch in a terminal; always one flushed summary line per epoch."""

    def __init__(self, enabled: bool | None, total_epochs: int) -> None:
        self.bars = sys.stderr.isatty() if enabled is None else enabled
        self.total_epochs = total_epochs

    def batches(self, iterable, epoch: int, total: int):
        if not self.bars:
            return iterable
        return tqdm(iterable, total=total, desc=f"epoch {epoch}/{self.total_epochs}", leave=False)

    def epoch_line(self, row: dict, eta_seconds: float) -> None:
        parts = [f"epoch {row['epoch']}/{self.total_epochs}", f"train_loss {row['train_loss']:.4f}"]
        if row.get("val_loss") is not None:
            parts += [f"val_loss {row['val_loss']:.4f}", f"val_dsc {row['val_dsc']:.4f}"]
        parts += [
            f"lr {row['lr']:.2e}",
            f"{row['seconds']:.1f} s",
            f"{row['images_per_second']:.1f} img/s",
            f"ETA {_format_duration(eta_seconds)}",
        ]
        self.line("  ".join(parts))

    def line(self, line: str) -> None:
        if self.bars:
            tqdm.write(line)
        else:
            print(line, flush=True)


# --- Training ----------------------------------------------------------------------------


@dataclass
class TrainingState:
    """What survives between epochs besides model and optimiser."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int | None = None
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


class Trainer:
    """One run of :func:`train`: owns model, optimiser, loaders and the run folder."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike,
        progress: bool | None,
        threads: int | None = None,
        pipeline: str = "auto",
    ) -> None:
        self.config = config
        self.run = RunFolder(Path(run_dir))
        self.device = resolve_device(config.device)
        # CPU threads: a fixed count, or the cores other processes leave free (None).
        self.threads = AdaptiveThreads(fixed=threads, adapt=self.device.type == "cpu")
        self.amp = config.amp and self.device.type == "cuda"
        if config.amp and not self.amp:
            print("amp: mixed precision needs CUDA; training in float32", file=sys.stderr)
        seed_everything(config.seed)
        self.prepared = open_dataset(config)
        self.splits = protocol_splits(config, self.prepared)
        self.model = EGEUNet(config.model).to(self.device)
        self.loss_fn = DeepSupervisionLoss()
        fused_kernels.enable()  # compiled LayerNorm for training; plain ops if unavailable
        # foreach: one multi-tensor update for the ~300 small parameters instead of a loop
        # of per-tensor ops (the default on CUDA only); the same update.
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
            foreach=True,
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config.t_max, eta_min=config.eta_min
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.pipeline = resolve_pipeline(pipeline, self.device)
        if self.pipeline == "device":
            self.train_loader = _device_loader(
                config, self.prepared, self.splits.train, self.device, train=True
            )
            self.val_loader = _device_loader(
                config, self.prepared, self.splits.val, self.device, train=False
            )
        else:
            self.train_loader = _loader(config, self.prepared, self.splits.train, train=True)
            self.val_loader = _loader(config, self.prepared, self.splits.val, train=False)
        self.state = TrainingState()
        self.progress = Progress(progress, config.epochs)

    # Checkpoints

    def _payload(self, full: bool) -> dict:
        payload = model_payload(
            self.model,
            epoch=self.state.epoch,
            train_config=self.config.to_dict(),
            protocol=self.splits.protocol,
            selection=self.splits.selection,
            data_manifest_hash=self.prepared.manifest_hash,
        )
        if full:
            payload.update(
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(),
                scaler_state=self.scaler.state_dict() if self.scaler else None,
                rng=capture_rng(),
                loader_generator=self.train_loader.generator.get_state(),
                training_state=asdict(self.state),
                num_threads=torch.get_num_threads(),
            )
        return payload

    def start(self, resume: bool) -> None:
        require_writable(self.run.root, "run folder")
        if resume:
            self._resume()
            return
        if self.run.last.exists():
            raise ValueError(
                f"run folder {self.run.root} already holds a run; pass resume=True (--resume) "
                "to continue it, or choose another folder"
            )
        foreign = self.run.foreign_file()
        if foreign is not None:
            raise ValueError(
                f"run folder {self.run.root} holds {foreign}, which no egeunet run wrote; "
                "nothing was replaced: choose another run folder (--run-dir)"
            )
        write_json_atomic(
            self.run.config,
            {
                **_run_description(self.config, self.prepared, self.splits, self.device, self.amp),
                "pipeline": self.pipeline,
            },
        )

    def _resume(self) -> None:
        if not self.run.last.is_file():
            raise FileNotFoundError(
                f"cannot resume: {self.run.last} does not exist (no epoch finished there); "
                "start the run without resume"
            )
        checkpoint = load_checkpoint(self.run.last)
        _check_training_checkpoint(checkpoint, self.run.last)
        _check_resumable(checkpoint["train_config"], self.config)
        if checkpoint["data_manifest_hash"] != self.prepared.manifest_hash:
            raise ValueError(
                f"cannot resume: the data in {self.prepared.root} differs from the run's "
                f"(manifest hash {checkpoint['data_manifest_hash'][:12]}...)"
            )
        self.model.load_state_dict(checkpoint["model_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self.scheduler.load_state_dict(checkpoint["scheduler_state"])
        if self.scaler and checkpoint.get("scaler_state"):
            self.scaler.load_state_dict(checkpoint["scaler_state"])
        self.state = TrainingState(**checkpoint["training_state"])
        # History is part of the checkpoint: a kill after last.pt but before history.csv
        # must not lose that epoch's row.
        write_rows_csv(self.run.history, self.state.history, HISTORY_COLUMNS)
        if self.config.epochs < self.state.epoch:
            raise ValueError(
                f"cannot resume with epochs {self.config.epochs}: {self.run.last} has already "
                f"trained {self.state.epoch} epochs; use epochs >= {self.state.epoch} or "
                "another run folder"
            )
        threads = checkpoint.get("num_threads")
        if threads != torch.get_num_threads():
            print(
                f"resume: the run used {threads} torch threads, this process {torch.get_num_threads()}; "
                "CPU results will not be bit-identical to an uninterrupted run",
                file=sys.stderr,
            )
        restore_rng(checkpoint["rng"])
        _fast_forward(self.train_loader, self.state.epoch)  # (validation does not augment)
        self.train_loader.generator.set_state(checkpoint["loader_generator"])
        if self.config.epochs != checkpoint["train_config"]["epochs"]:
            description = json.loads(self.run.config.read_text(encoding="utf-8"))
            description["config"]["epochs"] = self.config.epochs
            write_json_atomic(self.run.config, description)
            # The shorter run's results no longer describe this run (best.pt moves on too):
            # a report must not show them under the new epoch count before it finishes.
            for stale in (self.run.metrics, self.run.per_image):
                stale.unlink(missing_ok=True)

    # Epochs

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over the training loader; returns (mean loss, images seen)."""
        self.model.train()
        total = torch.zeros((), dtype=torch.float64)
        seen = 0
        batches = self.progress.batches(
            single_threaded_batches(self.train_loader), epoch, len(self.train_loader)
        )
        for batch, (images, masks) in enumerate(batches, start=1):
            threads = torch.get_num_threads()
            if self.threads.check() != threads:
                self.progress.line(
                    f"epoch {epoch}, batch {batch}: {torch.get_num_threads()} torch threads "
                    f"(other processes keep {self.threads.changes[-1][0]} cores busy)"
                )
            images = images.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, enabled=self.amp):
                outputs = self.model(images)
            loss = self.loss_fn(outputs, masks)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"non-finite training loss ({loss.item()}) at epoch {epoch}, batch {batch}; "
                    f"stopped. The last good state is {self._last_good()}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            total += loss.detach().double().cpu() * len(images)
            seen += len(images)
        return float(total) / seen, seen

    def _last_good(self) -> str:
        if self.state.epoch == 0:
            return "none (no epoch finished)"
        return f"{self.run.last} (epoch {self.state.epoch})"

    def _validate(self, epoch: int) -> Evaluation:
        evaluation = evaluate_loader(
            self.model, self.val_loader, self.splits.val, self.loss_fn, self.device, self.amp
        )
        if not math.isfinite(evaluation.loss):
            raise TrainingDiverged(
                f"non-finite validation loss ({evaluation.loss}) after epoch {epoch}; stopped. "
                f"The last good state is {self._last_good()}"
            )
        return evaluation

    def run_epochs(self, on_epoch_end: Callable[[int, dict], None] | None) -> None:
        counts = ", ".join(f"{k} {v}" for k, v in self.splits.counts().items())
        self.progress.line(
            f"{self.config.model.name} on {self.prepared.name}: {self.splits.protocol} protocol "
            f"({self.splits.selection}; selection on {self.splits.val_source}), {counts}; "
            f"device {self.device}, {torch.get_num_threads()} threads; run folder {self.run.root}"
        )
        for epoch in range(self.state.epoch + 1, self.config.epochs + 1):
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            train_loss, images = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - started
            self.scheduler.step()
            row: dict = {"epoch": epoch, "train_loss": train_loss, "lr": lr, "val_loss": None}
            validate = epoch % self.config.val_interval == 0 or epoch == self.config.epochs
            evaluation = self._validate(epoch) if validate else None
            if evaluation is not None:
                pooled = evaluation.metrics.result("pooled")
                per_image = evaluation.metrics.result("per_image")
                row["val_loss"] = evaluation.loss
                row.update({f"val_{k}": pooled[k] for k in POOLED_KEYS})
                row.update(val_dsc_mean=per_image["dsc_mean"], val_iou_mean=per_image["iou_mean"])
            row["seconds"] = time.perf_counter() - started
            row["images_per_second"] = images / train_seconds
            self.state.epoch = epoch
            self.state.train_seconds += row["seconds"]
            self.state.history.append(row)
            if evaluation is not None and evaluation.loss < self.state.best_loss:
                self.state.best_loss, self.state.best_epoch = evaluation.loss, epoch
                save_checkpoint(self.run.best, self._payload(full=False))
            save_checkpoint(self.run.last, self._payload(full=True))
            write_rows_csv(self.run.history, self.state.history, HISTORY_COLUMNS)
            mean_seconds = self.state.train_seconds / len(self.state.history)
            self.progress.epoch_line(row, mean_seconds * (self.config.epochs - epoch))
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)

    def finish(self) -> dict:
        """Evaluate best.pt on the protocol's test part and write the final files."""
        best = load_model(self.run.best).model.to(self.device)
        loader = _loader(self.config, self.prepared, self.splits.test, train=False)
        evaluation = evaluate_loader(
            best, loader, self.splits.test, self.loss_fn, self.device, self.amp, compute_hd95=True
        )
        document = metrics_document(evaluation, self.splits, "test", self.config.model)
        document.update(
            best_epoch=self.state.best_epoch,
            train_seconds=round(self.state.train_seconds, 3),
            epochs=self.state.epoch,
            checkpoint="checkpoints/best.pt",
        )
        rows = evaluation.metrics.per_image_rows()
        write_rows_csv(self.run.per_image, rows, list(rows[0]))
        write_prediction_samples(
            self.run.predictions, best, self.prepared, self.splits.test,
            self.config.num_prediction_samples, self.config.normalization, self.device,
        )  # fmt: skip
        write_json_atomic(self.run.metrics, document)
        return document


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool | None = None,
    *,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    threads: int | None = None,
    pipeline: str = "auto",
) -> dict:
    """Train ``config`` into ``run_dir`` and return the final metrics (also metrics.json).

    ``progress``: tqdm bars (True), epoch lines only (False), or bars when stderr is a
    terminal (None). ``on_epoch_end(epoch, history_row)`` runs after each epoch's
    checkpoints are written. ``threads``: torch threads on CPU; None follows the cores
    other processes leave free (:class:`egeunet.threads.AdaptiveThreads`). ``pipeline``:
    where batches are built (:func:`resolve_pipeline`; "device" keeps the split on the GPU,
    :class:`egeunet.data.device.DeviceLoader`). Raises
    :class:`TrainingDiverged` on a non-finite loss, and
    :class:`~egeunet.fileio.FolderBusy` (a ValueError) while another process trains in
    ``run_dir``.
    """
    run = RunFolder(Path(run_dir))
    require_writable(run.root, "run folder")
    with folder_lock(run.lock, f"run folder {run.root}"):
        run.remove_temporaries()
        trainer = Trainer(config, run_dir, progress, threads, pipeline)
        trainer.start(resume)
        if resume and trainer.state.epoch >= config.epochs and trainer.run.metrics.is_file():
            return json.loads(trainer.run.metrics.read_text(encoding="utf-8"))
        trainer.run_epochs(on_epoch_end)
        return trainer.finish()


def evaluate(
    checkpoint: str | os.PathLike,
    split: str = "test",
    *,
    output: str | os.PathLike | None = None,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    protocol: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    threshold: float = THRESHOLD,
    num_prediction_samples: int | None = None,
) -> dict:
    """Evaluate a checkpoint on ``split`` ("train", "val" or "test") of its protocol.

    The data and protocol come from the checkpoint's train config; ``dataset``,
    ``data_root`` and ``protocol`` override them (needed for the authors' raw
    checkpoints, which carry none). Writes metrics.json, per_image.csv and predictions/
    into ``output`` (default: ``<run>/evaluations/<checkpoint>-<split>/`` for a
    checkpoint inside a run folder, else ``<checkpoint>-<split>/`` beside it).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    loaded = load_model(checkpoint)
    out = Path(output) if output else _default_evaluation_folder(Path(checkpoint), split)
    require_writable(out, "evaluation output folder (--output)")
    overrides = {
        k: v
        for k, v in {
            "dataset": dataset,
            "data_root": str(data_root) if data_root else None,
            "protocol": protocol,
            "batch_size": batch_size,
            "device": device,
            "num_prediction_samples": num_prediction_samples,
        }.items()
        if v is not None
    }
    if loaded.train_config is None and dataset is None:
        raise ValueError(
            f"checkpoint {checkpoint} carries no train config: pass dataset (--dataset) "
            "and, for real data, data_root (--data-root)"
        )
    base = TrainConfig.from_dict(loaded.train_config) if loaded.train_config else TrainConfig()
    config = replace(base, model=loaded.model.config, **overrides)
    prepared = open_dataset(config)
    splits = protocol_splits(config, prepared)
    ids = splits.part(split)
    torch_device = resolve_device(config.device)
    model = loaded.model.to(torch_device)
    loader = _loader(config, prepared, ids, train=False)
    evaluation = evaluate_loader(
        model,
        loader,
        ids,
        DeepSupervisionLoss(),
        torch_device,
        compute_hd95=True,
        threshold=threshold,
    )
    document = metrics_document(evaluation, splits, split, config.model)
    document.update(
        selection=checkpoint_selection(loaded, config),
        best_epoch=loaded.epoch,
        checkpoint=str(checkpoint),
        checkpoint_layout=loaded.layout,
    )
    rows = evaluation.metrics.per_image_rows()
    write_rows_csv(out / "per_image.csv", rows, list(rows[0]))
    write_prediction_samples(
        out / "predictions", model, prepared, ids, config.num_prediction_samples,
        config.normalization, torch_device, threshold,
    )  # fmt: skip
    write_json_atomic(out / "metrics.json", document)
    document["output"] = str(out)
    return document


def checkpoint_selection(loaded: LoadedModel, config: TrainConfig) -> str:
    """How the evaluated checkpoint was chosen: a property of its training run, not of the
    protocol it is evaluated under. Under another protocol or dataset than its own run the
    label says so, as those splits may overlap the data the run trained or selected on."""
    recorded = loaded.checkpoint.get("selection") if loaded.layout == "egeunet" else None
    if recorded is None:
        return UNKNOWN_SELECTION
    trained = loaded.train_config or {}
    own = (trained.get("dataset"), loaded.checkpoint.get("protocol"))
    if own == (config.dataset, config.protocol):
        return recorded
    return (
        f"{recorded} ({own[1]} protocol on {own[0]}); evaluated under the {config.protocol} "
        f"protocol on {config.dataset}, whose splits may overlap its training or selection data"
    )


def _default_evaluation_folder(checkpoint: Path, split: str) -> Path:
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "evaluations" / f"{checkpoint.stem}-{split}"
    return checkpoint.parent / f"{checkpoint.stem}-{split}"
