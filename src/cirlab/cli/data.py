"""``cirlab-data``: download DIV2K (HR) and CBSD68 into the layout cirlab expects.

    cirlab-data                        # DIV2K train HR + CBSD68 into ./data
    cirlab-data --root /big/disk/data  # somewhere else
    cirlab-data --only div2k_valid     # comma-separated names; "all" = every set
    cirlab-data --list                 # known sets, their folders, what is there
    cirlab-data --no-verify            # skip archive checksums (images still counted)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cirlab.data import download
from cirlab.data.download import DEFAULT_DATASETS, DatasetSpec, DownloadError, count_images, download_dataset


def print_list(root: Path, manifest: dict[str, DatasetSpec]) -> None:
    print(f"datasets (root: {root}; default: {','.join(DEFAULT_DATASETS)})")
    for spec in manifest.values():
        have = count_images(root / spec.target, spec.image_suffixes)
        state = (
            "complete"
            if have == spec.num_images
            else f"{have}/{spec.num_images} images"
        )
        size = f"{spec.size / 1e9:.2f} GB" if spec.size else "size not pinned"
        if spec.checksum:
            check = f"{spec.checksum_algo} pinned, from {spec.checksum_source or '?'}"
        else:
            check = (
                f"checksum not pinned: {spec.checksum_source or 'image count checked'}"
            )
        print(f"  {spec.name:<12} -> {root / spec.target}  [{state}]")
        print(f"      {spec.description}")
        print(f"      {spec.urls[0]}  ({size}; {check})")


def parse_only(value: str, manifest: dict[str, DatasetSpec]) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["all"]:
        return list(manifest)
    unknown = [n for n in names if n not in manifest]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown dataset(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(manifest)} or 'all'"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cirlab-data",
        description=(
            "Download DIV2K (HR) and CBSD68 into the layout cirlab expects: "
            "<root>/DIV2K/DIV2K_train_HR, <root>/DIV2K/DIV2K_valid_HR, <root>/CBSD68."
        ),
    )
    parser.add_argument("--root", default="data", help="data folder (default: ./data)")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_DATASETS),
        help=f"comma-separated datasets from {', '.join(download.MANIFEST)} or 'all' "
        f"(default: {','.join(DEFAULT_DATASETS)})",
    )
    parser.add_argument(
        "--list", action="store_true", help="show the datasets and exit"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the archive size/checksum check"
    )
    parser.add_argument(
        "--keep-archives",
        action="store_true",
        help="keep the archives in <root>/downloads",
    )
    parser.add_argument(
        "--retries", type=int, default=5, help="retries per URL (default: 5)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="socket timeout in seconds (default: 60)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.list:
        print_list(root, download.MANIFEST)
        return 0
    try:
        names = parse_only(args.only, download.MANIFEST)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--only: {exc}")
    try:
        for name in names:
            download_dataset(
                download.MANIFEST[name],
                root,
                verify=not args.no_verify,
                keep_archive=args.keep_archives,
                retries=max(args.retries, 0),
                timeout=args.timeout,
                progress=not args.no_progress,
            )
    except DownloadError as exc:
        print(f"cirlab-data: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "\ncirlab-data: interrupted; run again to resume the download",
            file=sys.stderr,
        )
        return 130
    print(
        f"done; data root: {root.resolve()} (set paths.data_dir to it if it is not ./data)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
