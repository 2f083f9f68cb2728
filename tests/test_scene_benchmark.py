"""benchmarks/scene.py's issue-22 pieces that need no model: the held-out scenes and their two COCO files, scene AP
with classes matched by name, the choice of the default merge, and a report that keeps the sections a run did not
measure."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sdconet.benchmark import scene as bench


def test_heldout_scenes_are_lr_files_with_lr_and_hr_annotations(tmp_path):
    from PIL import Image

    recipe = bench.prepare_heldout(tmp_path / "h", seeds=(7,), hr_size=256)
    lr_coco = json.loads((tmp_path / "h" / bench.LR_ANN).read_text())
    hr_coco = json.loads((tmp_path / "h" / bench.HR_ANN).read_text())
    assert recipe["seeds"] == [7] and not (tmp_path / ".h_hr").exists()  # the HR scratch folder is gone
    image = Image.open(tmp_path / "h" / "heldout_7.png")
    assert image.size == (128, 128) and image.mode == "RGB"
    assert lr_coco["images"][0]["width"] == 128 and hr_coco["images"][0]["width"] == 256
    assert len(lr_coco["annotations"]) == len(hr_coco["annotations"]) > 0
    for lr, hr in zip(lr_coco["annotations"], hr_coco["annotations"]):
        assert np.allclose(np.array(lr["bbox"]) * 2, hr["bbox"]) and lr["area"] * 4 == pytest.approx(hr["area"])
    scenes, coco, upscale = bench.load_heldout(tmp_path / "h")
    assert upscale == 2 and scenes[0][2].shape == (128, 128, 3) and coco.getImgIds() == [1]
    # the truth, LR boxes scaled x2 into HR pixels, scores AP 1; the same boxes named as another class score 0
    names = [c["name"] for c in sorted(hr_coco["categories"], key=lambda c: c["id"])]
    by_name = {c["id"]: c["name"] for c in hr_coco["categories"]}
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in lr_coco["annotations"])])
    labels = np.array([names.index(by_name[a["category_id"]]) for a in lr_coco["annotations"]])
    truth = {1: {"boxes": boxes, "scores": np.linspace(0.9, 0.5, len(boxes)), "labels": labels}}
    perfect = bench.scene_ap(coco, truth, upscale, names)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["detections"] == len(boxes)
    assert bench.scene_ap(coco, truth, 1, names)["AP"] < 0.2  # left in LR pixels: wrong place
    assert len(names) > 1
    shuffled = names[1:] + names[:1]  # every label named as another class
    assert bench.scene_ap(coco, truth, upscale, shuffled)["AP"] == pytest.approx(0.0, abs=1e-6)


def _row(overlap, rule, threshold, ap):
    return {"overlap": overlap, "rule": rule, "threshold": threshold, "AP": ap, "tiles": 1000 // overlap}


def test_choose_merge_takes_the_best_rule_and_the_fewest_tiles_within_the_tolerance():
    assert bench.tiles_per_area(128, 64) == 4.0 and bench.tiles_per_area(128, 0) == 1.0
    rows = [_row(16, "ios", 0.5, 0.100), _row(32, "ios", 0.5, 0.104), _row(64, "ios", 0.5, 0.106),
            _row(16, "nms", 0.5, 0.090), _row(32, "nms", 0.5, 0.110), _row(64, "nms", 0.5, 0.080),
            _row(16, bench.LEGACY_IOS, 0.5, 0.200), _row(32, bench.LEGACY_IOS, 0.5, 0.200)]
    choice = bench.choose_merge(rows, 128, tolerance=0.005)
    # ios: mean 0.1033 > nms 0.0933 (the legacy rule is a reference row, never a candidate); overlap 32 is the
    # smallest within 0.005 of ios's best (64: 0.106)
    assert (choice["rule"], choice["threshold"], choice["overlap"]) == ("ios", 0.5, 32)
    assert choice["best_overlap_AP"] == 0.106 and choice["best_overlap"] == 64
    assert choice["mean_AP_over_overlaps"] == pytest.approx(0.1033, abs=1e-4)
    assert bench.choose_merge(rows, 128, tolerance=0.01)["overlap"] == 16


def test_report_keeps_the_sections_a_run_did_not_measure(tmp_path):
    out = tmp_path / "scene_cpu"
    earlier = {"command": "python benchmarks/scene.py --seam-study", "device": "cpu A", "provenance": {"commit": "a"},
               "throughput": [{"backend": "onnxruntime", "batch": 4, "status": "ok"}], "triton": [], "rss": None,
               "seam_study": {"setup 1": {"setup": {"scenes": 1, "size": 600, "tile": 256}, "rules": {}}},
               "vs_sahi": None, "scene": "s.tif", "tile": 128, "overlap": 16}
    out.with_suffix(".json").write_text(json.dumps(earlier))
    report = {"device": "cpu B", "command": "python benchmarks/scene.py --vs-sahi", "throughput": [], "triton": [],
              "rss": None, "seam_study": None, "vs_sahi": {"status": "skipped", "reason": "no sahi"},
              "scene": None, "tile": None, "overlap": None}
    measured = {"throughput": False, "triton": False, "rss": False, "seam_study": False, "vs_sahi": True}
    bench._write_report(out, report, measured, {"commit": "b"})
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["vs_sahi"]["status"] == "skipped" and written["provenance"] == {"commit": "b"}
    assert written["throughput"] == earlier["throughput"] and written["seam_study"] == earlier["seam_study"]
    assert set(written["kept_from_earlier_runs"]) == {"throughput", "seam_study"}
    assert written["kept_from_earlier_runs"]["seam_study"]["command"] == earlier["command"]
    assert written["scene"] == "s.tif" and written["overlap"] == 16
    markdown = out.with_suffix(".md").read_text()
    assert "skipped: no sahi" in markdown and "Seam-merge study" in markdown


def test_the_defaults_are_the_committed_merge_study_choice():
    """The scene core's defaults cite benchmarks/results/scene_merge_study.json: they must be its choice."""
    from pathlib import Path

    from sdconet.scene import core, merge

    study = json.loads((Path(bench.RESULTS_DIR) / "scene_merge_study.json").read_text())["study"]
    choice = study["choice"]
    assert merge.DEFAULT_MERGE_RULE == choice["rule"]
    threshold = {"edge": merge.DEFAULT_EDGE_IOU, "nms": merge.DEFAULT_NMS_IOU, "ios": merge.DEFAULT_IOS}
    assert threshold[choice["rule"]] == choice["threshold"]
    assert min(core.DEFAULT_OVERLAP, study["settings"]["tile"] // 2) == choice["overlap"]


def test_study_file_keeps_the_study_when_only_the_backends_are_measured(tmp_path):
    rows = [dict(_row(overlap, rule, 0.5, ap), AP50=ap, AP75=ap, APs=ap, detections=10,
                 AP_per_scene={"1": ap, "2": ap / 2})
            for overlap, rule, ap in ((16, "edge", 0.3), (32, "edge", 0.31), (16, "nms", 0.2), (32, "nms", 0.21))]
    study = {"settings": {"scenes": 2, "seeds": [1, 2], "upscale": 2, "tile": 128, "score_threshold": 0.001,
                          "runner": {"backend": "onnxruntime"}}, "rows": rows, "choice": bench.choose_merge(rows, 128)}
    report = {"device": "cpu", "command": "c"}
    out = tmp_path / "study"
    bench._write_study(out, study, None, report, {"command": ["benchmarks/scene.py", "--merge-study"]})
    backends = {"settings": {"overlap": 25, "seeds": [3, 4]}, "max_ap_spread": 0.001,
                "backends": {"torch": {"status": "ok", "AP": 0.3, "AP50": 0.5, "AP75": 0.2, "detections": 9},
                             "triton": {"status": "failed", "reason": "no server"}}}
    bench._write_study(out, None, backends, report, {"command": ["benchmarks/scene.py", "--ap-backends", "torch"]})
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["study"] == study and record["backends"] == backends
    assert record["study_provenance"]["command"][1] == "--merge-study"
    assert record["backends_provenance"]["command"][1] == "--ap-backends"
    markdown = out.with_suffix(".md").read_text()
    assert "Study: `python benchmarks/scene.py --merge-study`" in markdown and "--ap-backends torch" in markdown
    assert "| 32 | 31 | 1.78 | **edge** | 0.5 | **0.3100** |" in markdown  # the choice, in bold
    assert "| triton | - | - | - | - | failed: no server |" in markdown and "seeds 3–4" in markdown
