"""The 3D Slicer module's logic (slicer/MedsegSegment), tested without Slicer.

A fake ``medseg`` (a small Python script) checks discovery, streaming, error capture,
cancellation and timeout; one slow test runs the real CLI end to end.
"""

from __future__ import annotations

import ast
import gzip
import os
import py_compile
import stat
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

MODULE_DIR = Path(__file__).resolve().parent.parent / "slicer" / "MedsegSegment"
sys.path.insert(0, str(MODULE_DIR))
import medseg_slicer_logic as msl  # noqa: E402

HIPPO_011 = Path(__file__).resolve().parent / "data" / "hippocampus" / "imagesTr" / "hippocampus_011.nii.gz"
posix_only = pytest.mark.skipif(os.name == "nt", reason="fake executables are POSIX scripts")

SEG_HEADER = (
    "NRRD0004\n# Complete NRRD file format specification at:\n# http://teem.sourceforge.net/nrrd/format.html\n"
    "type: unsigned char\ndimension: 3\nspace: left-posterior-superior\nsizes: 2 2 2\n"
    "space directions: (1,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\nencoding: gzip\n"
    "space origin: (0,0,0)\n"
    "Segment0_Color:=0.9 0.2 0.1\nSegment0_ID:=Segment_1\nSegment0_LabelValue:=1\nSegment0_Layer:=0\n"
    "Segment0_Name:=Anterior\n"
    "Segment1_Color:=0.1 0.4 0.9\nSegment1_ID:=Segment_2\nSegment1_LabelValue:=2\nSegment1_Layer:=0\n"
    "Segment1_Name:=Posterior\n\n"
)

FAKE_MEDSEG = r'''#!{python}
"""Fake medseg: the input's name picks the behaviour (ok, fail, crash, slow, nooutput)."""
import gzip, pathlib, sys, time
args = sys.argv[1:]
if args == ["--help"] or args == ["predict", "--help"]:
    print("Usage: medseg predict [OPTIONS] INPUTS... --format [nifti|seg.nrrd]")
    sys.exit(0)
if args == ["hang", "--help"]:
    time.sleep(60)
assert args[0] == "predict", args
inp, out = pathlib.Path(args[1]), pathlib.Path(args[args.index("-o") + 1])
fmt = args[args.index("--format") + 1] if "--format" in args else "nifti"
name = inp.name.split(".")[0]
print("loading model", flush=True)
print("predict 1/2", file=sys.stderr, flush=True)
if "fail" in name:
    print("error: " + str(inp) + ": not a volume; expected NIfTI", file=sys.stderr)
    sys.exit(2)
if "crash" in name:
    print("Traceback (most recent call last):", file=sys.stderr)
    print("RuntimeError: CUDA out of memory", file=sys.stderr)
    sys.exit(1)
if "slow" in name:
    for i in range(600):
        print("step", i, flush=True)
        time.sleep(0.1)
if "nooutput" not in name:
    out.mkdir(parents=True, exist_ok=True)
    suffix = {{"nifti": ".nii.gz", "seg.nrrd": ".seg.nrrd"}}[fmt]
    data = {header!r}.encode() + gzip.compress(bytes(8)) if fmt == "seg.nrrd" else b"tiny"
    (out / (name + suffix)).write_bytes(data)
    print(str(inp) + " -> " + str(out / (name + suffix)) + " (0.1 s)")
'''


def write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_medseg(tmp_path) -> Path:
    (tmp_path / "bin").mkdir()
    return write_script(tmp_path / "bin" / "medseg", FAKE_MEDSEG.format(python=sys.executable, header=SEG_HEADER))


def fake_input(tmp_path: Path, name: str) -> Path:
    (tmp_path / "in").mkdir(exist_ok=True)
    p = tmp_path / "in" / f"{name}.nii.gz"
    p.write_bytes(b"volume")
    return p


