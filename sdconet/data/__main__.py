"""``python -m sdconet.data``: synthetic data, converters, patch splitter and statistics.

Every subcommand prints a human summary and, with ``--json OUT``, writes the same figures as JSON. Bad input ends
with ``error: ...`` naming the file and item, and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from sdconet.config import SyntheticDataConfig
from sdconet.data.converters import DOTA_CLASSES, convert_dota, convert_hrsc, convert_nwpu
from sdconet.data.image_io import DEFAULT_MAX_IMAGE_PIXELS
from sdconet.data.scene_synth import DEFAULT_PIXEL_SIZE, DEFAULT_TILE, generate_scene
from sdconet.data.splitter import SplitSettings, split_dataset
from sdconet.data.stats import dataset_stats, format_stats
from sdconet.data.synthetic import generate_synthetic_dataset
from sdconet.data.validation import DataError
from sdconet.utils.logging import setup_logging


def _write_json(path: Optional[str], data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))
        print(f"JSON written to {path}")


def _print_summary(title: str, summary: dict[str, Any]) -> None:
    print(f"{title}: {summary['images']} images, {summary['boxes']} boxes "
          f"({summary['images_without_boxes']} images without boxes) -> {summary['out']}")
    for name, count in summary["per_class"].items():
        print(f"  {name:<24}{count:>8}")
    repairs = summary["repairs"]
    if any(repairs.values()):
        print("  repaired boxes: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in repairs.items()))


def _cmd_synth(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.force:
            raise DataError(f"{out} is not empty; pass --force to replace a synthetic dataset there")
        if not (out / "synthetic.json").is_file():
            raise DataError(f"{out} is not empty and is not a synthetic dataset (no synthetic.json); refusing to "
                            f"delete it")
        shutil.rmtree(out)
    cfg = SyntheticDataConfig(num_images=args.num_images, val_fraction=args.val_fraction, image_size=args.image_size,
                              objects_per_image=tuple(args.objects), distractors_per_image=tuple(args.distractors),
                              seed=args.seed)
    summary = generate_synthetic_dataset(out, cfg)
    print(f"synthetic dataset -> {out}")
    for split in ("train", "val"):
        print(f"  {split:<6}{summary[split]['images']:>6} images {summary[split]['boxes']:>7} boxes")
    _write_json(args.json, summary)


def _cmd_synth_scene(args: argparse.Namespace) -> None:
    if len(args.size) > 2:
        raise DataError(f"--size takes N or WIDTH HEIGHT, got {args.size}")
    width, height = (args.size * 2)[:2]
    summary = generate_scene(args.out, width, height, geotiff=args.geotiff, crs=args.crs, pixel_size=args.pixel_size,
                             seed=args.seed, classes=args.classes, tile=args.tile, name=args.name)
    print(f"synthetic scene {width}x{height} ({summary['tiles']} tiles, {summary['boxes']} boxes) -> "
          f"{summary['scene']} + {summary['annotations']}")
    for name, count in summary["per_class"].items():
        print(f"  {name:<24}{count:>8}")
    _write_json(args.json, summary)


def _cmd_convert_nwpu(args: argparse.Namespace) -> None:
    summary = convert_nwpu(args.root, args.out, args.include_negative, args.strict, args.max_pixels)
    _print_summary("NWPU VHR-10", summary)
    _write_json(args.json, summary)


def _cmd_convert_dota(args: argparse.Namespace) -> None:
    summary = convert_dota(args.images, args.labels, args.out, args.version, args.strict, args.max_pixels)
    _print_summary(f"DOTA v{args.version}", summary)
    _write_json(args.json, summary)


def _cmd_convert_hrsc(args: argparse.Namespace) -> None:
    summary = convert_hrsc(args.images, args.annotations, args.out, args.per_class_id, args.strict, args.max_pixels)
    _print_summary("HRSC", summary)
    _write_json(args.json, summary)


def _cmd_split(args: argparse.Namespace) -> None:
    settings = SplitSettings(window=args.window, overlap=args.overlap, min_area_fraction=args.min_area_fraction,
                             keep_empty=args.keep_empty, val_fraction=args.val_fraction, subset=args.subset,
                             seed=args.seed)
    report = split_dataset(args.images, args.ann, args.out, settings, args.strict, args.max_pixels)
    counts = report["counts"]
    print(f"split {args.ann} -> {args.out}")
    for key, value in counts.items():
        print(f"  {key.replace('_', ' '):<26}{value:>8}")
    for split, summary in report["splits"].items():
        print(f"  {split}: {summary['images']} patches, {summary['boxes']} boxes -> {summary['out']}")
    _write_json(args.json, report)


def _resolve_stats_inputs(paths: list[str], images: Optional[str]) -> tuple[list[Path], list[Optional[Path]]]:
    """JSON files as given; a dataset folder contributes ``annotations/*.json`` with images in ``images/<stem>``."""
    ann_files: list[Path] = []
    image_dirs: list[Optional[Path]] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted((path / "annotations").glob("*.json"))
            if not found:
                raise DataError(f"{path}: no annotations/*.json in this folder")
            ann_files += found
            image_dirs += [path / "images" / f.stem for f in found]
        else:
            ann_files.append(path)
            image_dirs.append(Path(images) if images else None)
    return ann_files, image_dirs


def _cmd_stats(args: argparse.Namespace) -> None:
    ann_files, image_dirs = _resolve_stats_inputs(args.paths, args.images)
    if args.check_images and any(d is None for d in image_dirs):
        raise DataError("stats --check-images: pass --images DIR for annotation files given directly")
    stats = dataset_stats(ann_files, args.strict, image_dirs if args.check_images else None, args.max_pixels)
    print(format_stats(stats))
    _write_json(args.json, stats)


def _add_common(parser: argparse.ArgumentParser, strict: bool = True) -> None:
    parser.add_argument("--json", metavar="OUT", help="also write the summary as JSON to OUT")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="refuse images with more pixels (decompression-bomb guard; default %(default)s)")
    if strict:
        parser.add_argument("--strict", action="store_true",
                            help="make box defects (outside the image, zero area, empty label files) errors "
                                 "instead of repairing and counting them")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdconet.data",
                                     description="Synthetic data, converters, patch splitter and statistics.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="generate the procedural remote-sensing dataset",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = SyntheticDataConfig()
    synth.add_argument("--out", required=True, help="output folder (images/{train,val}, annotations/{train,val}.json)")
    synth.add_argument("--num-images", type=int, default=defaults.num_images)
    synth.add_argument("--image-size", type=int, default=defaults.image_size, help="HR side in pixels")
    synth.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    synth.add_argument("--objects", type=int, nargs=2, metavar=("MIN", "MAX"), default=defaults.objects_per_image,
                       help="labelled objects per image")
    synth.add_argument("--distractors", type=int, nargs=2, metavar=("MIN", "MAX"),
                       default=defaults.distractors_per_image, help="unlabelled look-alikes per image")
    synth.add_argument("--seed", type=int, default=defaults.seed)
    synth.add_argument("--force", action="store_true", help="replace an existing synthetic dataset in --out")
    synth.add_argument("--json", metavar="OUT", help="also write the summary as JSON to OUT")
    synth.set_defaults(func=_cmd_synth)

    scene = sub.add_parser("synth-scene", help="one large synthetic scene (PNG, or a tiled GeoTIFF) + its COCO JSON",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    scene.add_argument("--out", required=True, help="output folder (<name>.tif or .png, <name>.json)")
    scene.add_argument("--size", type=int, nargs="+", required=True, metavar="N",
                       help="scene side in pixels, or WIDTH HEIGHT")
    scene.add_argument("--geotiff", action="store_true",
                       help="write a tiled, compressed, georeferenced GeoTIFF (else a PNG, for small scenes)")
    scene.add_argument("--crs", default="EPSG:32633", help="CRS of the GeoTIFF (a UTM zone centres the scene on it)")
    scene.add_argument("--pixel-size", type=float, default=DEFAULT_PIXEL_SIZE,
                       help="ground sampling distance in metres")
    scene.add_argument("--seed", type=int, default=0)
    scene.add_argument("--classes", nargs="+", metavar="NAME",
                       help="draw only these synthetic classes (default: all six); the JSON keeps all categories")
    scene.add_argument("--tile", type=int, default=DEFAULT_TILE, help="render tile side in pixels")
    scene.add_argument("--name", default="scene", help="file stem of the scene and its JSON")
    scene.add_argument("--json", metavar="OUT", help="also write the summary as JSON to OUT")
    scene.set_defaults(func=_cmd_synth_scene)

    nwpu = sub.add_parser("convert-nwpu", help="NWPU VHR-10 release -> COCO JSON",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    nwpu.add_argument("--root", required=True, help="folder with 'positive image set/' and 'ground truth/'")
    nwpu.add_argument("--out", required=True, help="output COCO JSON (file_name relative to --root)")
    nwpu.add_argument("--include-negative", action="store_true", help="add 'negative image set/' images (no boxes)")
    _add_common(nwpu)
    nwpu.set_defaults(func=_cmd_convert_nwpu)

    dota = sub.add_parser("convert-dota", help="DOTA v1.0/v1.5 labelTxt -> COCO JSON (axis-aligned boxes)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dota.add_argument("--images", required=True, help="DOTA images folder")
    dota.add_argument("--labels", required=True, help="labelTxt folder")
    dota.add_argument("--out", required=True, help="output COCO JSON (file_name relative to --images)")
    dota.add_argument("--version", choices=sorted(DOTA_CLASSES), default="1.0", help="class list")
    _add_common(dota)
    dota.set_defaults(func=_cmd_convert_dota)

    hrsc = sub.add_parser("convert-hrsc", help="HRSC2016-style XML -> COCO JSON",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hrsc.add_argument("--images", required=True, help="images folder")
    hrsc.add_argument("--annotations", required=True, help="folder of .xml files")
    hrsc.add_argument("--out", required=True, help="output COCO JSON (file_name relative to --images)")
    hrsc.add_argument("--per-class-id", action="store_true",
                      help="one category per Class_ID instead of a single 'ship' class")
    _add_common(hrsc)
    hrsc.set_defaults(func=_cmd_convert_hrsc)

    split = sub.add_parser("split", help="cut large images into patches (+ COCO JSON per split)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    split.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    split.add_argument("--ann", required=True, help="source COCO JSON")
    split.add_argument("--out", required=True, help="output dataset folder (images/<split>, annotations/<split>.json)")
    split.add_argument("--window", type=int, default=512, help="patch side in pixels")
    split.add_argument("--overlap", type=int, default=128, help="overlap between neighbouring patches in pixels")
    split.add_argument("--min-area-fraction", type=float, default=0.5,
                       help="keep a clipped box only if it keeps this fraction of its area")
    split.add_argument("--keep-empty", action="store_true", help="also write patches without boxes")
    split.add_argument("--val-fraction", type=float, default=0.0,
                       help="> 0: random train/val split by source image; 0: all patches go to --subset")
    split.add_argument("--subset", default="train", help="split name when --val-fraction is 0")
    split.add_argument("--seed", type=int, default=0, help="seed of the train/val assignment")
    _add_common(split)
    split.set_defaults(func=_cmd_split)

    stats = sub.add_parser("stats", help="images, boxes per class, box sizes, small-object fraction",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    stats.add_argument("paths", nargs="+", help="COCO JSON files or dataset folders (with annotations/*.json)")
    stats.add_argument("--images", help="images folder of JSON files given directly (for --check-images)")
    stats.add_argument("--check-images", action="store_true", help="decode every image and check its size")
    _add_common(stats)
    stats.set_defaults(func=_cmd_stats)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    handler: Callable[[argparse.Namespace], None] = args.func
    try:
        handler(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
