"""Bad input gets one clear line and nothing else: predict, convert, train and batch over a matrix of
broken, hostile and unsupported inputs. For each: exit status 2 (or, in batch, a failed/skipped row),
a one-line message that names the file and says what to do, no traceback, nothing left in the output.

The commands run in-process through ``medseg.cli.main`` (the real entry point, minus the interpreter
start-up), so the whole matrix takes seconds; a few cases also run as real subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bad_inputs import BAD_INPUTS, good_dicom, good_nifti, make_bad
from conftest import REPO, assert_clean_error, run_cli, write_checkpoint

from medseg import cli

TINY_TRAIN = ["model.channels=[4,8]", "model.strides=[2]", "model.num_res_units=1", "patch.size=[16,16,16]",
              "train.epochs=1", "train.batch_size=2", "data.cache=false", "augment.enabled=false",
              "data.val_fraction=0", "preprocess.spacing=null"]


def run_inprocess(*args) -> tuple[int, str, str]:
    """``medseg ARGS`` in this process: (exit status, stdout, stderr). An exception other than
    SystemExit escaping ``main`` would be a traceback for a user, so it fails the test."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["medseg", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def check_refused(code: int, stdout: str, stderr: str, names: Path, *fragments: str) -> str:
    """Exit status 2, exactly one line 'error: <file>: ...; fix: ...' on stderr, no traceback."""
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stderr + stdout
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    msg = lines[0]
    assert msg.startswith("error: "), msg
    assert str(names) in msg, (str(names), msg)
    assert "fix:" in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------------------
# predict and convert: every kind of bad input


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
@pytest.mark.parametrize("command", ["predict", "convert"])
def test_bad_input_is_refused_cleanly(kind, command, tmp_path):
    bad = make_bad(kind, tmp_path / "in")
    before = {p: p.read_bytes() for p in files_under(tmp_path / "in")}
    out = tmp_path / "out"
    if command == "predict":
        result = run_inprocess("predict", bad.path, "-o", out, "--device", "cpu")
    else:
        result = run_inprocess("convert", bad.path, out / "converted.nii.gz")
    check_refused(*result, bad.path, bad.fragment)
    assert files_under(out) == []  # no partial output, not even a colour table
    assert {p: p.read_bytes() for p in files_under(tmp_path / "in")} == before  # inputs untouched


def test_matrix_covers_the_required_kinds():
    assert len(BAD_INPUTS) >= 20
    for needed in ("nifti-truncated-gz", "nrrd-truncated", "dicom-truncated-pixels", "nifti-zero-bytes", "dicom-sr",
                   "dicom-pdf", "dicom-presentation-state", "nan-voxels", "inf-voxels", "image-2d",
                   "dicom-single-slice", "image-4d", "multichannel", "zero-spacing", "negative-spacing"):
        assert needed in BAD_INPUTS


def test_real_subprocess_gives_one_line_without_traceback(tmp_path):
    """The same refusals through the installed entry point (interpreter start-up included)."""
    bad = make_bad("nifti-truncated-gz", tmp_path / "a")
    proc = run_cli("predict", bad.path, "-o", tmp_path / "out", "--device", "cpu", fresh=True)
    assert_clean_error(proc, str(bad.path), "cannot read NIfTI", "fix:")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    bad = make_bad("dicom-truncated-pixels", tmp_path / "b")
    proc = run_cli("convert", bad.path, tmp_path / "out.nii.gz", fresh=True)
    assert_clean_error(proc, str(bad.path), "fix:")
    assert not (tmp_path / "out.nii.gz").exists()


def test_file_names_with_brackets_are_printed_verbatim(tmp_path):
    """Rich markup in a file name ('[/x]') must neither vanish nor crash the error printer."""
    bad = make_bad("nifti-zero-bytes", tmp_path / "a[/b]")
    check_refused(*run_inprocess("predict", bad.path, "-o", tmp_path / "out", "--device", "cpu"), bad.path, "0 bytes")


# ---------------------------------------------------------------------------
# outputs that cannot be written, or would overwrite an input


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # permissions do not stop root; a read-only file system does
        for candidate in (Path("/proc/sys/medseg-out"), Path("/sys/medseg-out")):
            if candidate.parent.is_dir() and not os.access(candidate.parent, os.W_OK):
                return candidate
        pytest.skip("no read-only folder available to root")
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    return ro / "out"