# ----------------------------------------------------------------------------- command line
def test_build_command_and_output_name():
    cmd = msl.build_command(["/opt/medseg"], "/t/in/case.nii.gz", "/t/out", model="hippocampus", device="cpu")
    assert cmd == ["/opt/medseg", "predict", "/t/in/case.nii.gz", "-o", "/t/out", "--model", "hippocampus",
                   "--device", "cpu", "--format", "seg.nrrd"]
    assert msl.expected_output("/t/in/case.nii.gz", "/t/out") == Path("/t/out/case.seg.nrrd")
    assert msl.expected_output("/t/in/case.nii.gz", "/t/out", "nifti") == Path("/t/out/case.nii.gz")
    assert msl.expected_output("scan.nrrd", "o", "nrrd") == Path("o/scan.nrrd")


def test_build_command_several_formats_python_module_and_defaults():
    cmd = msl.build_command([sys.executable, "-m", "medseg"], "a.nii.gz", "out", model="  ",
                            formats=("nifti", "seg.nrrd"))
    assert cmd[:3] == [sys.executable, "-m", "medseg"]
    assert cmd[cmd.index("--model") + 1] == "hippocampus" and cmd[cmd.index("--device") + 1] == "auto"
    assert cmd[-4:] == ["--format", "nifti", "--format", "seg.nrrd"]
    assert msl.build_command("medseg", "a.nii.gz", "o", formats=())[0] == "medseg"
    with pytest.raises(ValueError, match="unknown format"):
        msl.build_command(["medseg"], "a.nii.gz", "o", formats=("png",))


def test_build_command_for_several_sequences_and_finding_the_output(tmp_path):
    cmd = msl.build_command(["medseg"], None, "/t/out", model="glioma", device="cpu",
                            channels={"flair": "/t/in/FLAIR.nii.gz", "t1c": "/t/in/T1 post.nii.gz"})
    assert cmd == ["medseg", "predict", "--channel", "flair=/t/in/FLAIR.nii.gz", "--channel", "t1c=/t/in/T1 post.nii.gz",
                   "-o", "/t/out", "--model", "glioma", "--device", "cpu", "--format", "seg.nrrd"]
    out = tmp_path / "output"
    assert msl.find_output(out) is None  # not written (yet)
    out.mkdir()
    (out / "FLAIR.seg.nrrd").write_bytes(b"NRRD0004\n")
    (out / "FLAIR.nii.gz").write_bytes(b"x")
    assert msl.find_output(out) == out / "FLAIR.seg.nrrd"
    assert msl.find_output(out, "nifti") == out / "FLAIR.nii.gz"
    (out / "other.seg.nrrd").write_bytes(b"NRRD0004\n")
    assert msl.find_output(out) is None  # ambiguous: never load the wrong one


