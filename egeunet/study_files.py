"""Study files: a YAML file of datasets, protocols, variants, seeds and the parameters
they share, parsed into every notebook execution it implies (:func:`load_study`), each
checked against its notebook's parameters cell before anything launches.

A training run's configuration is one mapping: the study's ``train:`` section with the
run's variant deep-merged into it, plus the run's dataset, protocol and seed; model fields
may be given at the top level (``ghpa: false``) or under ``model``. It is validated as a
:class:`~egeunet.engine.TrainConfig` at load time and passed to ``03_train`` as its
``train`` parameter, with ``recipe: published``.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from egeunet.engine.config import MODEL_FIELDS as _MODEL_FIELDS
from egeunet.engine.config import TrainConfig, deep_merge, nest_model_fields
from egeunet.fieldtypes import PARAMETER_TYPES, has_type, type_name
from egeunet.runfolder import RunSpec

TRAIN_RECIPE = "published"
"""The recipe every study run starts from (03_train's own default is ``quick``): what a
study file leaves out is the published recipe."""
RUNNER_KEYS = ("num_threads",)
"""Keys of a study's ``train:`` section (or a variant) that are not TrainConfig fields but
tell the runner how to run: ``num_threads``, torch threads per run."""

NOTEBOOKS = {
    "data": "01_data.ipynb",
    "complexity": "02_complexity.ipynb",
    "train": "03_train.ipynb",
    "report": "04_report.ipynb",
    "inference": "05_inference.ipynb",
}
STUDY_KEYS = {
    "name",
    "description",
    "datasets",
    "protocols",
    "seeds",
    "variants",
    "stages",
    "train",
    "data_overview",
    "complexity",
    "inference",
    "report",
    "data_root",
}
REQUIRED_KEYS = ("name", "datasets", "protocols", "seeds", "variants")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# ---------------------------------------------------------------- study files


@dataclass(frozen=True)
class Study:
    """A parsed study file with every run it implies."""

    name: str
    path: Path
    study_dir: Path
    overview: list[RunSpec]
    train: list[RunSpec]
    inference: RunSpec | None
    report: RunSpec | None

    @property
    def runs_dir(self) -> Path:
        return self.study_dir / "runs"


def notebooks_dir() -> Path:
    """The project's ``notebooks/`` folder (``EGEUNET_NOTEBOOKS`` overrides it)."""
    override = os.environ.get("EGEUNET_NOTEBOOKS")
    return Path(override) if override else Path(__file__).resolve().parents[1] / "notebooks"


def default_study_file() -> Path:
    """``studies/quick.yaml`` in the working directory, else in the project."""
    local = Path("studies") / "quick.yaml"
    return local if local.is_file() else Path(__file__).resolve().parents[1] / local


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise ValueError(f"{path}: {message}")


def _list_of(document: dict, key: str, kind: type, path: Path) -> list:
    value = document[key]
    value = value if isinstance(value, list) else [value]
    _require(bool(value), path, f"{key}: must not be empty")
    for item in value:
        _require(
            isinstance(item, kind) and not isinstance(item, bool),
            path,
            f"{key}: expected {kind.__name__} values, got {item!r}",
        )
    return value


def _section(
    document: dict, key: str, path: Path, default: dict | bool | None = None
) -> dict | None:
    """An optional notebook section: a mapping of parameters, ``default`` ({} unless given)
    when absent, None when false (the notebook does not run)."""
    value = document.get(key, {} if default is None else default)
    if value is False:
        return None
    _require(isinstance(value, dict), path, f"{key}: expected a mapping of parameters or false")
    return dict(value)


def read_study_document(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: study file not found")
    try:
        document = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    _require(isinstance(document, dict), path, "expected a mapping at the top level")
    unknown = sorted(set(document) - STUDY_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; known keys: {sorted(STUDY_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in document]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    return document


@dataclass(frozen=True)
class _Layout:
    """Where a study's pieces are: its file, the notebooks, its runs and its data."""

    source: Path
    notebooks: Path
    runs_dir: Path
    data_root: str

    def spec(self, run_id: str, notebook: str, parameters: dict) -> RunSpec:
        """A RunSpec for ``NOTEBOOKS[notebook]`` in ``runs/<run_id>``. The study file's
        ``device`` and ``num_threads`` become the spec's ``device`` and ``threads``, so the
        runner and the executors, which set those parameters from the spec, keep them."""
        _require(
            bool(SAFE_NAME.match(run_id)),
            self.source,
            f"run id {run_id!r} is not a safe folder name; rename the variant",
        )
        threads = parameters.get("num_threads")
        has_threads = isinstance(threads, int) and not isinstance(threads, bool) and threads > 0
        settings = (
            parameters.get("train") if isinstance(parameters.get("train"), dict) else parameters
        )
        return RunSpec(
            run_id,
            str(self.notebooks / NOTEBOOKS[notebook]),
            str(self.runs_dir / run_id),
            parameters,
            threads=threads if has_threads else None,
            device=str(settings.get("device", "auto")),
        )

    def dataset_root(self, dataset: str) -> str:
        """A dataset's own folder: ``<data_root>/<dataset>`` when it exists (one data
        folder for several datasets), else the data root itself; "" when there is none."""
        if self.data_root and (Path(self.data_root) / dataset).is_dir():
            return str(Path(self.data_root) / dataset)
        return self.data_root


def training_run_id(dataset: str, protocol: str, variant: str, seed: int) -> str:
    return f"{dataset}-{protocol}-{variant}-seed{seed}"


STAGE_KEYS = ("name", "datasets", "protocols", "variants", "seeds")


def _stages(document: dict, path: Path) -> list[dict]:
    """The study's stages, in order: ``stages:`` when the file has it, else one stage of
    every dataset x protocol x variant x seed. Each stage may narrow ``datasets``,
    ``protocols``, ``variants`` (names from the top-level ``variants``) and ``seeds``;
    what it leaves out comes from the top level."""
    variants = document["variants"]
    _require(
        isinstance(variants, dict) and bool(variants),
        path,
        "variants: expected a mapping of variant name -> parameters",
    )
    everything = {
        "datasets": _list_of(document, "datasets", str, path),
        "protocols": _list_of(document, "protocols", str, path),
        "variants": list(variants),
        "seeds": _list_of(document, "seeds", int, path),
    }
    if "stages" not in document:
        return [{"name": "all", **everything}]
    listed = document["stages"]
    _require(
        isinstance(listed, list) and bool(listed) and all(isinstance(s, dict) for s in listed),
        path,
        "stages: expected a list of mappings (name, datasets, protocols, variants, seeds)",
    )
    stages = []
    for number, stage in enumerate(listed, start=1):
        where = f"stages[{number}]"
        for key in stage:
            _require(key in STAGE_KEYS, path, f"{where}: unknown key {key!r}; use {STAGE_KEYS}")
        resolved = {"name": str(stage.get("name", f"stage {number}"))}
        for key, kind in (("datasets", str), ("protocols", str), ("variants", str), ("seeds", int)):
            if key in stage:
                resolved[key] = _list_of(stage, key, kind, path)
                for value in resolved[key]:
                    _require(
                        value in everything[key],
                        path,
                        f"{where}.{key}: {value!r} is not in the top-level {key}",
                    )
            else:
                resolved[key] = everything[key]
        stages.append(resolved)
    return stages


@dataclass(frozen=True)
class PlannedRun:
    """One training run a study file declares: its stage, id, identity and the training
    parameters it shares with the others plus its variant's overrides."""

    stage: str
    run_id: str
    dataset: str
    protocol: str
    variant: str
    seed: int
    parameters: dict = field(default_factory=dict)
    """The study's ``train:`` section with the variant deep-merged into it (model fields
    nested under ``model``), before dataset, protocol and seed are added."""


def _nested(section: dict, path: Path, where: str) -> dict:
    try:
        return nest_model_fields(section)
    except ValueError as error:
        raise ValueError(f"{path}: {where}: {error}") from None


def _planned_runs(document: dict, path: Path) -> list[PlannedRun]:
    """Every training run, stage by stage (a run that two stages name belongs to the first
    that names it), each stage with its first seed first."""
    variants = document["variants"]
    shared = _section(document, "train", path) or {}
    planned = []
    seen = set()
    for stage in _stages(document, path):
        # Seed outermost: every dataset and variant of a stage gets its first seed first.
        for seed, dataset, protocol, variant in itertools.product(
            stage["seeds"], stage["datasets"], stage["protocols"], stage["variants"]
        ):
            overrides = variants[variant]
            _require(
                isinstance(overrides, dict | None),
                path,
                f"variants.{variant}: expected a mapping of parameters",
            )
            run_id = training_run_id(dataset, protocol, variant, seed)
            if run_id in seen:
                continue
            seen.add(run_id)
            parameters = deep_merge(
                _nested(shared, path, "train"),
                _nested(overrides or {}, path, f"variants.{variant}"),
            )
            planned.append(
                PlannedRun(stage["name"], run_id, dataset, protocol, variant, seed, parameters)
            )
    return planned


def planned_runs(path: str | Path) -> list[PlannedRun]:
    """The training runs of the study file at ``path``, in the order the runner starts them."""
    path = Path(path)
    return _planned_runs(read_study_document(path), path)


def _training_specs(document: dict, layout: _Layout) -> list[RunSpec]:
    """03_train once per seed x dataset x protocol x variant of each stage, stage by stage,
    each with its whole configuration, validated here, before anything launches."""
    specs = []
    for run in _planned_runs(document, layout.source):
        settings = {k: v for k, v in run.parameters.items() if k not in RUNNER_KEYS}
        settings.update(
            dataset=run.dataset,
            data_root=layout.dataset_root(run.dataset) or None,
            protocol=run.protocol,
            seed=run.seed,
        )
        try:
            config = TrainConfig.from_recipe(TRAIN_RECIPE, settings)
        except ValueError as error:
            raise ValueError(
                f"{layout.source}: run {run.run_id} (train: with variants.{run.variant}): {error}"
            ) from None
        parameters = {
            "recipe": TRAIN_RECIPE,
            "train": config.to_dict(),
            "run_dir": str(layout.runs_dir / run.run_id),
        }
        parameters.update({k: run.parameters[k] for k in RUNNER_KEYS if k in run.parameters})
        specs.append(layout.spec(run.run_id, "train", parameters))
    return specs


def train_parameters_from_flat(parameters: dict) -> dict:
    """The 03_train parameters of a run recorded before the notebook took one ``train``
    mapping (flat fields, ``""`` and ``0`` for none), in today's form: an ``outcome.json``
    written then still names the same run."""
    if "train" in parameters or not {"dataset", "seed", "run_dir"} <= set(parameters):
        return parameters
    fields = set(TrainConfig.__dataclass_fields__) | set(_MODEL_FIELDS)
    train = {k: v for k, v in parameters.items() if k in fields}
    for key in ("data_root", "max_train_images", "max_eval_images"):
        if key in train and not train[key]:
            train[key] = None
    rest = {k: v for k, v in parameters.items() if k not in fields}
    try:
        config = TrainConfig.from_recipe(TRAIN_RECIPE, nest_model_fields(train))
    except ValueError:
        return parameters  # not a run of ours: compared as recorded
    return {**rest, "recipe": TRAIN_RECIPE, "train": config.to_dict()}


def _overview_specs(document: dict, layout: _Layout) -> list[RunSpec]:
    """01_data once per dataset and 02_complexity once, unless switched off."""
    specs = []
    data_section = _section(document, "data_overview", layout.source)
    if data_section is not None:
        for dataset in document["datasets"]:
            run_id = f"01_data-{dataset}"
            parameters = {
                **data_section,
                "dataset": dataset,
                "data_root": layout.dataset_root(dataset),
                "output_dir": str(layout.runs_dir / run_id),
            }
            specs.append(layout.spec(run_id, "data", parameters))
    complexity_section = _section(document, "complexity", layout.source)
    if complexity_section is not None:
        run_id = "02_complexity"
        parameters = {**complexity_section, "output_dir": str(layout.runs_dir / run_id)}
        specs.append(layout.spec(run_id, "complexity", parameters))
    return specs


def _inference_spec(document: dict, layout: _Layout, has_examples: bool) -> RunSpec | None:
    """05_inference on the checkpoint of the first dataset, protocol and seed of the
    section's ``variant`` (default ``egeunet``, else the first variant), segmenting its
    ``input_path`` (relative to the study file) or 01_data's example images. On by default
    when 01_data runs."""
    from egeunet.data_overview import EXAMPLES_FOLDER

    path = layout.source
    section = _section(document, "inference", path, default={} if has_examples else False)
    if section is None:
        return None
    variants = document["variants"]
    variant = section.pop("variant", "egeunet" if "egeunet" in variants else next(iter(variants)))
    _require(variant in variants, path, f"inference.variant: {variant!r} is not a variant here")
    dataset = _list_of(document, "datasets", str, path)[0]
    source_run = training_run_id(
        dataset,
        _list_of(document, "protocols", str, path)[0],
        variant,
        _list_of(document, "seeds", int, path)[0],
    )
    if "input_path" in section:
        input_path = (path.parent / str(section.pop("input_path"))).resolve()
    else:
        _require(
            has_examples,
            path,
            "inference: give input_path, or keep data_overview for its example images",
        )
        input_path = layout.runs_dir / f"01_data-{dataset}" / EXAMPLES_FOLDER
    parameters = {
        **section,
        "checkpoint": str(layout.runs_dir / source_run / "checkpoints" / "best.pt"),
        "input_path": str(input_path),
        "output_dir": str(layout.runs_dir / "05_inference"),
        "interactive": False,
    }
    return layout.spec("05_inference", "inference", parameters)


def _report_spec(document: dict, layout: _Layout, study_dir: Path, name: str) -> RunSpec | None:
    section = _section(document, "report", layout.source)
    if section is None:
        return None
    parameters = {
        **section,
        "study_dir": str(study_dir),
        "study_name": name,
        "study_file": str(layout.source.resolve()),
    }
    return layout.spec("04_report", "report", parameters)


def load_study(
    path: str | Path,
    data_root: str | Path | None = None,
    reports_root: str | Path = "reports",
    notebooks: str | Path | None = None,
) -> Study:
    """Parse a study file into its runs. ``data_root`` overrides the file's ``data_root``
    (which is relative to the study file); reports go to ``<reports_root>/<name>/``."""
    path = Path(path)
    document = read_study_document(path)
    name = str(document["name"])
    _require(bool(SAFE_NAME.match(name)), path, f"name: {name!r} is not a safe folder name")
    if data_root is None and document.get("data_root"):
        data_root = path.parent / str(document["data_root"])
    study_dir = (Path(reports_root) / name).resolve()
    layout = _Layout(
        source=path,
        notebooks=Path(notebooks) if notebooks else notebooks_dir(),
        runs_dir=study_dir / "runs",
        data_root=str(Path(data_root).resolve()) if data_root else "",
    )
    train = _training_specs(document, layout)
    overview = _overview_specs(document, layout)
    has_examples = any(spec.run_id.startswith("01_data-") for spec in overview)
    inference = _inference_spec(document, layout, has_examples)
    report = _report_spec(document, layout, study_dir, name)
    return Study(name, path, study_dir, overview, train, inference, report)


# ---------------------------------------------------------------- parameter checks


def notebook_parameters(notebook: str | Path) -> dict[str, dict]:
    """The parameters a notebook's ``parameters`` cell declares (papermill's inspection)."""
    import papermill

    return papermill.inspect_notebook(str(notebook))


def check_parameters(spec: RunSpec, declared: dict[str, dict], source: Path) -> None:
    """Every parameter of ``spec`` must be declared in its notebook's parameters cell, with
    a value of the declared type; otherwise ValueError naming the parameter."""
    notebook = Path(spec.notebook).name
    for name, value in spec.parameters.items():
        if name not in declared:
            raise ValueError(
                f"{source}: unknown parameter {name!r} for {notebook} (run {spec.run_id}); "
                f"its parameters are: {', '.join(sorted(declared))}"
            )
        annotation = PARAMETER_TYPES.get(declared[name].get("inferred_type_name", "None"))
        if annotation is not None and not has_type(value, annotation):
            raise ValueError(
                f"{source}: parameter {name!r} of {notebook} (run {spec.run_id}) must be "
                f"{type_name(annotation)}, got {value!r}"
            )


def check_study(study: Study) -> None:
    """Check every run's parameters against its notebook before anything launches."""
    declared: dict[str, dict[str, dict]] = {}
    extras = [spec for spec in (study.inference, study.report) if spec is not None]
    specs = [*study.overview, *study.train, *extras]
    for spec in specs:
        if spec.notebook not in declared:
            if not Path(spec.notebook).is_file():
                raise FileNotFoundError(f"{spec.notebook}: notebook not found (run {spec.run_id})")
            declared[spec.notebook] = notebook_parameters(spec.notebook)
        check_parameters(spec, declared[spec.notebook], study.path)