@pytest.mark.parametrize("command", ["predict", "convert", "batch", "train"])
@pytest.mark.parametrize("where", ["not-writable", "a-file"])
def test_unwritable_output_is_refused_before_any_work(command, where, tmp_path):
    good = good_nifti(tmp_path / "in" / "case.nii.gz")
    if where == "a-file":
        blocker = tmp_path / "blocker.txt"
        blocker.write_text("a file, not a folder\n")
        out = blocker / "out"
    else:
        out = _unwritable_folder(tmp_path)
    if command == "predict":
        result = run_inprocess("predict", good, "-o", out, "--device", "cpu")
    elif command == "convert":
        result = run_inprocess("convert", good, out / "x.nii.gz")
    elif command == "batch":
        result = run_inprocess("batch", good.parent, "-o", out, "--device", "cpu")
    else:
        ds = _dataset(tmp_path / "ds")
        result = run_inprocess("train", REPO / "configs" / "hippocampus.yaml", *_sets(f"data.root={ds}",
                               f"train.output_dir={out}", *TINY_TRAIN))
    msg = check_refused(*result, out if where == "not-writable" else blocker)
    assert "not writable" in msg or "not a folder" in msg


def test_output_equal_to_input_is_refused(tmp_path):
    good = good_nifti(tmp_path / "in" / "case.nii.gz")
    before = good.read_bytes()
    # predict into the input's own folder would overwrite case.nii.gz
    check_refused(*run_inprocess("predict", good, "-o", good.parent, "--device", "cpu"), good, "equals the input")
    check_refused(*run_inprocess("convert", good, good), good, "into the input")
    series = tmp_path / "series"
    good_dicom(series)
    check_refused(*run_inprocess("convert", series, series / "x.nii.gz"), series / "x.nii.gz", "into the input")
    check_refused(*run_inprocess("batch", tmp_path / "in", "-o", tmp_path / "in" / "out", "--device", "cpu"),
                  tmp_path / "in" / "out", "inside the input")
    ds = _dataset(tmp_path / "ds")
    check_refused(*run_inprocess("train", REPO / "configs" / "hippocampus.yaml",
                                 *_sets(f"data.root={ds}", f"train.output_dir={ds / 'imagesTr'}", *TINY_TRAIN)),
                  ds / "imagesTr", "data folder")
    assert good.read_bytes() == before and sorted(p.name for p in (ds / "imagesTr").iterdir()) == \
        ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz"]


# ---------------------------------------------------------------------------
# train: bad training data is refused before anything is written


def _sets(*items: str) -> list[str]:
    return [x for it in items for x in ("--set", it)]


def _dataset(root: Path, n: int = 3) -> Path:
    for i in range(n):
        img = good_nifti(root / "imagesTr" / f"c{i}.nii.gz", shape=(16, 16, 16), seed=i)
        lab = (nib.load(img).get_fdata() > 250).astype(np.uint8)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(lab, nib.load(img).affine), str(root / "labelsTr" / f"c{i}.nii.gz"))
    return root


def _replace(root: Path, sub: str, name: str, bad_kind: str) -> Path:
    """Put a bad file from the matrix in place of ``sub/name``."""
    bad = make_bad(bad_kind, root.parent / "bad" / bad_kind)
    target = root / sub / name
    target.unlink()
    target = target.with_name("c1" + (".nrrd" if bad.path.name.endswith(".nrrd") else ".nii.gz"))
    shutil.copy(bad.path, target)
    return target


def _label_values(root):
    p = root / "labelsTr" / "c1.nii.gz"
    lab = np.asarray(nib.load(p).dataobj).copy()
    lab[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(lab, nib.load(p).affine), str(p))
    return p, "label values [7]"


def _float_labels(root):
    p = root / "labelsTr" / "c1.nii.gz"
    lab = np.asarray(nib.load(p).dataobj).astype(np.float32)
    lab[1, 1, 1] = 0.5
    nib.save(nib.Nifti1Image(lab, nib.load(p).affine), str(p))
    return p, "non-integer"


def _geometry_shape(root):
    p = root / "labelsTr" / "c1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12), np.uint8), np.eye(4)), str(p))
    return p, "differs from image shape"


