"""The training configuration: :class:`TrainConfig` (defaults = the published recipe),
named recipes, and what may change when a run is resumed.

One path builds a configuration from anywhere: a mapping of TrainConfig fields (``model``
nested) given to :meth:`TrainConfig.from_dict`, checked by :mod:`egeunet.fieldtypes`.
``egeunet train`` turns its options into that mapping, a study file deep-merges a variant
into its ``train:`` section, and the ``03_train`` notebook takes it as its ``train``
parameter on top of a named recipe (:data:`RECIPES`).
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass, field, fields

from egeunet.data.dataset import NORMALIZATIONS
from egeunet.fieldtypes import check_fields
from egeunet.model import SIZE_MULTIPLE, EGEUNetConfig, is_image_size


class Protocol(enum.StrEnum):
    """Which data trains, selects the checkpoint and reports (see :mod:`egeunet.engine.protocols`)."""

    PAPER = "paper"
    CLEAN = "clean"
    CHALLENGE = "challenge"


PROTOCOLS = tuple(p.value for p in Protocol)
CHOICES = {"protocol": PROTOCOLS, "normalization": NORMALIZATIONS}
"""The values a text field may take (the command line offers them as choices)."""

RECIPES: dict[str, dict] = {
    "published": {},
    "quick": {
        "dataset": "synthetic",
        "image_size": 64,
        "epochs": 5,
        "max_train_images": 64,
        "max_eval_images": 32,
        "num_prediction_samples": 4,
    },
}
"""Named starting points: ``published`` is TrainConfig's defaults (300 epochs at 256x256,
hours on a CPU); ``quick`` a short run on the embedded synthetic data (a few minutes on 2
CPU cores) that shows every output of a run."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the published recipe (AdamW 1e-3, weight decay 1e-2,
    cosine schedule T_max 50 / eta_min 1e-5 stepped per epoch, batch 8, 300 epochs, seed 42,
    256x256); ``max_*_images`` cap the splits (first N ids) for quick runs."""

    dataset: str = "synthetic"
    data_root: str | None = None
    protocol: str = Protocol.PAPER.value
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
        check_fields(TrainConfig, {f.name: getattr(self, f.name) for f in fields(self)})
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "protocol", str(self.protocol))
        self._check_values()

    def _check_values(self) -> None:
        checks = [
            *((name, getattr(self, name) in values, f"one of {', '.join(values)}")
              for name, values in CHOICES.items()),
            ("image_size", is_image_size(self.image_size), f"a positive multiple of {SIZE_MULTIPLE}"),
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

    @classmethod
    def from_recipe(cls, recipe: str, overrides: dict | None = None) -> TrainConfig:
        """The named recipe (:data:`RECIPES`) with ``overrides`` deep-merged into it."""
        if recipe not in RECIPES:
            raise ValueError(f"recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
        if overrides is not None and not isinstance(overrides, dict):
            raise ValueError(f"train: expected a mapping of TrainConfig fields, got {overrides!r}")
        return cls.from_dict(deep_merge(RECIPES[recipe], overrides or {}))


def _model_config_from_dict(data: dict) -> EGEUNetConfig:
    unknown = sorted(set(data) - {f.name for f in fields(EGEUNetConfig)})
    if unknown:
        raise ValueError(f"unknown model config key(s): {', '.join('model.' + k for k in unknown)}")
    check_fields(EGEUNetConfig, data, prefix="model.")
    try:
        return EGEUNetConfig(**data)
    except ValueError as error:  # its messages start with the field's name
        raise ValueError(f"model.{error}") from None


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` on top; mappings present in both are merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


MODEL_FIELDS = tuple(f.name for f in fields(EGEUNetConfig))


def nest_model_fields(data: dict) -> dict:
    """``data`` with model fields given at the top level (``ghpa: false``, the short form
    study variants use) moved under ``model``; a name in both places is an error."""
    flat = {k: v for k, v in data.items() if k in MODEL_FIELDS}
    if not flat:
        return dict(data)
    nested = data.get("model") or {}
    if not isinstance(nested, dict):
        raise ValueError(f"model: expected a mapping of model fields, got {nested!r}")
    both = sorted(set(flat) & set(nested))
    if both:
        raise ValueError(f"{both[0]}: given both at the top level and under model")
    rest = {k: v for k, v in data.items() if k not in MODEL_FIELDS}
    return {**rest, "model": {**nested, **flat}}


RESUMABLE_CHANGES = ("epochs", "device", "num_workers", "data_root")
"""Fields that may change between a run and its resumption without changing its results."""


def config_changes(saved: dict, config: TrainConfig) -> list[str]:
    """What differs between a run's saved config and ``config``, beyond
    :data:`RESUMABLE_CHANGES`, as ``"field (old -> new)"``; model fields as ``model.x``."""
    current = config.to_dict()
    changes = []
    for key in sorted(current):
        if key in RESUMABLE_CHANGES or saved.get(key) == current[key]:
            continue
        old, new = saved.get(key), current[key]
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [
                f"{key}.{k} ({old.get(k)!r} -> {new.get(k)!r})"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
        else:
            changes.append(f"{key} ({old!r} -> {new!r})")
    return changes