def test_safe_name_split_command_and_environment(tmp_path):
    assert msl.safe_name("MR head (T1) / 2") == "MR_head_T1_2"
    assert msl.safe_name("../") == "volume"
    assert msl.split_command("/usr/bin/python3 -m medseg") == ["/usr/bin/python3", "-m", "medseg"]
    spaced = tmp_path / "my venv" / "medseg"
    spaced.parent.mkdir()
    spaced.write_text("")
    assert msl.split_command(f" {spaced} ") == [str(spaced)]
    env = msl.clean_environment({"PATH": "/bin", "PYTHONHOME": "/slicer/python", "PYTHONPATH": "/slicer/lib"})
    assert env == {"PATH": "/bin", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- discovery
@posix_only
def test_find_medseg_order(tmp_path, fake_medseg):
    other = write_script(tmp_path / "other-medseg", "#!/bin/sh\nexit 0\n")
    path_env = {"PATH": str(fake_medseg.parent)}
    assert msl.find_medseg(env=path_env, candidates=[]) == [str(fake_medseg)]  # on PATH
    env = dict(path_env, MEDSEG_EXECUTABLE=str(other))
    assert msl.find_medseg(env=env, candidates=[]) == [str(other)]  # env var beats PATH
    assert msl.find_medseg(f"{sys.executable} -m medseg", env=env) == [sys.executable, "-m", "medseg"]  # setting first
    empty = {"PATH": str(tmp_path / "nothing")}
    assert msl.find_medseg(env=empty, candidates=[tmp_path / "missing", other]) == [str(other)]  # candidates


@posix_only
def test_find_medseg_errors_are_clear(tmp_path):
    with pytest.raises(msl.MedsegNotFound, match="MEDSEG_EXECUTABLE") as exc:
        msl.find_medseg(env={"PATH": str(tmp_path)}, candidates=[tmp_path / ".venv" / "bin" / "medseg"])
    assert "not found" in str(exc.value) and str(tmp_path / ".venv") in str(exc.value)
    with pytest.raises(msl.MedsegNotFound, match="is not a program"):
        msl.find_medseg(env={"PATH": str(tmp_path), "MEDSEG_EXECUTABLE": str(tmp_path / "nope")})
    with pytest.raises(msl.MedsegNotFound, match="module's medseg setting"):
        msl.find_medseg("/no/such/medseg", env={"PATH": str(tmp_path)})
    assert msl.candidate_locations(MODULE_DIR)[1] == MODULE_DIR.parent.parent / ".venv" / "bin" / "medseg"


@posix_only
def test_check_medseg(tmp_path, fake_medseg):
    assert "Usage" in msl.check_medseg([str(fake_medseg)], timeout=30)
    assert msl.predict_supports_format([str(fake_medseg)], timeout=30)
    broken = write_script(tmp_path / "broken", "#!/bin/sh\necho 'ModuleNotFoundError: torch' >&2\nexit 1\n")
    with pytest.raises(msl.MedsegNotFound, match="status 1: ModuleNotFoundError: torch"):
        msl.check_medseg([str(broken)])
    with pytest.raises(msl.MedsegNotFound, match="did not answer within 1 s"):
        msl.check_medseg([str(fake_medseg)], timeout=1, args=("hang", "--help"))
    with pytest.raises(msl.MedsegNotFound, match="cannot start"):
        msl.check_medseg([str(tmp_path / "absent")])


# ----------------------------------------------------------------------------- running
@posix_only
def test_run_success_streams_lines_and_reads_segments(tmp_path, fake_medseg):
    inp = fake_input(tmp_path, "case")
    out_dir = tmp_path / "out"
    cmd = msl.build_command([str(fake_medseg)], inp, out_dir, device="cpu")
    seen = []
    res = msl.run_medseg(cmd, msl.expected_output(inp, out_dir), on_line=seen.append, log_dir=tmp_path, timeout=60)
    assert res.success and res.error == "" and res.returncode == 0, res
    assert res.output_path == out_dir / "case.seg.nrrd" and res.output_path.is_file()
    assert "loading model" in seen and "predict 1/2" in seen and any(s.endswith("case.seg.nrrd (0.1 s)") for s in seen)
    assert res.lines == seen and 0 < res.elapsed < 60
    assert (tmp_path / "stdout.log").read_text().startswith("loading model")
    assert [s["name"] for s in msl.segment_info(res.output_path)] == ["Anterior", "Posterior"]
    assert msl.describe_segments(res.output_path) == "2 segment(s): Anterior, Posterior"


@posix_only
def test_run_failure_returns_the_error_line(tmp_path, fake_medseg):
    inp = fake_input(tmp_path, "fail")
    cmd = msl.build_command([str(fake_medseg)], inp, tmp_path / "out")
    res = msl.run_medseg(cmd, msl.expected_output(inp, tmp_path / "out"), timeout=60)
    assert not res.success and res.returncode == 2 and not res.cancelled
    assert res.error == f"error: {inp}: not a volume; expected NIfTI"


@posix_only
def test_run_crash_and_missing_output(tmp_path, fake_medseg):
    crash = msl.run_medseg(msl.build_command([str(fake_medseg)], fake_input(tmp_path, "crash"), tmp_path / "o"))
    assert not crash.success and crash.returncode == 1 and crash.error == "RuntimeError: CUDA out of memory"
    inp = fake_input(tmp_path, "nooutput")
    res = msl.run_medseg(msl.build_command([str(fake_medseg)], inp, tmp_path / "o"), msl.expected_output(inp, tmp_path / "o"))
    assert res.returncode == 0 and not res.success and "did not write" in res.error


@posix_only
def test_cancel_terminates(tmp_path, fake_medseg):
    seen = []
    t0 = time.monotonic()
    res = msl.run_medseg(msl.build_command([str(fake_medseg)], fake_input(tmp_path, "slow"), tmp_path / "o"),
                         on_line=seen.append, should_cancel=lambda: any(s.startswith("step 3") for s in seen))
    assert res.cancelled and not res.success and res.error == "cancelled" and res.returncode != 0
    assert time.monotonic() - t0 < 20 and not any(s.startswith("step 100") for s in seen)


@posix_only
def test_timeout_stops_medseg(tmp_path, fake_medseg):
    res = msl.run_medseg(msl.build_command([str(fake_medseg)], fake_input(tmp_path, "slow"), tmp_path / "o"),
                         timeout=1.0)
    assert res.timed_out and not res.success and "within 1 s" in res.error and 1.0 <= res.elapsed < 15


@posix_only
def test_job_poll_never_blocks(tmp_path, fake_medseg):
    job = msl.MedsegJob(msl.build_command([str(fake_medseg)], fake_input(tmp_path, "slow"), tmp_path / "o"))
    try:
        t0 = time.monotonic()
        for _ in range(5):
            job.poll()
        assert time.monotonic() - t0 < 1.0 and not job.finished
    finally:
        job.cancel()
    while not job.finished:
        job.poll()
        time.sleep(0.05)
    assert job.result.cancelled and job.poll() == [] and not job.log_dir.exists()  # its own log folder is removed


def test_start_failure_is_clear(tmp_path):
    with pytest.raises(msl.MedsegNotFound, match="cannot start"):
        msl.MedsegJob([str(tmp_path / "absent"), "predict"], log_dir=tmp_path)


def test_error_line_from_a_usage_box():
    stderr = ["Usage: medseg predict [OPTIONS] INPUTS...", "Try 'medseg predict -h' for help.",
              "\u256d\u2500 Error \u2500\u2500\u256e", "\u2502 No such option: --format   \u2502",
              "\u2570\u2500\u2500\u2500\u2500\u256f"]
    assert msl.error_line(stderr) == "No such option: --format"
    assert msl.error_line(["warning: x", "error: bad input", "cleanup"]) == "error: bad input"
    assert msl.error_line([]) == ""


# ----------------------------------------------------------------------------- temp folders, headers
def test_work_dir_cleanup_and_keep():
    work = msl.make_work_dir()
    assert (work / "input").is_dir()
    (work / "input" / "x.nii.gz").write_bytes(b"x")
    assert msl.cleanup_work_dir(work, keep=True) is False and work.is_dir()
    assert msl.cleanup_work_dir(work) is True and not work.exists()
    assert msl.cleanup_work_dir(work) is False


def test_nrrd_header_parser_matches_pynrrd(tmp_path):
    seg = tmp_path / "case.seg.nrrd"
    seg.write_bytes(SEG_HEADER.encode() + gzip.compress(bytes(8)))
    own = msl.parse_nrrd_header(seg)
    assert own["Segment1_Name"] == "Posterior" and own["encoding"] == "gzip" and own["sizes"] == "2 2 2"
    assert msl.segment_info(seg)[0] == {"name": "Anterior", "color": (0.9, 0.2, 0.1), "label": 1}
    pytest.importorskip("nrrd")
    assert msl.read_nrrd_header(seg)["Segment0_Color"] == own["Segment0_Color"]
    not_nrrd = tmp_path / "x.seg.nrrd"
    not_nrrd.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError):
        msl.parse_nrrd_header(not_nrrd)
    assert msl.describe_segments(not_nrrd) == "" and msl.describe_segments(tmp_path / "missing") == ""


