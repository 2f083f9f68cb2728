import json
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from sdconet.data.__main__ import main as cli
from sdconet.data.synthetic import SYNTHETIC_CATEGORIES

REPO = Path(__file__).parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdconet.data", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_synth_then_stats_json(tmp_path):
    """The issue's acceptance run: 40 images of 512 px, seed 0, then machine-readable stats."""
    out = tmp_path / "synth"
    run = _run("synth", "--out", str(out), "--num-images", "40", "--seed", "0")
    assert run.returncode == 0, run.stderr
    stats_file = tmp_path / "stats.json"
    run = _run("stats", str(out), "--json", str(stats_file))
    assert run.returncode == 0, run.stderr
    assert "small objects (area < 32^2 HR px)" in run.stdout
    stats = json.loads(stats_file.read_text())
    assert stats["num_images"] == 40
    assert stats["small_fraction"] >= 0.5
    assert set(stats["per_class"]) == set(SYNTHETIC_CATEGORIES) and all(stats["per_class"].values())
    assert stats["num_boxes"] == sum(stats["per_class"].values()) == sum(stats["size_histogram"].values())
    total = 0
    for split in ("train", "val"):
        coco = COCO(str(out / "annotations" / f"{split}.json"))
        total += len(coco.getAnnIds())
        for image in coco.loadImgs(coco.getImgIds()):
            assert (image["width"], image["height"]) == (512, 512)
            assert (out / "images" / split / image["file_name"]).is_file()
    assert total == stats["num_boxes"]


def test_synth_is_reproducible_and_protects_folders(tmp_path, capsys):
    args = ["synth", "--num-images", "2", "--image-size", "96", "--seed", "5", "--val-fraction", "0.5"]
    assert cli(args + ["--out", str(tmp_path / "a")]) == 0
    assert cli(args + ["--out", str(tmp_path / "b")]) == 0
    for rel in ("annotations/train.json", "annotations/val.json", "images/train/000000.png", "images/val/000001.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert cli(args + ["--out", str(tmp_path / "a")]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert cli(args + ["--out", str(tmp_path / "a"), "--force"]) == 0
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("keep me")
    assert cli(args + ["--out", str(tmp_path / "user"), "--force"]) == 2
    assert "refusing to delete" in capsys.readouterr().err and (tmp_path / "user" / "precious.txt").exists()


@pytest.mark.parametrize("command", ["synth", "convert-nwpu", "convert-dota", "convert-hrsc", "split", "stats"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli([command, "--help"])
    assert info.value.code == 0
    assert "--json" in capsys.readouterr().out
