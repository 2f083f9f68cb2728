"""``python -m sdconet.client IMAGES...``: send images (or whole scenes, ``--scene``) to a running server and write
the detections as JSON (and annotated pictures).

The client classes live in :mod:`sdconet.runtime.triton_client` (the one Triton client, shared with the scene CLI
and the load generator); their names are re-exported here so that ``from sdconet.serve.client import SDCoNetClient``
keeps working.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sdconet.runtime.triton_client import (DEFAULT_PORTS, ENSEMBLE_MODEL, OUTPUT_NAMES, PROTOCOLS,  # noqa: F401
                                           AsyncSDCoNetClient, Detections, ImageInput, RetryPolicy, SDCoNetClient,
                                           _protocol_module, acall_with_retries, call_with_retries, composing_models,
                                           default_url, detect_many, failure_record, is_retryable, make_inputs,
                                           normalize_statistics, parse_result)
from sdconet.utils.logging import get_logger, setup_logging

log = get_logger(__name__)
FAILURES_FILE = "failures.json"  # per-image failures of a client run, next to the detection JSONs


def annotate(image_path: Path, detections: Detections) -> np.ndarray:
    """The image with its detections drawn (``[H, W, 3]`` uint8)."""
    from sdconet.data.image_io import load_image
    from sdconet.engine.visualize import PRED_COLOR, draw_boxes

    pixels = load_image(image_path)
    # one caption per detection: index i names detection i
    return draw_boxes(pixels, detections.boxes, color=PRED_COLOR, labels=np.arange(len(detections)),
                      scores=detections.scores, category_names=detections.class_names)


def _output_stems(paths: Sequence[Path]) -> list[str]:
    """File stems for per-image outputs, unique even when inputs share a name (a later ``a.png`` takes the first
    free ``a_<k>``; "failures" is reserved for failures.json)."""
    stems, used = [], {"failures"}
    for path in paths:
        stem, count = path.stem, 0
        while stem in used:
            count += 1
            stem = f"{path.stem}_{count}"
        used.add(stem)
        stems.append(stem)
    return stems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdconet.client",
        description="Send images to a running SDCoNet Triton server and write/print the detections as JSON. By "
                    "default each image goes to the tile ensemble 'sdconet', which resizes (letterboxes) it to the "
                    "network size; --scene sends whole scenes to 'sdconet_scene', which tiles them at their native "
                    "resolution on the server.")
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, TIFF, ...)")
    parser.add_argument("--scene", action="store_true",
                        help="whole-scene mode: send each file (its encoded bytes) to sdconet_scene; boxes come back "
                             "in scene pixels")
    parser.add_argument("--url", default=None, help="server host:port (default 127.0.0.1:8000 for http, "
                                                    "127.0.0.1:8001 for grpc)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http")
    parser.add_argument("--model", default=None, help="model name (default sdconet, with --scene sdconet_scene)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for <image>.json per image (default: print one JSON list to stdout)")
    parser.add_argument("--annotate", action="store_true", help="also write <image>.png with the boxes drawn "
                                                                "(needs --out)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="per-request timeout in seconds (default 60, with --scene 600)")
    parser.add_argument("--retries", type=int, default=3,
                        help="resend a request after a connection error or an UNAVAILABLE answer up to this many "
                             "times, with exponential backoff (default %(default)s; invalid requests are never "
                             "retried)")
    parser.add_argument("--retry-backoff", type=float, default=1.0,
                        help="seconds before the first retry, doubled for each next one up to 30 (default 1)")
    parser.add_argument("--score-threshold", "--score-thresh", dest="score_threshold", type=float, default=None,
                        help="keep detections with score >= this (applied to the server's answer, so only values "
                             "above the threshold the repository was built with have an effect; default: the "
                             "server's)")
    args = parser.parse_args(argv)
    setup_logging()
    model = args.model or ("sdconet_scene" if args.scene else ENSEMBLE_MODEL)
    timeout = args.timeout if args.timeout is not None else (600.0 if args.scene else 60.0)
    try:
        retry = RetryPolicy(retries=args.retries, backoff_s=args.retry_backoff)
    except ValueError as err:
        parser.error(str(err))
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        parser.error(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.annotate and args.out is None:
        parser.error("--annotate needs --out DIR")
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        parser.error(f"image file(s) not found: {', '.join(missing)}")

    from tqdm import tqdm

    with tqdm(total=len(args.images), desc="detect", unit="img", file=sys.stderr) as bar:
        results = detect_many(args.images, args.url, args.protocol, model, args.concurrency, timeout,
                              on_done=lambda index, result: bar.update(), retry=retry)
    records, failures = [], []
    for path, stem, result in zip(args.images, _output_stems(args.images), results):
        if isinstance(result, Exception):
            record = {"image": str(path), **failure_record(result)}
            failures.append(record)
            log.error("%s: failed after %d attempt(s): %s", path, record["attempts"], record["error"])
        else:
            if args.score_threshold is not None:
                result = result.above(args.score_threshold)
            record = {"image": str(path), **result.to_dict()}
            top = ", ".join(f"{n} {s:.2f}" for n, s in zip(result.class_names[:3], result.scores[:3]))
            log.info("%s: %d detection(s)%s", path, len(result), f" (top: {top})" if top else "")
        records.append(record)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
            if args.annotate and not isinstance(result, Exception):
                from sdconet.data.image_io import save_image

                save_image(annotate(path, result), args.out / f"{stem}.png")
    if args.out is None:
        json.dump(records, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        (args.out / FAILURES_FILE).write_text(json.dumps(failures, indent=2, ensure_ascii=False) + "\n")
        log.info("wrote %d JSON file(s)%s to %s (%d failure(s) listed in failures.json)", len(records),
                 " and annotated PNGs" if args.annotate else "", args.out, len(failures))
    if failures:
        log.error("%d of %d image(s) failed", len(failures), len(records))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