# ----------------------------------------------------------------------------- the Slicer module file
def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_slicer_module_compiles_and_stays_light(tmp_path):
    module = MODULE_DIR / "MedsegSegment.py"
    for path in (module, MODULE_DIR / "medseg_slicer_logic.py"):
        py_compile.compile(str(path), cfile=str(tmp_path / (path.stem + ".pyc")), doraise=True)
    imports = _imported_modules(module)
    assert {"slicer", "qt"} <= imports and not imports & {"torch", "medseg", "monai"}
    assert not _imported_modules(MODULE_DIR / "medseg_slicer_logic.py") & {"slicer", "qt", "vtk", "ctk", "torch", "medseg"}
    parent = SimpleNamespace()  # Slicer's module scan instantiates the helper file's class: a hidden module
    msl.medseg_slicer_logic(parent)
    assert parent.hidden is True
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "set(MODULE_NAME MedsegSegment)" in cmake and "medseg_slicer_logic.py" in cmake
    assert "add_subdirectory(MedsegSegment)" in (MODULE_DIR.parent / "CMakeLists.txt").read_text()


@posix_only
def test_slicer_logic_class_with_stub_slicer(tmp_path, fake_medseg, monkeypatch):
    """MedsegSegmentLogic against stand-ins for slicer/qt/ctk: export, run, load, storage name kept."""
    saved, loaded = [], []

    def save_node(node, path):
        Path(path).write_bytes(b"volume")
        node.storage.name = path  # what saveNode does to the node's storage node
        saved.append(path)
        return True

    class Seg:
        def SetName(self, name):
            self.name = name

        def SetReferenceImageGeometryParameterFromVolumeNode(self, node):
            self.reference = node

    class Storage:
        name = "/data/head.nrrd"

        def GetFileName(self):
            return self.name

        def SetFileName(self, name):
            self.name = name

    class Node:
        storage = Storage()

        def GetName(self):
            return "MR head"

        def GetStorageNode(self):
            return self.storage

    fake_slicer = ModuleType("slicer")
    fake_slicer.util = SimpleNamespace(saveNode=save_node, loadSegmentation=lambda path: loaded.append(path) or Seg(),
                                       startupEnvironment=lambda: {"PATH": "/bin", "PYTHONHOME": "/slicer"})
    fake_slicer.mrmlScene = SimpleNamespace(GenerateUniqueName=lambda name: name)
    fake_slicer.app = SimpleNamespace(processEvents=lambda: None)
    slm = ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *a: None}))
    for name, mod in (("slicer", fake_slicer), ("slicer.ScriptedLoadableModule", slm), ("qt", ModuleType("qt")),
                      ("ctk", ModuleType("ctk"))):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "MedsegSegment", raising=False)
    import MedsegSegment

    logic = MedsegSegment.MedsegSegmentLogic()
    assert "PYTHONHOME" not in logic.environment()
    node = Node()
    result, seg = logic.process(node, model="hippocampus", device="cpu", setting=str(fake_medseg), timeout=60)
    assert result.success, result.error
    assert Path(saved[0]).name == "MR_head.nii.gz" and Path(loaded[0]).name == "MR_head.seg.nrrd"
    assert node.storage.name == "/data/head.nrrd"  # File > Save still points at the user's file
    assert seg.name == "MR head medseg" and seg.reference is node
    assert not Path(saved[0]).parent.parent.exists()  # temporary folder removed
    monkeypatch.delitem(sys.modules, "MedsegSegment")


