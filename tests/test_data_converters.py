"""Converters on small fixtures written in the public release formats, checked box by box."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from sdconet.data.__main__ import main as cli
from sdconet.data.converters import DOTA_CLASSES, NWPU_CLASSES, convert_dota, convert_hrsc, convert_nwpu
from sdconet.data.validation import DataError


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(path)


def _boxes(out: Path) -> list[tuple]:
    """(file_name, category name, x1, y1, x2, y2, difficult) per annotation, in file order."""
    data = json.loads(out.read_text())
    COCO(str(out))  # pycocotools accepts the file
    images = {i["id"]: i["file_name"] for i in data["images"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    rows = []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["area"] == pytest.approx(w * h) and a["iscrowd"] == 0
        rows.append((images[a["image_id"]], names[a["category_id"]], x, y, x + w, y + h, a.get("difficult")))
    return rows


def _nwpu(root: Path) -> None:
    _image(root / "positive image set" / "001.jpg", 200, 150)
    _image(root / "positive image set" / "002.jpg", 120, 100)
    _image(root / "negative image set" / "001.jpg", 80, 80)
    gt = root / "ground truth"
    gt.mkdir()
    (gt / "001.txt").write_text("(63,78),(130,113),1\n(10, 20),(50, 60),10\r\n\n")
    (gt / "002.txt").write_text("(0,0),(30,12),5\n(100,90),(125,100),2\n")  # the last one crosses the right edge


def test_nwpu_box_by_box(tmp_path):
    _nwpu(tmp_path / "NWPU")
    out = tmp_path / "nwpu.json"
    summary = convert_nwpu(tmp_path / "NWPU", out, include_negative=True, progress=False)
    assert _boxes(out) == [
        ("positive image set/001.jpg", "airplane", 63, 78, 130, 113, None),
        ("positive image set/001.jpg", "vehicle", 10, 20, 50, 60, None),
        ("positive image set/002.jpg", "tennis court", 0, 0, 30, 12, None),
        ("positive image set/002.jpg", "ship", 100, 90, 120, 100, None),  # clipped to the 120 px width
    ]
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == list(NWPU_CLASSES)
    assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        ("positive image set/001.jpg", 200, 150), ("positive image set/002.jpg", 120, 100),
        ("negative image set/001.jpg", 80, 80)]
    assert summary["repairs"]["clipped"] == 1 and summary["images_without_boxes"] == 1
    with pytest.raises(DataError, match=r"002.txt line 2: box \[100, 90, 125, 100\] extends outside"):
        convert_nwpu(tmp_path / "NWPU", tmp_path / "strict.json", strict=True, progress=False)


def test_nwpu_bad_lines_name_file_and_line(tmp_path):
    _nwpu(tmp_path / "NWPU")
    (tmp_path / "NWPU" / "ground truth" / "002.txt").write_text("(0,0),(30,12),5\n(1,2),(3,4)\n")
    with pytest.raises(DataError, match=r"002.txt:2: cannot parse '\(1,2\),\(3,4\)'"):
        convert_nwpu(tmp_path / "NWPU", tmp_path / "x.json", progress=False)
    (tmp_path / "NWPU" / "ground truth" / "002.txt").write_text("(0,0),(30,12),11\n")
    with pytest.raises(DataError, match=r"002.txt:1: unknown NWPU VHR-10 class id 11"):
        convert_nwpu(tmp_path / "NWPU", tmp_path / "x.json", progress=False)


def _dota(root: Path) -> None:
    _image(root / "images" / "P0001.png", 300, 200)
    _image(root / "images" / "P0002.png", 64, 128)
    labels = root / "labelTxt"
    labels.mkdir()
    (labels / "P0001.txt").write_text("imagesource:GoogleEarth\ngsd:0.146343590398\n"
                                      "10.0 20.0 60.0 20.0 60.0 50.0 10.0 50.0 plane 0\n"
                                      "100.5 30 140 10 160 50 120 70 small-vehicle 1\n")
    (labels / "P0002.txt").write_text("imagesource:GoogleEarth\ngsd:null\n"
                                      "5 5 25 5 25 15 5 15 container-crane 0\n"
                                      "-3 100 20 100 20 120 -3 120 ship 0\n")


def test_dota_v15_box_by_box(tmp_path):
    _dota(tmp_path)
    out = tmp_path / "dota.json"
    summary = convert_dota(tmp_path / "images", tmp_path / "labelTxt", out, version="1.5", progress=False)
    assert _boxes(out) == [
        ("P0001.png", "plane", 10.0, 20.0, 60.0, 50.0, 0),
        ("P0001.png", "small-vehicle", 100.5, 10.0, 160.0, 70.0, 1),  # rotated polygon -> its enclosing box
        ("P0002.png", "container-crane", 5.0, 5.0, 25.0, 15.0, 0),
        ("P0002.png", "ship", 0.0, 100.0, 20.0, 120.0, 0),  # clipped at x = 0
    ]
    assert [c["name"] for c in json.loads(out.read_text())["categories"]] == list(DOTA_CLASSES["1.5"])
    assert summary["repairs"] == {"clipped": 1, "dropped_outside": 0, "dropped_zero_area": 0}


def test_dota_v10_rejects_v15_classes_and_bad_lines(tmp_path):
    _dota(tmp_path)
    with pytest.raises(DataError, match=r"P0002.txt:3: unknown DOTA v1.0 class 'container-crane'"):
        convert_dota(tmp_path / "images", tmp_path / "labelTxt", tmp_path / "x.json", progress=False)
    (tmp_path / "labelTxt" / "P0002.txt").write_text("5 5 25 5 25 15 ship\n")
    with pytest.raises(DataError, match=r"P0002.txt:1: expected 'x1 y1 x2 y2 x3 y3 x4 y4 class \[difficult\]'"):
        convert_dota(tmp_path / "images", tmp_path / "labelTxt", tmp_path / "x.json", progress=False)
    (tmp_path / "labelTxt" / "P0003.txt").write_text("5 5 25 5 25 15 5 15 ship 0\n")
    (tmp_path / "labelTxt" / "P0002.txt").unlink()
    with pytest.raises(DataError, match=r"P0003.txt: image 'P0003.\*' not found"):
        convert_dota(tmp_path / "images", tmp_path / "labelTxt", tmp_path / "x.json", progress=False)


HRSC_XML = """<?xml version="1.0" encoding="utf-8"?>
<HRSC_Image>
  <Img_ID>100000001</Img_ID>
  <Img_FileName>100000001</Img_FileName>
  <Img_FileFmt>bmp</Img_FileFmt>
  <Img_SizeWidth>160</Img_SizeWidth>
  <Img_SizeHeight>120</Img_SizeHeight>
  <Img_SizeDepth>3</Img_SizeDepth>
  <HRSC_Objects>
    <HRSC_Object>
      <Object_ID>100000001</Object_ID>
      <Class_ID>100000013</Class_ID>
      <truncated>0</truncated>
      <difficult>0</difficult>
      <box_xmin>12</box_xmin><box_ymin>18</box_ymin><box_xmax>103</box_xmax><box_ymax>47</box_ymax>
      <mbox_cx>57.5</mbox_cx><mbox_cy>32.5</mbox_cy><mbox_w>90</mbox_w><mbox_h>20</mbox_h><mbox_ang>-0.3</mbox_ang>
    </HRSC_Object>
    <HRSC_Object>
      <Object_ID>100000002</Object_ID>
      <Class_ID>100000005</Class_ID>
      <truncated>1</truncated>
      <difficult>1</difficult>
      <box_xmin>110</box_xmin><box_ymin>60</box_ymin><box_xmax>150</box_xmax><box_ymax>119</box_ymax>
    </HRSC_Object>
  </HRSC_Objects>
