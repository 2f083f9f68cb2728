"""The recorded mutation check (tests/README.md): apply each mutation alone to a scratch checkout, run the tests
that guard it, record which fail, restore the file.

    git worktree add /tmp/mut HEAD && ln -s "$PWD/.venv" /tmp/mut/.venv
    python tests/mutation_check.py /tmp/mut [INDEX ...]     # -> /tmp/mut/mutation_results.json

Never run it on the checkout you work in: it rewrites source files while the tests run.
"""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

if len(sys.argv) < 2:
    sys.exit(__doc__)
root = Path(sys.argv[1]).resolve()
if root == Path(__file__).resolve().parents[1]:
    sys.exit("mutation_check: give a scratch checkout (git worktree add), not this one: it rewrites source files")
MUTATIONS = [
 ("class map indexed by detection instead of label", "sdconet/scene/outputs.py",
  [("    for ring, box, score, label in zip(", "    for det, (ring, box, score, label) in enumerate(zip("),
   ("                                       labels.tolist()):\n", "                                       labels.tolist())):\n"),
   ('"class_name": _class_name(int(label), class_names)}})', '"class_name": _class_name(det, class_names)}})')],
  ["tests/test_scene_outputs.py", "tests/test_scene_cli.py"]),
 ("IoS merge combines two objects inside one tile", "sdconet/scene/merge.py",
  [("        if cross_tile:\n            same &= tile_index[a] != tile_index[b]\n", "")],
  ["tests/test_scene_core.py"]),
 ("accuracy gate agreement forced to 1.0", "sdconet/deploy/accuracy.py",
  [('"agreement": matched / total if total else None', '"agreement": 1.0 if total else None')],
  ["tests/test_accuracy_gate.py"]),
 ("ORT plugin stand-in reads value with heads and channels swapped", "sdconet/kernels/msda_plugin.py",
  [("    n, _, m, d = value_t.shape\n", "    n, _, m, d = value_t.shape\n    value_t = value_t.reshape(n, -1, d, m).transpose(2, 3).contiguous()\n")],
  ["tests/test_export_msda.py"]),
 ("preprocess accepts a 4-channel image", "sdconet/serve/processing.py",
  [("image.shape[2] != 3", "image.shape[2] not in (3, 4)")],
  ["tests/test_serving.py::test_letterbox_refuses_arrays_that_are_not_rgb_uint8", "tests/test_triton_repo_configs.py"]),
 ("checkpoint save skips the final rename", "sdconet/engine/checkpoint.py",
  [("    os.replace(staged_weights, weights)\n", "    pass\n")],
  ["tests/test_checkpoint_faults.py", "tests/test_checkpoint_io.py"]),
 ("tiler drops the last column of tiles", "sdconet/scene/tiling.py",
  [("            for left in tile_starts(width, tile, overlap)]", "            for left in (tile_starts(width, tile, overlap)[:-1] or [0])]")],
  ["tests/test_scene_core.py"]),
 ("--input hr boxes not scaled back to file pixels", "sdconet/scene/core.py",
  [("place_tile_boxes(outputs[\"boxes\"][row][keep], tile, inner, self.scale, EDGE_MARGIN)",
    "place_tile_boxes(outputs[\"boxes\"][row][keep], tile, inner, 1, EDGE_MARGIN)")],
  ["tests/test_scene_core.py"]),
]
only = set(sys.argv[2:])
results = []
for k, (what, path, edits, tests) in enumerate(MUTATIONS):
    if only and str(k) not in only:
        continue
    file = root / path
    original = file.read_text()
    text = original
    for old, new in edits:
        if text.count(old) != 1:
            results.append({"mutation": what, "error": f"pattern not found once in {path}: {old[:60]!r}"})
            break
        text = text.replace(old, new)
    else:
        file.write_text(text)
        start = time.time()
        run = subprocess.run([str(root / ".venv/bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                              *tests], cwd=root, capture_output=True, text=True,
                             env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HOME": "/root", "OMP_NUM_THREADS": "1"})
        failed = re.findall(r"^FAILED (\S+)", run.stdout, re.M)
        results.append({"mutation": what, "file": path, "tests": tests, "failed": failed,
                        "caught": run.returncode != 0 and bool(failed), "rc": run.returncode,
                        "seconds": round(time.time() - start), "tail": run.stdout.strip().splitlines()[-1:]})
        file.write_text(original)
    print(json.dumps(results[-1]), flush=True)
Path(root / "mutation_results.json").write_text(json.dumps(results, indent=2))
