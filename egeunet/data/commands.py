"""``egeunet data download | prepare | splits``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from egeunet.data.download import BASE_URL_ENV, ISIC_BASE_URL, download_isic
from egeunet.data.prepare import DATASETS, prepare_dataset
from egeunet.data.store import PreparedDataset


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its subcommands to the ``egeunet`` parser."""
    data = subparsers.add_parser("data", help="download, prepare and split datasets")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    download = commands.add_parser("download", help="fetch the ISIC challenge archives")
    download.add_argument("dataset", choices=("isic2017", "isic2018"))
    download.add_argument(
        "--splits", default="train,val,test", help="comma-separated (default: %(default)s)"
    )
    download.add_argument(
        "--to", type=Path, default=Path("data/raw"), help="folder (default: %(default)s)"
    )
    download.add_argument("--no-extract", action="store_true", help="keep the zip archives only")
    download.add_argument(
        "--base-url",
        default=None,
        help=f"mirror to use instead of {ISIC_BASE_URL} (or ${BASE_URL_ENV})",
    )
    download.set_defaults(func=run_download)

    prepare = commands.add_parser("prepare", help="decode, resize and cache a dataset")
    prepare.add_argument("--dataset", required=True, choices=DATASETS)
    prepare.add_argument(
        "--source", type=Path, default=None, help="archives or images/masks folder"
    )
    prepare.add_argument(
        "--out", type=Path, default=None, help="default: data/prepared/<dataset>-<size>"
    )
    prepare.add_argument("--size", type=int, default=256)
    prepare.add_argument(
        "--workers", type=int, default=None, help="decoding threads (default: CPUs)"
    )
    prepare.add_argument("--num-synthetic", type=int, default=None, help="synthetic: total images")
    prepare.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    prepare.set_defaults(func=run_prepare)

    splits = commands.add_parser(
        "splits", help="print (and write k-fold) splits of a prepared folder"
    )
    splits.add_argument("prepared", type=Path, help="a folder written by 'egeunet data prepare'")
    splits.add_argument("--kfold", type=int, default=None, help="also write k-fold splits")
    splits.set_defaults(func=run_splits)


def run_download(args: argparse.Namespace) -> int:
    splits = [part.strip() for part in args.splits.split(",") if part.strip()]
    try:
        archives = download_isic(
            args.dataset, splits, args.to, base_url=args.base_url, extract=not args.no_extract
        )
    except OSError as error:  # network failures (requests errors are OSErrors)
        print(f"egeunet data download: error: {error}", file=sys.stderr)
        return 1
    for archive in archives:
        print(f"{archive}  ok")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    out = args.out or Path("data/prepared") / f"{args.dataset}-{args.size}"
    folder = prepare_dataset(
        args.dataset,
        args.source,
        out,
        args.size,
        num_synthetic=args.num_synthetic,
        seed=args.seed,
        num_workers=args.workers,
    )
    prepared = PreparedDataset(folder)
    manifest = prepared.manifest
    print(
        f"{folder}: {len(prepared)} images at {prepared.size}x{prepared.size}, "
        f"{manifest['non_binary_masks']} non-binary masks binarised, "
        f"prepared in {manifest['prepare_seconds']:.1f} s"
    )
    _print_split_counts(prepared, ["challenge", "paper"])
    return 0


def run_splits(args: argparse.Namespace) -> int:
    prepared = PreparedDataset(args.prepared)
    names = ["challenge", "paper"]
    if args.kfold is not None:
        names += [path.stem for path in prepared.save_kfold(args.kfold)]
    _print_split_counts(prepared, names)
    return 0


def _print_split_counts(prepared: PreparedDataset, names: list[str]) -> None:
    for name in names:
        counts = ", ".join(f"{part} {len(ids)}" for part, ids in prepared.split(name).items())
        print(f"  {name}: {counts}")
