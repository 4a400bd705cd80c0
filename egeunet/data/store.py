"""Open prepared folders (``PreparedDataset``) and find or make them (``get_prepared``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from egeunet.data import splits as split_rules
from egeunet.data import synthetic
from egeunet.data.prepare import (
    array_shapes,
    check_array_file,
    check_dataset_name,
    prepare_dataset,
    read_manifest,
)
from egeunet.fileio import is_writable_folder, write_json_atomic

CACHE_ENV = "EGEUNET_CACHE"


class PreparedDataset:
    """A prepared folder: ids, memory-mapped arrays, manifest and splits.

    ``images`` is (N, S, S, 3) uint8 and ``masks`` (N, S, S) uint8 in {0, 1}, row i
    belonging to ``ids[i]``. Arrays are opened read-only on first use and reopened (not
    copied) when the object is pickled into DataLoader worker processes.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.manifest: dict = read_manifest(self.root)
        self.name: str = self.manifest["dataset"]
        self.size: int = int(self.manifest["size"])
        self.manifest_hash: str = self.manifest["content_hash"]
        self.ids: list[str] = [item["id"] for item in self.manifest["items"]]
        self._position = {sample_id: i for i, sample_id in enumerate(self.ids)}
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"PreparedDataset({self.name!r}, size={self.size}, n={len(self)}, root={str(self.root)!r})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    @property
    def images(self) -> np.ndarray:
        return self._array("images")

    @property
    def masks(self) -> np.ndarray:
        return self._array("masks")

    @property
    def original_sizes(self) -> np.ndarray:
        """(N, 2) int: height and width of each source image before resizing."""
        return np.array([[i["height"], i["width"]] for i in self.manifest["items"]], dtype=np.int64)

    @property
    def lesion_fractions(self) -> np.ndarray:
        """(N,) float: share of lesion pixels in each source mask."""
        return np.array([i["lesion_fraction"] for i in self.manifest["items"]], dtype=np.float64)

    def index_of(self, ids: list[str] | tuple[str, ...]) -> np.ndarray:
        """Row numbers of ``ids`` in the arrays (KeyError naming an unknown id)."""
        try:
            return np.array([self._position[sample_id] for sample_id in ids], dtype=np.int64)
        except KeyError as error:
            raise KeyError(
                f"id {error.args[0]!r} is not in the prepared dataset {self.root}"
            ) from None

    def split(self, name: str) -> dict[str, list[str]]:
        """Id lists of split ``name``: "challenge", "paper" or "kfold-<k>-<i>"."""
        document = self._split_document(name)
        return {part: list(document[part]) for part in ("train", "val", "test") if part in document}

    def save_kfold(self, k: int, seed: int = split_rules.PAPER_SPLIT_SEED) -> list[Path]:
        """Write ``splits/kfold-<k>-<i>.json`` for every fold; returns the files."""
        pool = split_rules.paper_pool(self.split("challenge"))
        split_rules.check_kfold(k, len(pool))
        written = []
        for fold in range(k):
            document = split_rules.kfold_document(pool, k, fold, seed)
            path = self.root / "splits" / f"{document['name']}.json"
            write_json_atomic(path, document)
            written.append(path)
        return written

    def _split_document(self, name: str) -> dict:
        path = self.root / "splits" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        kfold = split_rules.parse_kfold(name)
        if kfold is None:
            raise ValueError(f"unknown split {name!r}: expected challenge, paper or kfold-<k>-<i>")
        pool = split_rules.paper_pool(self.split("challenge"))
        return split_rules.kfold_document(pool, *kfold)

    def _array(self, name: str) -> np.ndarray:
        """The array ``name`` memory-mapped, after checking it against the manifest."""
        if name not in self._arrays:
            path = self.root / f"{name}.npy"
            check_array_file(path, array_shapes(self.manifest)[name])
            self._arrays[name] = np.load(path, mmap_mode="r")
        return self._arrays[name]


def default_cache_root() -> Path:
    """``$EGEUNET_CACHE`` if set, else ``~/.cache/egeunet``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "egeunet"


def cache_folder(
    dataset: str,
    data_root: str | os.PathLike | None,
    size: int,
    cache_dir: str | os.PathLike | None,
    num_synthetic: int | None,
    seed: int,
) -> Path:
    """Where ``get_prepared`` keeps a dataset (see its docstring)."""
    if dataset == "synthetic":
        total = sum(synthetic.split_counts(num_synthetic).values())
        base = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
        return base / f"synthetic-{size}-n{total}-s{seed}"
    if data_root is None:
        raise ValueError(f"dataset {dataset!r} needs data_root (the folder holding its files)")
    root = Path(data_root).expanduser()
    if cache_dir:
        return Path(cache_dir).expanduser() / f"{dataset}-{size}"
    if is_writable_folder(root):
        return root / "prepared" / f"{dataset}-{size}"
    # Read-only data: a user cache folder, one per source location.
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]
    return default_cache_root() / f"{dataset}-{size}-{tag}"


def get_prepared(
    dataset: str,
    data_root: str | os.PathLike | None = None,
    size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    num_synthetic: int | None = None,
    seed: int = 0,
) -> PreparedDataset:
    """Prepare ``dataset`` into its cache folder if needed, then open it.

    Cache folder: ``<cache_dir>/<dataset>-<size>`` when ``cache_dir`` is given; for real data
    ``<data_root>/prepared/<dataset>-<size>`` when ``data_root`` is writable, else
    ``$EGEUNET_CACHE`` (default ``~/.cache/egeunet``) ``/<dataset>-<size>-<hash of data_root>``.
    ``synthetic`` needs no data_root; it lives in ``synthetic-<size>-n<total>-s<seed>`` under
    ``cache_dir`` or the user cache. ``num_synthetic`` and ``seed`` apply to synthetic only.
    """
    check_dataset_name(dataset)
    folder = cache_folder(dataset, data_root, size, cache_dir, num_synthetic, seed)
    prepare_dataset(dataset, data_root, folder, size, num_synthetic=num_synthetic, seed=seed)
    return PreparedDataset(folder)