def _geometry_affine(root):
    p = root / "labelsTr" / "c1.nii.gz"
    img = nib.load(p)
    aff = img.affine.copy()
    aff[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), str(p))
    return p, "geometry (affine) differs"


def _nan_image(root):
    p = root / "imagesTr" / "c1.nii.gz"
    img = nib.load(p)
    arr = img.get_fdata().astype(np.float32)
    arr[2, 3, 4] = np.inf
    nib.save(nib.Nifti1Image(arr, img.affine), str(p))
    return p, "NaN/Inf"


TRAIN_CASES = {
    "label-values": _label_values,
    "label-not-integer": _float_labels,
    "geometry-shape": _geometry_shape,
    "geometry-affine": _geometry_affine,
    "image-truncated": lambda r: (_replace(r, "imagesTr", "c1.nii.gz", "nifti-truncated-gz"), "cannot read NIfTI"),
    "image-zero-bytes": lambda r: (_replace(r, "imagesTr", "c1.nii.gz", "nifti-zero-bytes"), "empty (0 bytes)"),
    "label-zero-bytes": lambda r: (_replace(r, "labelsTr", "c1.nii.gz", "nifti-zero-bytes"), "empty (0 bytes)"),
    "image-nan": _nan_image,
    "image-2d": lambda r: (_replace(r, "imagesTr", "c1.nii.gz", "image-2d"), "image is 2D"),
    "image-4d": lambda r: (_replace(r, "imagesTr", "c1.nii.gz", "image-4d"), "more than one channel"),
    "image-zero-spacing": lambda r: (_replace(r, "imagesTr", "c1.nii.gz", "zero-spacing"), "spacing"),
}


@pytest.mark.parametrize("kind", sorted(TRAIN_CASES))
def test_bad_training_data_is_refused_before_training(kind, tmp_path):
    root = _dataset(tmp_path / "ds")
    path, fragment = TRAIN_CASES[kind](root)
    out = tmp_path / "run"
    result = run_inprocess("train", REPO / "configs" / "hippocampus.yaml",
                           *_sets(f"data.root={root}", f"train.output_dir={out}", *TINY_TRAIN))
    check_refused(*result, path, fragment)
    assert not out.exists()  # not even split.json or config.yaml


def test_good_tiny_dataset_trains(tmp_path):
    """The control: the same dataset without a defect trains and writes its checkpoints."""
    root = _dataset(tmp_path / "ds")
    code, _, err = run_inprocess("train", REPO / "configs" / "hippocampus.yaml",
                                   *_sets(f"data.root={root}", f"train.output_dir={tmp_path / 'run'}", *TINY_TRAIN))
    assert code == 0, err
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()


# ---------------------------------------------------------------------------
# batch: every bad series is recorded as failed (or skipped) with its reason; good ones are done


BATCH_SILENT = {"unknown-format", "dicom-zero-bytes"}  # not recognisable as images: nothing to record


def test_batch_records_every_bad_input_and_goes_on(tmp_path):
    root = tmp_path / "archive"
    bads = {kind: make_bad(kind, root / kind) for kind in sorted(BAD_INPUTS)}
    good_nifti(root / "good" / "vol.nii.gz")
    good_dicom(root / "good" / "series")
    out = tmp_path / "out"
    code, stdout, stderr = run_inprocess("batch", root, "-o", out, "--device", "cpu", "--record-paths")
    assert code == 0, stderr
    assert "Traceback" not in stdout + stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_input = {r["input"]: r for r in rows}
    assert sum(r["status"] == "done" for r in rows) == 2
    for kind, bad in bads.items():
        rel = bad.path.relative_to(root).as_posix()
        mine = [r for r in rows if r["input"] == rel or r["input"].startswith(rel + "/") or
                (bad.dicom and r["input"] == Path(rel).as_posix())]
        if kind in BATCH_SILENT:
            assert not mine, (kind, mine)
            continue
        assert len(mine) >= 1, (kind, sorted(by_input))
        for r in mine:
            assert r["status"] in ("failed", "skipped"), (kind, r)
            assert bad.fragment in r["reason"], (kind, r["reason"])
            assert "\n" not in r["reason"] and "Traceback" not in r["reason"]
            assert not r.get("output")
    # only the good inputs produced files (plus the manifest, its lock and the colour tables)
    produced = sorted(p.relative_to(out).as_posix() for p in files_under(out) if not p.name.startswith("."))
    done = sorted(r["output"] for r in rows if r["status"] == "done")
    assert produced == sorted(done + ["labels.csv", "labels.ctbl", "manifest.jsonl"])
    assert not [p for p in out.rglob("*.part*")]


