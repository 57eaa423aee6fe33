"""Labelme, COCO (CVAT 'COCO 1.0') and CVAT XML annotations -> index masks and a class list.

tests/data/annotations holds one 48x32 scene annotated three times, once per format, with a
car (rectangle / box), a person (polygon overlapping the car, drawn on top: later in Labelme
and COCO, higher z_order in CVAT), a sign (circle / compressed RLE / ellipse), a puddle (mask
/ uncompressed RLE / CVAT mask RLE) and a line that has no area.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TEST_DATA, assert_clean_error, run_cli
from PIL import Image, ImageDraw

from medseg.seg2d.images import read_mask
from medseg.core.errors import DataError, OutputError
from medseg.seg2d import annotations as ann

SAMPLES = TEST_DATA / "annotations"
CLASSES = {0: "background", 1: "car", 2: "person", 3: "sign", 4: "puddle"}


def expected_scene() -> np.ndarray:
    """The scene drawn independently of the importers."""
    img = Image.new("L", (48, 32), 0)
    d = ImageDraw.Draw(img)
    d.rectangle([4, 16, 19, 27], fill=1)
    d.polygon([(16, 10), (26, 28), (10, 28)], fill=2, outline=2)
    d.ellipse([6, 3, 14, 11], fill=3, outline=3)
    m = np.array(img)
    m[28:31, 40:45][np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], bool)] = 4
    return m


@pytest.mark.parametrize("source,fmt", [("scene.json", "labelme"), ("coco.json", "coco"), ("cvat.xml", "cvat-xml")])
def test_each_format_gives_the_expected_mask(tmp_path, source, fmt):
    assert ann.detect_format(SAMPLES / source) == fmt
    res = ann.import_annotations(SAMPLES / source, tmp_path / "out")
    assert res.classes == CLASSES
    mask = read_mask(tmp_path / "out" / "masks" / "scene.png")
    want = expected_scene()
    assert np.array_equal(mask, want), np.argwhere(mask != want)[:5]
    assert mask[20, 17] == 2  # the person is on top of the car where they overlap
    assert (tmp_path / "out" / "images" / "scene.png").read_bytes() == (SAMPLES / "scene.png").read_bytes()
    doc = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert doc["classes"] == {str(k): v for k, v in CLASSES.items()}
    assert len(res.skipped) == 1 and "no area" in res.skipped[0]  # the line / polyline


def test_cvat_label_colours_are_kept(tmp_path):
    res = ann.import_annotations(SAMPLES / "cvat.xml", tmp_path / "out")
    assert res.colors[1] == [0xFA, 0x32, 0x53] and res.colors[0] == [0, 0, 0]
    pal = Image.open(tmp_path / "out" / "masks" / "scene.png").getpalette()
    assert pal[3:6] == [0xFA, 0x32, 0x53]


def test_class_list_fixes_indices_and_unknown_labels_fail(tmp_path):
    (tmp_path / "classes.txt").write_text("__ignore__\n_background_\npuddle\nsign\nperson\ncar\n")
    names = ann.read_class_list(tmp_path / "classes.txt")
    assert names == ["background", "puddle", "sign", "person", "car"]
    ann.import_annotations(SAMPLES / "scene.json", tmp_path / "out", classes=names)
    mask = read_mask(tmp_path / "out" / "masks" / "scene.png")
    remap = np.array([0, 4, 3, 2, 1])  # new index -> index in expected_scene
    assert np.array_equal(remap[mask], expected_scene())
    with pytest.raises(DataError, match="'puddle' is not in the class list"):
        ann.import_annotations(SAMPLES / "scene.json", tmp_path / "out2", classes=["background", "car", "person", "sign"])


# The encoders are test helpers: medseg only reads RLE (COCO and CVAT exports), it never writes it.
def rle_encode_string(counts: list[int]) -> str:
    """Run lengths -> COCO's compressed RLE string (pycocotools' rleToString)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Boolean (height, width) -> COCO run lengths (column-major, starting with 0s)."""
    flat = np.asarray(mask, bool).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def test_rle_round_trips():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (32, 48), (64, 33)]:
        for p in (0.0, 0.1, 0.5, 1.0):
            m = rng.random(shape) < p
            counts = mask_to_rle(m)
            assert np.array_equal(ann.rle_to_mask(counts, *shape), m)
            assert ann.rle_decode_string(rle_encode_string(counts)) == counts
    # 4x4 mask with a 2x2 square at rows 1-2, cols 1-2: runs 5, 2, 2, 2, 5; from the fourth run on the
    # string holds the difference to the run two before (2 - 2 = 0, 5 - 2 = 3), 5 bits a character from '0'
    assert rle_encode_string([5, 2, 2, 2, 5]) == "52203"
    assert ann.rle_decode_string("52203") == [5, 2, 2, 2, 5]
    assert ann.rle_decode_string(rle_encode_string([0, 40, 3, 1000, 2])) == [0, 40, 3, 1000, 2]


def test_labelme_folder_and_embedded_image(tmp_path):
    import base64

    src = tmp_path / "labelme"
    src.mkdir()
    doc = json.loads((SAMPLES / "scene.json").read_text())
    doc["imagePath"] = "elsewhere/photo.png"  # not beside the JSON: the embedded copy is used
    doc["imageData"] = base64.b64encode((SAMPLES / "scene.png").read_bytes()).decode()
    (src / "photo.json").write_text(json.dumps(doc))
    shutil.copy(SAMPLES / "scene.json", src / "scene.json")
    shutil.copy(SAMPLES / "scene.png", src / "scene.png")
    res = ann.import_annotations(src, tmp_path / "out")
    assert sorted(p.name for p in res.masks) == ["photo.png", "scene.png"]
    assert (tmp_path / "out" / "images" / "photo.png").read_bytes() == (SAMPLES / "scene.png").read_bytes()


def test_output_inside_the_source_is_refused(tmp_path):
    shutil.copytree(SAMPLES, tmp_path / "ann")
    with pytest.raises(OutputError, match="inside the annotation folder"):
        ann.import_annotations(tmp_path / "ann" / "cvat.xml", tmp_path / "ann" / "out")


def test_cli_import_then_train_on_it(tmp_path):
    proc = run_cli("import-annotations", SAMPLES / "coco.json", "-o", tmp_path / "ds")
    assert proc.returncode == 0, proc.stderr
    assert "1 mask(s), 1 image(s)" in proc.stdout and "4 puddle" in proc.stdout
    from medseg.core.config import from_dict
    from medseg.seg2d.images import discover_images2d

    cfg = from_dict({"task": "image2d", "model": {"name": "segnet"}, "patch": {"size": [64, 64]},
                     "data": {"root": str(tmp_path / "ds"), "val_fraction": 0.0}})
    data = discover_images2d(cfg.data)
    assert data.classes == CLASSES and len(data.train) == 1
    bad = run_cli("import-annotations", SAMPLES / "scene.png", "-o", tmp_path / "x")
    assert_clean_error(bad, "scene.png")