# ----------------------------------------------------------------------------- the real CLI
@pytest.mark.slow
def test_real_medseg_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "medseg"]
    msl.check_medseg(cmd, timeout=120)
    formats = ("nifti",) if msl.predict_supports_format(cmd, timeout=120) else ()  # no --format: NIfTI anyway
    out_dir = tmp_path / "out"
    seen = []
    res = msl.run_medseg(msl.build_command(cmd, HIPPO_011, out_dir, device="cpu", formats=formats),
                         msl.expected_output(HIPPO_011, out_dir, "nifti"), on_line=seen.append,
                         log_dir=tmp_path, timeout=600)
    assert res.success, (res.error, res.lines)
    assert res.output_path == out_dir / "hippocampus_011.nii.gz" and res.output_path.stat().st_size > 0
    assert any("hippocampus_011.nii.gz" in line for line in seen)


def test_models_listed_from_the_real_medseg():
    """The model list and each model's sequences come from 'medseg models --json' (bundled and installed models)."""
    models = msl.list_models([sys.executable, "-m", "medseg"], timeout=300)
    names = [m["name"] for m in models]
    assert "hippocampus" in names and "glioma" in names
    assert msl.model_inputs(models, "glioma") == ["flair", "t1c"]
    assert msl.model_inputs(models, "hippocampus") == ["image"]
    assert msl.model_inputs(models, "/some/file.pt") == ["image"]  # a path: one image unless listed