# ---------------------------------------------------------------------------
# model files: foreign, tampered, truncated, code-carrying


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/medseg-pickle-ran",))


def _bad_models(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    ck = write_checkpoint(tmp_path / "good.pt")
    payload = torch.load(ck, weights_only=True)
    out = {}

    def save(name, obj, fragment):
        path = tmp_path / name
        torch.save(obj, path)
        out[name] = (path, fragment)

    first = next(iter(payload["state_dict"]))
    tampered = {**payload, "state_dict": {**payload["state_dict"], first: payload["state_dict"][first] * 1.01}}
    save("tampered.pt", tampered, "checksum")
    save("no-checksum.pt", {k: v for k, v in payload.items() if k != "sha256"}, "no weights checksum")
    save("foreign.pt", {"weights": torch.zeros(3)}, "not a medseg checkpoint")
    save("bare-state-dict.pt", payload["state_dict"], "not a medseg checkpoint")
    save("wrong-layout.pt", {**payload, "state_dict": [1, 2, 3]}, "layout")
    save("newer.pt", {**payload, "version": 99}, "newer medseg")
    # a pickle that runs code when loaded without weights_only: raw, and inside torch's zip container
    (tmp_path / "pickle-code.pt").write_bytes(pickle.dumps({"format": "medseg-checkpoint", "x": _RunsCode()}))
    out["pickle-code.pt"] = (tmp_path / "pickle-code.pt", "cannot load model file safely")
    torch.save({**payload, "config": _RunsCode()}, tmp_path / "zip-code.pt")
    out["zip-code.pt"] = (tmp_path / "zip-code.pt", "cannot load model file safely")
    (tmp_path / "truncated.pt").write_bytes(ck.read_bytes()[:2000])
    out["truncated.pt"] = (tmp_path / "truncated.pt", "cannot load model file safely")
    (tmp_path / "empty.pt").write_bytes(b"")
    out["empty.pt"] = (tmp_path / "empty.pt", "cannot load model file safely")
    with zipfile.ZipFile(tmp_path / "zip-junk.pt", "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    out["zip-junk.pt"] = (tmp_path / "zip-junk.pt", "cannot load model file safely")
    shutil.copy(good_nifti(tmp_path / "img.nii.gz"), tmp_path / "nifti-renamed.pt")
    out["nifti-renamed.pt"] = (tmp_path / "nifti-renamed.pt", "cannot load model file safely")
    return out


def test_unsafe_or_damaged_model_files_are_refused(tmp_path):
    marker = Path("/tmp/medseg-pickle-ran")
    marker.unlink(missing_ok=True)
    image = good_nifti(tmp_path / "in" / "case.nii.gz")
    for name, (path, fragment) in _bad_models(tmp_path / "models").items():
        out = tmp_path / "out" / name
        check_refused(*run_inprocess("predict", image, "-o", out, "--model", path, "--device", "cpu"), path, fragment)
        assert files_under(out) == [], name
    assert not marker.exists(), "a pickled payload ran code"


# ---------------------------------------------------------------------------
# a volume whose estimated memory exceeds the machine


def test_volume_too_large_for_memory_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("medseg.inference.memory")
    monkeypatch.setenv("MEDSEG_MEMORY_LIMIT_GB", "4")  # the same answer on any machine
    # a 64^3 file at 20 mm becomes 1280^3 voxels at the model's 1 mm: tens of GB of probabilities
    src = tmp_path / "in" / "coarse.nii.gz"
    src.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((64, 64, 64), np.float32), np.diag([20.0, 20, 20, 1])),
             str(src))
    out = tmp_path / "out"
    check_refused(*run_inprocess("predict", src, "-o", out, "--device", "cpu"), src, "not enough memory")
    assert files_under(out) == []
    code, _, stderr = run_inprocess("batch", src.parent, "-o", out, "--device", "cpu", "--record-paths")
    assert code == 0, stderr
    (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["status"] == "failed" and "not enough memory" in row["reason"] and "coarse.nii.gz" in row["reason"]
    assert [p.name for p in files_under(out) if not p.name.startswith(".")] == ["manifest.jsonl"]
