"""``egeunet train``, ``egeunet evaluate`` and ``egeunet predict``.

``egeunet train`` builds a :class:`~egeunet.engine.TrainConfig` from, in increasing
priority, its defaults (the published recipe), ``--config FILE`` (JSON or YAML, a
mapping of TrainConfig fields with ``model`` nested, or a run's config.json) and one
option per field on the command line: ``--epochs 2``, ``--max-train-images 64``,
``--model.gab false``, ``--model.widths 8,16,24,32,48,64``, ``--betas 0.9,0.99``,
``--max-eval-images none``.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from egeunet.checkpoint import SHIPPED_WEIGHTS
from egeunet.engine import PIPELINES, PROTOCOLS, TrainConfig, TrainingDiverged, evaluate, train
from egeunet.engine.config import CHOICES
from egeunet.fieldtypes import field_default, field_types, parse_text
from egeunet.metrics import METRICS, THRESHOLD
from egeunet.model import EGEUNetConfig
from egeunet.predict import BACKENDS, predict


def _option_names(name: str) -> list[str]:
    spellings = [f"--{name.replace('_', '-')}"]
    if "_" in name:
        spellings.append(f"--{name}")
    return spellings


def _describe_default(value: typing.Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "configuration overrides",
        "Every TrainConfig field; lists are comma-separated, none = null.",
    )
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "model":
            continue
        group.add_argument(
            *_option_names(f.name),
            dest=f"set:{f.name}",
            metavar="VALUE" if f.name not in CHOICES else None,
            choices=CHOICES.get(f.name),
            default=argparse.SUPPRESS,
            help=f"(default {_describe_default(getattr(defaults, f.name))})",
        )
    model_group = parser.add_argument_group("model overrides", "Fields of EGEUNetConfig.")
    for f in fields(EGEUNetConfig):
        default = field_default(EGEUNetConfig, f.name)
        model_group.add_argument(
            *_option_names(f"model.{f.name}"),
            dest=f"set:model.{f.name}",
            metavar="VALUE",
            default=argparse.SUPPRESS,
            help=f"(default {_describe_default(default)})",
        )


def read_config_file(path: str | Path) -> dict:
    """A TrainConfig mapping from JSON or YAML (a run's config.json works too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"config file {path} is not valid JSON/YAML: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # a run folder's config.json
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of TrainConfig fields")
    return data


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data = read_config_file(args.config) if args.config else {}
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise ValueError(f"model: expected a mapping of model fields, got {model!r}")
    model = dict(model)
    train_types = field_types(TrainConfig)
    model_types = field_types(EGEUNetConfig)
    for dest, text in vars(args).items():
        if not dest.startswith("set:"):
            continue
        name = dest[len("set:") :]
        if name.startswith("model."):
            key = name[len("model.") :]
            model[key] = parse_text(text, model_types[key], name)
        else:
            data[name] = parse_text(text, train_types[name], name)
    if model:
        data["model"] = model
    return TrainConfig.from_dict(data)


def _figure(value: float | None, digits: int = 4) -> str:
    """A metric for display; "n/a" for an undefined one (null in metrics.json)."""
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


REDUCTION_TITLES = {
    "pooled": "pooled over all pixels (paper convention)",
    "per_image": "per image",
}


def format_metrics(document: dict) -> str:
    """A short, labelled summary of a metrics.json document: one line per reduction,
    every metric of :data:`egeunet.metrics.METRICS` as stored (ratios in [0, 1])."""
    lines = [
        f"{document['protocol']} protocol, {document['selection']}, best epoch "
        f"{document.get('best_epoch')}; split {document['split']} ({document['num_images']} images)"
    ]
    for reduction, title in REDUCTION_TITLES.items():
        values = document.get(reduction, {})
        parts = [
            f"{m.label} {_figure(values.get(m.key), 4 if m.percent else 2)}"
            + ("" if m.percent else f" {m.unit}")
            for m in METRICS
            if m.reduction == reduction
        ]
        lines.append(f"{title}: " + "  ".join(parts))
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _progress_choice(text: str) -> bool | None:
    return {"auto": None, "bars": True, "lines": False}[text]


def run_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    run_dir = args.run_dir or Path("runs") / (
        f"{config.dataset}-{config.model.name}-{config.protocol}-seed{config.seed}"
    )
    try:
        document = train(
            config,
            run_dir,
            resume=args.resume,
            restart=args.restart,
            progress=_progress_choice(args.progress),
            threads=args.threads,
            pipeline=args.pipeline,
            processes=args.processes,
        )
    except TrainingDiverged as error:
        print(f"egeunet train: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"egeunet train: interrupted; continue with --resume --run-dir {run_dir}",
            file=sys.stderr,
        )
        return 130
    print(format_metrics(document))
    print(f"run folder: {run_dir}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    document = evaluate(
        args.checkpoint,
        args.split,
        output=args.output,
        dataset=args.dataset,
        data_root=args.data_root,
        protocol=args.protocol,
        device=args.device,
        batch_size=args.batch_size,
        threshold=args.threshold,
    )
    print(format_metrics(document))
    print(f"written to {document['output']}")
    return 0


def predict_model(args: argparse.Namespace) -> tuple[str, str]:
    """(model file or weights name, backend) from predict's --weights, --onnx and
    --backend; ValueError naming the options for a combination that does not fit."""
    backend = args.backend or ("onnxruntime" if args.onnx else "torch")
    if args.checkpoint and args.onnx:
        raise ValueError("give --weights (PyTorch) or --onnx (ONNX Runtime), not both")
    if backend == "onnxruntime":
        if not args.onnx:
            raise ValueError("--backend onnxruntime needs --onnx FILE (from `egeunet export`)")
        return args.onnx, backend
    if not args.checkpoint:
        raise ValueError("give --weights FILE_OR_NAME (or --onnx FILE for ONNX Runtime)")
    return args.checkpoint, backend


def run_predict(args: argparse.Namespace) -> int:
    model, backend = predict_model(args)
    summary = predict(
        model,
        args.input,
        args.output,
        threshold=args.threshold,
        batch_size=args.batch_size,
        device=args.device,
        recursive=args.recursive,
        overlays=not args.no_overlays,
        overwrite=args.overwrite,
        backend=backend,
    )
    print(summary.message())
    return 0 if summary.written or not summary.failed else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    train_parser = subparsers.add_parser(
        "train",
        help="train EGE-UNet (published recipe by default) into a run folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_parser.add_argument("--config", help="JSON or YAML file of TrainConfig fields")
    train_parser.add_argument(
        "--run-dir", help="run folder (default runs/<dataset>-<model>-<protocol>-seed<seed>)"
    )
    train_parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from checkpoints/last.pt",
    )
    train_parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the run --run-dir holds (its files only) and start over",
    )
    train_parser.add_argument(
        "--progress",
        choices=("auto", "bars", "lines"),
        default="auto",
        help="tqdm bars, one line per epoch, or bars only in a terminal (default auto)",
    )
    train_parser.add_argument(
        "--threads",
        type=_positive_int,
        help="torch threads on CPU (default: the cores other processes leave free, "
        "re-checked every 10 s of training; with a helper process, half of them each, "
        "fixed)",
    )
    train_parser.add_argument(
        "--processes",
        type=int,
        choices=(1, 2),
        help="processes per training step on CPU: 2 adds a helper process that computes "
        "half of every batch's gradient, each process with half the threads (default: 2 "
        "when the run has 2 or more CPU threads, else 1)",
    )
    train_parser.add_argument(
        "--pipeline",
        choices=PIPELINES,
        default="auto",
        help="where batches are built: device (the split on the GPU, augmented there), "
        "loader (per-sample CPU work), auto (device on CUDA, else loader; default)",
    )
    _add_config_options(train_parser)
    train_parser.set_defaults(func=run_train)

    eval_parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint on a split (pooled and per-image metrics, HD95)",
        description="Evaluate a checkpoint on the train, val or test part of its protocol; "
        "writes metrics.json, per_image.csv and predictions/.",
    )
    eval_parser.add_argument(
        "--weights",
        "--checkpoint",
        dest="checkpoint",
        required=True,
        help="a .pt file (ours or the authors'), or shipped weights: "
        + ", ".join(SHIPPED_WEIGHTS)
        + " (--checkpoint is the same option)",
    )
    eval_parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    eval_parser.add_argument(
        "--output", help="folder for the results (default beside the checkpoint)"
    )
    eval_parser.add_argument(
        "--dataset", help="override the checkpoint's dataset (required for raw state dicts)"
    )
    eval_parser.add_argument("--data-root", help="folder holding the dataset's files")
    eval_parser.add_argument("--protocol", choices=PROTOCOLS)
    eval_parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    eval_parser.add_argument("--batch-size", type=int)
    eval_parser.add_argument(
        "--threshold",
        type=float,
        default=THRESHOLD,
        help=f"lesion probability threshold (default {THRESHOLD})",
    )
    eval_parser.set_defaults(func=run_evaluate)

    predict_parser = subparsers.add_parser(
        "predict",
        help="segment image files: masks at original size plus overlays",
        description="Segment images PIL can read; writes <name>_mask.png (0/255, original "
        "size) and <name>_overlay.png per image and summary.json. Unreadable files are "
        "reported and skipped. Files in --output that predict did not write are never "
        "replaced. Exit code 1 only when nothing could be predicted.",
    )
    predict_parser.add_argument(
        "--weights",
        "--checkpoint",
        dest="checkpoint",
        help="a .pt file (ours or the authors'), or shipped weights: "
        + ", ".join(SHIPPED_WEIGHTS)
        + " (--checkpoint is the same option)",
    )
    predict_parser.add_argument(
        "--onnx", help="an .onnx file from `egeunet export` (runs in ONNX Runtime)"
    )
    predict_parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="torch for --weights, onnxruntime for --onnx (default: whichever is given)",
    )
    predict_parser.add_argument(
        "--input", required=True, nargs="+", help="image files and/or folders"
    )
    predict_parser.add_argument("--output", required=True, help="output folder")
    predict_parser.add_argument(
        "--threshold",
        type=float,
        default=THRESHOLD,
        help=f"lesion probability threshold (default {THRESHOLD})",
    )
    predict_parser.add_argument("--batch-size", type=int, default=8)
    predict_parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict_parser.add_argument("--recursive", action="store_true", help="also search subfolders")
    predict_parser.add_argument("--no-overlays", action="store_true", help="write masks only")
    predict_parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs an earlier predict wrote into --output (other files never are)",
    )
    predict_parser.set_defaults(func=run_predict)
