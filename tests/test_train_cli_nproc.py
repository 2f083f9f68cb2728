"""train/run.py --nproc N: the command relaunches itself as N DDP processes (torch.distributed.run, one node)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))

import run as train_cli  # noqa: E402  (train/run.py)


def test_nproc_is_stripped_from_the_relaunched_command():
    assert train_cli._without_nproc(["--nproc", "2", "--epochs", "1", "--nproc=3", "a.b=1"]) == ["--epochs", "1",
                                                                                                   "a.b=1"]


def test_bad_nproc_is_refused_before_anything_starts(tmp_path, capsys):
    # in-process: the usage checks run before any relaunch, so a subprocess per case (a torch import each) adds nothing
    for args, message in ((["--nproc", "0"], "--nproc must be >= 1"),
                          (["--nproc", "2", "--eval-only"], "--nproc goes with training"),
                          (["--nproc", "2", "--checkpoint", "x"], "--checkpoint goes with --eval-only")):
        with pytest.raises(SystemExit) as exit_info:
            train_cli.main([*args, "--out", str(tmp_path)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_two_processes_train_one_run_in_one_directory(tmp_path):
    """Without --out the run directory is chosen once by the launcher, so both ranks write (rank 0) into one place."""
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic.num_images=5", "data.synthetic.image_size=128",
                 "data.synthetic.objects_per_image=[2,4]", "train.batch_size=1", "train.stage1_epochs=0",
                 f"train.out_dir={tmp_path / 'runs'}"]
    result = subprocess.run([sys.executable, "train/run.py", "--config", "tiny", "--nproc", "2", "--epochs", "1",
                             "--device", "cpu", *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    assert "launching 2 data-parallel processes" in result.stdout
    assert "world size 2" in (runs[0] / "train.log").read_text()
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    # 4 training images / 2 ranks / batch 1 = 2 steps in the one epoch
    assert [(m["epoch"], m["step"]) for m in metrics] == [(1, 2)]


def test_demo_trains_data_parallel_on_a_multicore_cpu_unless_told_otherwise(tmp_path, monkeypatch):
    from sdconet.pipeline import demo

    layout = demo.DemoLayout(tmp_path)
    monkeypatch.setattr(demo, "default_train_processes", lambda: 2)
    train = demo.build_stages(layout, train_args=["--epochs", "1"])[0]
    assert train.name == "train" and train.argv[-4:] == ["--nproc", "2", "--epochs", "1"]
    train = demo.build_stages(layout, train_args=["--nproc", "1"])[0]
    assert train.argv.count("--nproc") == 1 and train.argv[-2:] == ["--nproc", "1"]
