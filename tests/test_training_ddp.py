"""Two gloo processes train the tiny model through the routing switch; only rank 0 writes run files."""
import json
import os

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
