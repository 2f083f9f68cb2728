"""Two gloo processes train the tiny model through the routing switch; only rank 0 writes run files."""
import dataclasses
import json
import os

import pytest

import torch
import torch.multiprocessing as mp

from sdconet.config import load_config
from sdconet.data import build_dataset
from sdconet.serve.server import free_port

WORLD_SIZE = 2


def _worker(rank: int, port: int, overrides: list, out_dirs: list, checksum_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    from sdconet.engine.distributed import cleanup_distributed, init_distributed
    from sdconet.engine.trainer import LOG_FILE, Trainer
    from sdconet.utils.logging import setup_logging

    info, device = init_distributed("cpu")
    # as train/run.py does: only rank 0 logs to the run's file
    setup_logging(log_file=os.path.join(out_dirs[rank], LOG_FILE) if info.is_main else None, rank=rank)
    try:
        trainer = Trainer(load_config("tiny", overrides), out_dirs[rank], dist_info=info, device=device)
        trainer.fit()
        # the test harness (not the trainer) records what each rank ended with
        checksum = sum(float(p.double().sum()) for p in trainer.model.parameters())
        with open(os.path.join(checksum_dir, f"rank{rank}.txt"), "w") as handle:
            json.dump([checksum, trainer.counters.global_step, trainer.router.stage], handle)
    finally:
        cleanup_distributed()


def test_two_process_gloo_run_finishes_and_only_rank0_writes(tmp_path):
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic.num_images=5",
                 "data.synthetic.image_size=128", "data.synthetic.objects_per_image=[2,4]", "train.batch_size=1",
                 "train.epochs=2", "train.stage1_epochs=1", "train.device=cpu"]
    cfg = load_config("tiny", overrides)
    build_dataset(cfg.data, "train", cfg.model.upscale, train=True)  # generate once, before the ranks start
    # each rank is told a different run directory, so anything rank 1 wrote would show up in its own folder
    out_dirs = [str(tmp_path / "rank0_run"), str(tmp_path / "rank1_run")]
    checksums = tmp_path / "checksums"
    checksums.mkdir()
    mp.spawn(_worker, args=(free_port(), overrides, out_dirs, str(checksums)), nprocs=WORLD_SIZE, join=True)

    assert not (tmp_path / "rank1_run").exists()
    run = tmp_path / "rank0_run"
    for name in ("metrics.json", "checkpoints/last.safetensors", "checkpoints/last.train.pt", "train.log",
                 "pictures/epoch_002.png"):
        assert (run / name).is_file(), name
    results = [json.loads((checksums / f"rank{r}.txt").read_text()) for r in range(WORLD_SIZE)]
    # 4 training images / 2 ranks / batch 1 = 2 steps per epoch; both ranks end in stage 2 with identical weights
    assert results[0] == results[1] and results[0][1:] == [4, 2]


def _eval_overrides(tmp_path) -> list:
    return [f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic.num_images=15", "data.synthetic.image_size=128",
            "data.synthetic.objects_per_image=[2,4]"]


def _eval_setup(overrides: list):
    from torch.utils.data import DataLoader

    from sdconet.data import collate_fn
    from sdconet.engine.distributed import ShardSampler
    from sdconet.models import build_model

    cfg = load_config("tiny", overrides)
    val_set = build_dataset(cfg.data, "val", cfg.model.upscale, train=False)
    torch.manual_seed(0)  # the same weights in every process
    model = build_model(dataclasses.replace(cfg.model, detector=dataclasses.replace(
        cfg.model.detector, num_classes=val_set.num_classes)))

    def loader(rank: int = 0, world_size: int = 1) -> DataLoader:
        return DataLoader(val_set, batch_size=2, sampler=ShardSampler(len(val_set), rank, world_size),
                          collate_fn=collate_fn)
    return model, val_set, loader


def _eval_worker(rank: int, port: int, overrides: list, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    from sdconet.engine.distributed import cleanup_distributed, init_distributed
    from sdconet.engine.evaluate import evaluate

    info, device = init_distributed("cpu")
    try:
        model, val_set, loader = _eval_setup(overrides)
        shard = loader(rank, WORLD_SIZE)
        metrics = evaluate(model, shard, val_set, device, run_sr=True, progress=False, sharded=True)
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"metrics": metrics, "shard": list(shard.sampler)}, handle)
    finally:
        cleanup_distributed()


def test_sharded_evaluation_on_two_ranks_equals_single_process(tmp_path):
    from sdconet.engine.evaluate import evaluate

    overrides = _eval_overrides(tmp_path)
    torch.set_num_threads(1)
    model, val_set, loader = _eval_setup(overrides)  # also generates the dataset before the ranks start
    assert len(val_set) == 3  # odd: the shards differ in size, and no image may be evaluated twice
    expected = evaluate(model, loader(), val_set, torch.device("cpu"), run_sr=True, progress=False)
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    mp.spawn(_eval_worker, args=(free_port(), overrides, str(results_dir)), nprocs=WORLD_SIZE, join=True)
    results = [json.loads((results_dir / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert [r["shard"] for r in results] == [[0, 2], [1]]
    assert set(expected) >= {"AP", "AP50", "APs", "PSNR", "SSIM"}
    for result in results:  # every rank returns rank 0's scores of all gathered detections
        assert result["metrics"].keys() == expected.keys()
        for key, value in expected.items():
            assert result["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_unused_parameter_search_only_where_needed():
    from sdconet.engine.distributed import needs_unused_parameter_search
    from sdconet.models import SerialBaseline, build_model

    cfg = load_config("tiny").model
    model = build_model(cfg)
    assert not needs_unused_parameter_search(model, run_sr=True)
    assert needs_unused_parameter_search(model, run_sr=False)  # SR decoder trainable but not executed
    for p in model.sr_decoder.parameters():  # routing stage 1 freezes it: DDP does not register it
        p.requires_grad_(False)
    assert not needs_unused_parameter_search(model, run_sr=False)
    assert needs_unused_parameter_search(SerialBaseline(cfg), run_sr=True)  # makes no promise: searched


def test_batch_without_boxes_still_reaches_every_parameter():
    # the promise behind find_unused_parameters=False: an image without boxes (no denoising queries) still gives
    # every trainable parameter a gradient
    from sdconet.losses import SetCriterion
    from sdconet.models import build_model

    cfg = load_config("tiny")
    model = build_model(cfg.model).train()
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4),
                "size": torch.tensor([128, 128])}]
    out = model(torch.rand(1, 3, 64, 64), None, targets)
    assert out["dn_outputs"] is None
    SetCriterion.from_config(cfg)(out, targets, torch.rand(1, 3, 128, 128))["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