@posix_only
def test_models_list_refuses_an_old_medseg(tmp_path):
    old = write_script(tmp_path / "medseg", f"#!{sys.executable}\nprint('a table, not JSON')\n")
    with pytest.raises(msl.MedsegNotFound, match="JSON"):
        msl.list_models([str(old)])


@posix_only
def test_setup_installs_medseg_into_its_own_environment(tmp_path):
    """'Set up medseg' from inside Slicer: a fresh environment made by a Python it finds, medseg installed into it
    with pip (here a small stand-in package from a local folder, offline), its program found and working."""
    pkg = tmp_path / "pkg"
    (pkg / "medseg_standin").mkdir(parents=True)
    (pkg / "medseg_standin" / "__init__.py").write_text(
        "import sys\ndef main():\n    print('Usage: medseg predict [OPTIONS] --format')\n    sys.exit(0)\n")
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "medseg-standin"\nversion = "0.0"\n'
        '[project.scripts]\nmedseg = "medseg_standin:main"\n')
    import subprocess

    # a wheel made here (a fresh environment's setuptools may lack bdist_wheel offline), installed from the folder
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "whl"),
                    str(pkg)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "whl").glob("*.whl")
    python = msl.find_python([sys.executable])
    env_dir = tmp_path / "env"
    cmd = msl.setup_command(python, env_dir, ["--no-index", str(wheel)])
    (tmp_path / "log").mkdir()
    res = msl.run_medseg(cmd, None, log_dir=tmp_path / "log", timeout=600)
    assert res.success, (res.error, res.lines[-20:])
    assert any("medseg installed" in line for line in res.lines)
    exe = msl.venv_executable(env_dir)
    assert exe.is_file()
    assert "Usage: medseg predict" in msl.check_medseg([str(exe)], timeout=60)
    assert msl.find_medseg(candidates=[exe], env={"PATH": "/nonexistent"}) == [str(exe)]


def test_setup_defaults():
    assert msl.candidate_locations()[0] == msl.venv_executable(msl.setup_dir())
    package = msl.default_package(MODULE_DIR)  # this checkout, with its constraints
    assert package[-1] == str(MODULE_DIR.parent.parent) and package[0] == "-c"
    assert msl.default_package(Path("/nowhere/slicer/MedsegSegment")) == ["medseg"]
    with pytest.raises(msl.MedsegNotFound, match="Python 3.10"):
        msl.find_python(["/nonexistent/python3"])
