"""Train and evaluate SDCoNet.

  python train/run.py                                   # demo: tiny model, synthetic data (generated on first use)
  python train/run.py --config paper --data /data/nwpu  # the real-data path (COCO-format dataset)
  python train/run.py --epochs 1 --out runs/quick train.lr=2.0e-4 model.saliency.sigma=0.7
  python train/run.py --resume runs/quick               # continue a run from its last checkpoint
  python train/run.py --eval-only --checkpoint runs/quick
  torchrun --nproc_per_node=2 train/run.py --config paper --data /data/nwpu   # DDP (gloo on CPU, nccl on GPU)
  python train/run.py --nproc 2                         # the same DDP launch from here (CPU: 1 thread per process)

Dotted overrides (``section.key=value``) are applied after the preset, named flags after them. See docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from sdconet.config import Config, ConfigError, load_config, save_config  # noqa: E402
from sdconet.engine.checkpoint import (CheckpointError, LAST_NAME, read_checkpoint_metadata,  # noqa: E402
                                       resolve_checkpoint)
from sdconet.engine.distributed import cleanup_distributed, init_distributed, resolve_device  # noqa: E402
from sdconet.engine.metrics import COCO_METRICS  # noqa: E402
from sdconet.engine.routing import SCHEDULES, scale_epochs  # noqa: E402
from sdconet.utils.cpu import threads_per_process  # noqa: E402
from sdconet.utils.logging import setup_logging  # noqa: E402
from sdconet.utils.process import run_forwarding_sigterm  # noqa: E402

DEFAULT_CONFIG = "demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted config overrides, e.g. train.lr=2.0e-4 model.saliency.sigma=0.7")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"preset name (demo, tiny, paper) or YAML path (default: {DEFAULT_CONFIG})")
    parser.add_argument("--data", metavar="DIR", help="COCO-format dataset root (data.root); default: synthetic data")
    parser.add_argument("--epochs", type=int,
                        help="number of epochs; stage 1 and the LR drops are rescaled to keep their share of the run "
                             "(with --resume: the new total, nothing rescaled)")
    parser.add_argument("--batch-size", type=int, help="images per process and step (train.batch_size)")
    parser.add_argument("--out", metavar="DIR", help="run directory (default: runs/<config>-<time>)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (train.device)")
    parser.add_argument("--schedule", choices=list(SCHEDULES),
                        help="gradient-routing schedule / ablation (train.schedule)")
    parser.add_argument("--resume", metavar="RUN_OR_CKPT",
                        help="continue a run directory (or its last.safetensors) from its last checkpoint; the "
                             "checkpoint's config is used (--config is ignored), overrides and flags still apply")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="data-parallel processes on this machine (default 1); more relaunches this command under "
                             "torch.distributed.run (one per GPU, or on a CPU usable CPUs/N threads each; the tiny demo"
                             " model does not scale past one thread, so on 2 cores --nproc 2 about halves the time). "
                             "train.batch_size stays per process")
    parser.add_argument("--eval-only", action="store_true", help="evaluate a checkpoint instead of training")
    parser.add_argument("--checkpoint", metavar="CKPT",
                        help="with --eval-only: weights file or run directory (default: the latest run's best); "
                             "with --qat: the FP32 checkpoint to fine-tune")
    qat = parser.add_argument_group("quantization-aware training (sdconet.deploy.qat)")
    qat.add_argument("--qat", action="store_true",
                     help="fine-tune --checkpoint with INT8 fake quantization for --epochs (default 4); export the "
                          "result with export/build_engine.py --checkpoint <out>/checkpoints/best.safetensors --int8")
    qat.add_argument("--qat-lr-scale", type=float, default=None, metavar="F",
                     help="QAT lr = F x the checkpoint's train.lr (default 0.01)")
    qat.add_argument("--qat-exclude", action="append", default=None, metavar="REGEX",
                     help="module-name regex kept in float (repeatable; default: the saliency, foreground-attention, "
                          "proposal and box heads and the Swin patch embedding, see "
                          "sdconet.deploy.qat.DEFAULT_QAT_EXCLUDE)")
    qat.add_argument("--qat-calib-images", type=int, default=None, metavar="N",
                     help="training-split inputs that calibrate the activation ranges (default 256)")
    qat.add_argument("--qat-distill", choices=("pseudo", "none"), default=None,
                     help="distillation from the FP32 checkpoint: 'pseudo' (default) trains on its detections "
                          "instead of the ground truth, 'none' on the ground truth")
    qat.add_argument("--qat-pseudo-threshold", type=float, default=None, metavar="S",
                     help="teacher detections scoring >= S become the targets (default 0.25)")
    qat.add_argument("--qat-feature-weight", type=float, default=None, metavar="W",
                     help="weight of the feature term (neck maps and encoder memory vs the FP32 model's, "
                          "default 10; 0 turns it off)")
    qat.add_argument("--qat-keep", choices=("closest", "trained"), default=None,
                     help="best.safetensors = the trained or the calibrated weights, whichever agrees better with "
                          "the FP32 model on the validation split (closest, default), or the trained best by AP")
    return parser


def config_with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply dotted overrides to an in-memory config (through the one YAML loader, so they are validated alike)."""
    if not overrides:
        return cfg
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{cfg.name}.yaml"
        save_config(cfg, path)
        return load_config(path, overrides)