</HRSC_Image>
"""


def test_hrsc_box_by_box(tmp_path):
    _image(tmp_path / "AllImages" / "100000001.bmp", 160, 120)
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "100000001.xml").write_text(HRSC_XML)
    out = tmp_path / "hrsc.json"
    convert_hrsc(tmp_path / "AllImages", tmp_path / "Annotations", out, progress=False)
    assert _boxes(out) == [("100000001.bmp", "ship", 12, 18, 103, 47, 0),
                           ("100000001.bmp", "ship", 110, 60, 150, 119, 1)]
    per_class = tmp_path / "hrsc_classes.json"
    convert_hrsc(tmp_path / "AllImages", tmp_path / "Annotations", per_class, per_class_id=True, progress=False)
    assert [row[1] for row in _boxes(per_class)] == ["100000013", "100000005"]
    assert [c["id"] for c in json.loads(per_class.read_text())["categories"]] == [100000005, 100000013]


def test_hrsc_size_mismatch_and_bad_xml(tmp_path):
    _image(tmp_path / "AllImages" / "100000001.bmp", 100, 120)
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "100000001.xml").write_text(HRSC_XML)
    with pytest.raises(DataError, match=r"100000001.xml: says the image is 160x120 but .* is 100x120"):
        convert_hrsc(tmp_path / "AllImages", tmp_path / "Annotations", tmp_path / "x.json", progress=False)
    (tmp_path / "Annotations" / "100000001.xml").write_text(HRSC_XML.replace("<box_xmax>103</box_xmax>", ""))
    _image(tmp_path / "AllImages" / "100000001.bmp", 160, 120)
    with pytest.raises(DataError, match=r"100000001.xml object 1: missing <box_xmax>"):
        convert_hrsc(tmp_path / "AllImages", tmp_path / "Annotations", tmp_path / "x.json", progress=False)
    (tmp_path / "Annotations" / "100000001.xml").write_text(HRSC_XML[:200])
    with pytest.raises(DataError, match=r"100000001.xml: invalid XML"):
        convert_hrsc(tmp_path / "AllImages", tmp_path / "Annotations", tmp_path / "x.json", progress=False)


def test_cli_converters_write_json_summaries(tmp_path, capsys):
    _nwpu(tmp_path / "NWPU")
    _dota(tmp_path)
    assert cli(["convert-nwpu", "--root", str(tmp_path / "NWPU"), "--out", str(tmp_path / "n.json"),
                "--json", str(tmp_path / "n_summary.json")]) == 0
    assert json.loads((tmp_path / "n_summary.json").read_text())["boxes"] == 4
    assert cli(["convert-dota", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labelTxt"),
                "--out", str(tmp_path / "d.json")]) == 2  # v1.0 default: container-crane is unknown
    assert "unknown DOTA v1.0 class 'container-crane'" in capsys.readouterr().err
    assert cli(["convert-dota", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labelTxt"),
                "--out", str(tmp_path / "d.json"), "--version", "1.5", "--strict"]) == 2
    assert "extends outside" in capsys.readouterr().err
