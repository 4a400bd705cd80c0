"""Training and evaluation: the published recipe, run folders, resumable runs, protocols.

:func:`train` runs one configuration (:class:`TrainConfig`, defaults = the published
recipe) into a run folder (its files: :mod:`egeunet.runfolder`); :func:`evaluate`
evaluates a checkpoint on a split of its protocol. The package's modules, each one thing:

* :mod:`~egeunet.engine.config`: :class:`TrainConfig`, the named recipes, what a resume
  may change;
* :mod:`~egeunet.engine.protocols`: which ids train, select and report under the
  ``paper``, ``clean`` and ``challenge`` protocols, and the loaders;
* :mod:`~egeunet.engine.evaluation`: metrics over a split and the one writer of
  evaluation outputs (``metrics.json``, ``per_image.csv``, ``predictions/``, ``cases.npz``);
* :mod:`~egeunet.engine.reproducibility`: seeds, RNG states, the resume fast-forward,
  provenance;
* :mod:`~egeunet.engine.trainer`: :class:`Trainer` (with its :meth:`Trainer.step` and
  step/epoch callbacks) and :func:`train`.
"""

from egeunet.engine.config import (
    PROTOCOLS,
    RECIPES,
    RESUMABLE_CHANGES,
    Protocol,
    TrainConfig,
    deep_merge,
    nest_model_fields,
)
from egeunet.engine.evaluation import (
    UNKNOWN_SELECTION,
    Evaluation,
    checkpoint_selection,
    evaluate,
    evaluate_loader,
    metrics_document,
    write_evaluation,
)
from egeunet.engine.protocols import (
    HOLDOUT_FRACTION,
    HOLDOUT_SEED,
    PIPELINES,
    TEST_SELECTION,
    VALIDATION_SELECTION,
    Pipeline,
    ProtocolSplits,
    holdout,
    open_dataset,
    protocol_splits,
    resolve_pipeline,
)
from egeunet.engine.trainer import (
    HISTORY_COLUMNS,
    IF_EXISTS,
    Progress,
    Trainer,
    TrainingDiverged,
    train,
    train_run,
)

__all__ = [
    "HISTORY_COLUMNS",
    "HOLDOUT_FRACTION",
    "HOLDOUT_SEED",
    "IF_EXISTS",
    "PIPELINES",
    "PROTOCOLS",
    "RECIPES",
    "RESUMABLE_CHANGES",
    "TEST_SELECTION",
    "UNKNOWN_SELECTION",
    "VALIDATION_SELECTION",
    "Evaluation",
    "Pipeline",
    "Progress",
    "Protocol",
    "ProtocolSplits",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "checkpoint_selection",
    "deep_merge",
    "evaluate",
    "evaluate_loader",
    "holdout",
    "metrics_document",
    "nest_model_fields",
    "open_dataset",
    "protocol_splits",
    "resolve_pipeline",
    "train",
    "train_run",
    "write_evaluation",
]