def resolve_config(args: argparse.Namespace) -> Config:
    """Preset (or the resumed checkpoint's config) + dotted overrides + named flags."""
    if args.resume:
        cfg, _ = read_checkpoint_metadata(resolve_checkpoint(args.resume, prefer=LAST_NAME))
        cfg = config_with_overrides(cfg, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    train = cfg.train
    if args.epochs is not None:
        train = dataclasses.replace(train, epochs=args.epochs) if args.resume else scale_epochs(train, args.epochs)
    if args.schedule is not None:
        train = dataclasses.replace(train, schedule=args.schedule)
    return with_run_flags(dataclasses.replace(cfg, train=train), args)


def with_run_flags(cfg: Config, args: argparse.Namespace) -> Config:
    """``--batch-size``, ``--device`` and ``--data`` applied to ``cfg`` (training and QAT alike)."""
    train = cfg.train
    if args.batch_size is not None:
        train = dataclasses.replace(train, batch_size=args.batch_size)
    if args.device is not None:
        train = dataclasses.replace(train, device=args.device)
    data = cfg.data if args.data is None else dataclasses.replace(cfg.data, root=args.data)
    return dataclasses.replace(cfg, train=train, data=data)


def run_directory(args: argparse.Namespace, cfg: Config) -> Path:
    if args.out:
        return Path(args.out)
    if args.resume:
        resumed = Path(args.resume)
        return resumed if resumed.is_dir() else resolve_checkpoint(resumed).parent.parent
    return Path(cfg.train.out_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def metrics_table(metrics: dict[str, float]) -> str:
    names = [k for k in (*COCO_METRICS, "PSNR", "SSIM") if k in metrics]
    header = " | ".join(f"{n:>6}" for n in names)
    values = " | ".join(f"{metrics[n]:6.2f}" if n == "PSNR" else f"{metrics[n]:6.3f}" for n in names)
    rule = "-" * len(header)
    return f"{header}\n{rule}\n{values}"


def eval_only(args: argparse.Namespace) -> int:
    from sdconet.engine.evaluate import evaluate_checkpoint

    setup_logging()
    device = resolve_device(args.device or "auto")
    overrides = {"root": args.data} if args.data else None
    result = evaluate_checkpoint(args.checkpoint, device, overrides=overrides, batch_size=args.batch_size)
    checkpoint = Path(result["checkpoint"])
    out = Path(args.out) if args.out else checkpoint.parent.parent
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"eval_{checkpoint.stem}.json"
    report.write_text(json.dumps({"checkpoint": str(checkpoint), "epoch": result["meta"].get("epoch"),
                                  **result["metrics"]}, indent=2))
    print(f"\nevaluated {checkpoint} (epoch {result['meta'].get('epoch')})\n{metrics_table(result['metrics'])}")
    print(f"\nmetrics JSON: {report}")
    return 0


def train(args: argparse.Namespace) -> int:
    from sdconet.engine.trainer import LOG_FILE, Trainer

    cfg = resolve_config(args)
    dist_info, device = init_distributed(cfg.train.device)
    out_dir = run_directory(args, cfg)
    setup_logging(log_file=out_dir / LOG_FILE if dist_info.is_main else None, rank=dist_info.rank)
    try:
        trainer = Trainer(cfg, out_dir, dist_info=dist_info, device=device)
        if args.resume:
            trainer.resume(args.resume)
        summary = trainer.fit()
    finally:
        cleanup_distributed()
    if not dist_info.is_main:
        return 0
    best = summary["best"] if Path(summary["best"]).is_file() else summary["last"]
    print(f"\nrun finished: {summary['out_dir']} ({summary['epochs']} epochs, "
          f"{summary['skipped_steps']} skipped step(s))")
    print(f"  checkpoint (best AP) {best}")
    print(f"  checkpoint (last)    {summary['last']}")
    print(f"  metrics              {summary['metrics_file']}")
    print(f"  pictures             {summary['pictures']}/")
    print(f"  log                  {summary['log']}")
    print(f"  TensorBoard          tensorboard --logdir {summary['tensorboard']}")
    if summary["metrics"]:
        print(f"\nfinal validation metrics (HR pixels, maxDets 100):\n{metrics_table(summary['metrics'])}")
    print(f"\nre-evaluate: python train/run.py --eval-only --checkpoint {best}")
    return 0


def qat_train(args: argparse.Namespace) -> int:
    """``--qat``: the QAT fine-tune of :func:`sdconet.deploy.qat.run_qat`, configured by the same flags."""
    from sdconet.deploy import qat

    setup_logging()

    def configure(cfg: Config) -> Config:
        return with_run_flags(config_with_overrides(cfg, args.overrides), args)

    checkpoint = resolve_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.parent.parent / "qat"
    flags = {"lr_scale": args.qat_lr_scale, "exclude": tuple(args.qat_exclude) if args.qat_exclude else None,
             "calib_images": args.qat_calib_images or None, "distill": args.qat_distill,
             "pseudo_threshold": args.qat_pseudo_threshold, "feature_weight": args.qat_feature_weight,
             "keep": args.qat_keep}
    summary = qat.run_qat(str(checkpoint), str(out), epochs=args.epochs or 4, configure=configure,
                          **{name: value for name, value in flags.items() if value is not None})  # unset: its defaults
    (out / "qat.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in summary.items()},
                                             indent=2))
    print(f"\nQAT of {checkpoint}: {summary['qat']['quantized_layers']} fake-quant layers, {summary['epochs']} "
          f"epoch(s) at lr {summary['qat']['lr']:.2e}")
    if summary["metrics"]:
        print(metrics_table(summary["metrics"]))
    print(f"\nQAT checkpoint: {summary['best']}\nexport it: python export/build_engine.py --checkpoint "
          f"{summary['best']} --int8")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            out.append(token)
    return out


def launch_data_parallel(args: argparse.Namespace, argv: list[str]) -> int:
    """Rerun this command as ``args.nproc`` DDP processes (torch.distributed.run, one node) and return its exit code.

    The run directory is resolved here, once: left to the ranks, a time-stamped default could differ between them."""
    cfg = resolve_config(args)
    child = _without_nproc(argv)
    if not args.out:
        child += ["--out", str(run_directory(args, cfg))]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(args.nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               str(Path(__file__).resolve()), *child]
    print(f"launching {args.nproc} data-parallel processes ({env['OMP_NUM_THREADS']} thread(s) each): "
          + " ".join(command), flush=True)
    # a SIGTERM to this launcher alone must reach torch.distributed.run, which stops the ranks
    return run_forwarding_sigterm(command, env=env)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc < 1:
        build_parser().error(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and args.eval_only:
        build_parser().error("--nproc goes with training; --eval-only runs in one process")
    if args.checkpoint and not (args.eval_only or args.qat):
        build_parser().error("--checkpoint goes with --eval-only or --qat (use --resume to continue training)")
    if args.qat:
        conflicts = [flag for flag, on in (("--eval-only", args.eval_only), ("--resume", args.resume),
                                           ("--schedule", args.schedule), ("--nproc", args.nproc > 1)) if on]
        if conflicts:
            build_parser().error(f"--qat fine-tunes --checkpoint in one process; {', '.join(conflicts)} cannot go "
                                 "with it")
        if not args.checkpoint:
            build_parser().error("--qat needs --checkpoint (the FP32 weights to fine-tune)")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # after the usage checks: one error, not one per rank
        try:
            return launch_data_parallel(args, list(sys.argv[1:] if argv is None else argv))
        except (ConfigError, CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.eval_only:
        ignored = [flag for flag, value in (("--epochs", args.epochs), ("--schedule", args.schedule),
                                            ("--resume", args.resume)) if value is not None]
        if ignored:
            build_parser().error(f"--eval-only evaluates a checkpoint as trained; {', '.join(ignored)} "
                                 "would have no effect")
    from sdconet.data.validation import DataError
    from sdconet.deploy.qat import QATError
    from sdconet.engine.trainer import TrainingDiverged

    try:
        if args.qat:
            return qat_train(args)
        return eval_only(args) if args.eval_only else train(args)
    except (ConfigError, CheckpointError, DataError, TrainingDiverged, QATError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
