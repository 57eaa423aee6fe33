"""Logic of the MedsegSegment Slicer module: find medseg, run it out of process, read its output.

Plain Python (no slicer, qt, vtk, torch or medseg imports), so it is tested outside 3D Slicer.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

ENV_VAR = "MEDSEG_EXECUTABLE"
FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "seg.nrrd": ".seg.nrrd", "dicom-seg": ".dcm", "rtstruct": ".rtstruct.dcm"}
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MODEL = "hippocampus"
# set by Slicer's launcher for its own Python; they would break medseg's interpreter
_SLICER_PYTHON_VARS = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONNOUSERSITE")


class MedsegNotFound(RuntimeError):
    """medseg cannot be found or does not start; the message says what to do."""


class medseg_slicer_logic:  # noqa: N801
    """Slicer loads every .py in a module folder as a module named after the file: this class makes
    that a hidden module without a user interface, instead of an error in Slicer's log at startup."""

    def __init__(self, parent):
        parent.title = "medseg_slicer_logic"
        parent.hidden = True


def split_command(value: str) -> list:
    """A setting such as ``/opt/medseg/.venv/bin/medseg`` or ``/usr/bin/python3 -m medseg``."""
    value = value.strip()  # an existing path stays whole, spaces and all
    return [value] if Path(value).exists() else shlex.split(value, posix=os.name != "nt")


def setup_dir() -> Path:
    """Where :func:`setup_command` installs medseg from inside Slicer: ``~/.medseg/slicer-env``."""
    return Path.home() / ".medseg" / "slicer-env"


def venv_executable(env_dir) -> Path:
    """The ``medseg`` program of a virtual environment."""
    return Path(env_dir).joinpath(*(("Scripts", "medseg.exe") if os.name == "nt" else ("bin", "medseg")))


def candidate_locations(module_dir: Optional[Path] = None) -> list:
    """Usual places of a medseg virtual environment, most specific first (the one the module sets up itself first)."""
    exe = ("Scripts", "medseg.exe") if os.name == "nt" else ("bin", "medseg")
    here = Path(module_dir or Path(__file__).resolve().parent)
    roots = [setup_dir(), here.parent.parent / ".venv",  # a checkout: <repo>/slicer/MedsegSegment
             Path.home() / "medseg" / ".venv", Path.home() / ".venv", Path.home() / "venvs" / "medseg"]
    return [r.joinpath(*exe) for r in roots] + [Path.home() / ".local" / "bin" / "medseg"]


def clean_environment(env: Optional[Mapping[str, str]] = None) -> dict:
    """The environment for medseg: without Slicer's Python variables, unbuffered output."""
    out = {k: v for k, v in (os.environ if env is None else env).items() if k not in _SLICER_PYTHON_VARS}
    out["PYTHONUNBUFFERED"] = "1"
    return out


def find_medseg(setting: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                candidates: Optional[Iterable[Path]] = None) -> list:
    """The medseg command as an argument list: setting, else $MEDSEG_EXECUTABLE, else PATH, else candidates."""
    env = os.environ if env is None else env
    for source, value in (("the module's medseg setting", setting), (ENV_VAR, env.get(ENV_VAR))):
        cmd = split_command(value) if value and value.strip() else None
        if cmd and (Path(cmd[0]).is_file() or shutil.which(cmd[0], path=env.get("PATH"))):
            return cmd
        if cmd:
            raise MedsegNotFound(f"{source} is '{value}', but '{cmd[0]}' is not a program. Give the full path "
                                 "of medseg (e.g. /path/to/medseg/.venv/bin/medseg) or '/path/to/python -m medseg'.")
    on_path = shutil.which("medseg", path=env.get("PATH"))
    tried = list(candidate_locations() if candidates is None else candidates)
    found = [on_path] if on_path else [str(p) for p in tried if Path(p).is_file() and os.access(p, os.X_OK)]
    if found:
        return found[:1]
    raise MedsegNotFound("medseg was not found on PATH nor in " + ", ".join(str(p) for p in tried) + ". "
                         f"Install medseg in its own Python environment, then set {ENV_VAR} (or the module's "
                         "medseg setting) to its program, e.g. /path/to/medseg/.venv/bin/medseg.")


def check_medseg(command: Sequence[str], timeout: float = 60, env: Optional[Mapping[str, str]] = None,
                 args: Sequence[str] = ("--help",)) -> str:
    """Run ``medseg --help`` (or ``python -m medseg --help``); return its output or raise MedsegNotFound."""
    cmd = list(command) + list(args)
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, errors="replace", timeout=timeout,
                              env=clean_environment(env), stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise MedsegNotFound(f"cannot start {cmd[0]}: {exc.strerror or exc}") from None
    except subprocess.TimeoutExpired:
        raise MedsegNotFound(f"'{' '.join(cmd)}' did not answer within {timeout:g} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MedsegNotFound(f"'{' '.join(cmd)}' failed with status {proc.returncode}: {tail[0]}")
    return proc.stdout


def list_models(command: Sequence[str], timeout: float = 120, env: Optional[Mapping[str, str]] = None) -> list:
    """The trained models this medseg knows (``medseg models --json``: bundled and installed ones), each a dict
    with ``name``, ``kind``, ``inputs`` (sequence names in order), ``outputs``, ``source``..."""
    import json

    text = check_medseg(command, timeout, env, args=("models", "--json"))
    try:
        models = json.loads(text)
    except ValueError:
        raise MedsegNotFound("this medseg cannot list its models as JSON (too old?); update it") from None
    return [m for m in models if isinstance(m, dict) and m.get("name") and not m.get("error")
            and m.get("task", "volume") == "volume"]


def model_inputs(models: Sequence[Mapping], name: str) -> list:
    """The sequences model ``name`` takes, in order (``["image"]`` for one image or a model not in ``models``)."""
    for m in models:
        if m.get("name") == name:
            return list(m.get("inputs") or ["image"]) if m.get("sequences") else ["image"]
    return ["image"]


def find_python(candidates: Optional[Iterable[str]] = None, env: Optional[Mapping[str, str]] = None) -> list:
    """A Python 3.10 or newer to make medseg's own environment with: the first of ``candidates`` (default:
    python3.12, python3.11, python3.10, python3 on PATH) that runs and is new enough."""
    env = os.environ if env is None else env
    for name in candidates or ("python3.12", "python3.11", "python3.10", "python3", "python"):
        exe = shutil.which(name, path=env.get("PATH")) or (name if Path(name).is_file() else None)
        if not exe:
            continue
        try:
            proc = subprocess.run([exe, "-c", "import sys, venv; print(sys.version_info >= (3, 10))"],
                                  capture_output=True, text=True, timeout=30, env=clean_environment(env),
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0 and proc.stdout.strip() == "True":
            return [exe]
    raise MedsegNotFound("no Python 3.10 or newer was found to install medseg with. Install Python 3.11 "
                         "(python.org), or give medseg's program under Advanced.")


def default_package(module_dir: Optional[Path] = None) -> list:
    """What to install: the medseg checkout this module came from (with its constraints), else ``medseg``."""
    here = Path(module_dir or Path(__file__).resolve().parent)
    repo = here.parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "medseg").is_dir():
        constraints = repo / "constraints.txt"
        return (["-c", str(constraints)] if constraints.is_file() else []) + [str(repo)]
    return ["medseg"]


SETUP_SCRIPT = r"""
import subprocess, sys, venv
from pathlib import Path
env_dir, pip_args = Path(sys.argv[1]), sys.argv[2:]
print("creating", env_dir, flush=True)
venv.create(env_dir, with_pip=True, clear=True)
py = env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
for args in (["install", "--upgrade", "pip"], ["install", *pip_args]):
    print("pip", " ".join(args), flush=True)
    code = subprocess.call([str(py), "-m", "pip", "--disable-pip-version-check", *args])
    if code and args[1] != "--upgrade":
        sys.exit(code)
print("medseg installed", flush=True)
"""


def setup_command(python: Sequence[str], env_dir=None, package: Optional[Sequence[str]] = None) -> list:
    """The command that makes a fresh environment at ``env_dir`` (default :func:`setup_dir`) and installs medseg
    into it (``package``: pip arguments, default :func:`default_package`); run it as a :class:`MedsegJob` so its
    output streams into Slicer. Afterwards ``venv_executable(env_dir)`` is medseg's program."""
    env_dir = Path(env_dir or setup_dir())
    return list(python) + ["-c", SETUP_SCRIPT, str(env_dir), *(list(package) if package else default_package())]


def predict_supports_format(command: Sequence[str], timeout: float = 60, env=None) -> bool:
    """Whether this medseg's ``predict`` has the ``--format`` option."""
    return "--format" in check_medseg(command, timeout, env, args=("predict", "--help"))


def case_name(path) -> str:
    """``case.nii.gz`` -> ``case`` (the name medseg gives its outputs)."""
    name = Path(path).name
    base = re.sub(r"\.(seg\.nrrd|nii\.gz|nii|nrrd|nhdr|mha|mhd)$", "", name, flags=re.IGNORECASE)
    return base if base != name else Path(name).stem


def expected_output(input_path, output_dir, fmt: str = "seg.nrrd") -> Path:
    return Path(output_dir) / (case_name(input_path) + FORMATS[fmt])


def build_command(executable: Sequence[str], input_path, output_dir, model: str = DEFAULT_MODEL,
                  device: str = "auto", formats: Sequence[str] = ("seg.nrrd",),
                  channels: Optional[Mapping[str, object]] = None) -> list:
    """``medseg predict INPUT -o OUTDIR --model MODEL --device DEVICE --format F...`` as a list.

    ``channels`` (``{sequence name: file}``, for a model that takes several sequences, e.g. ``flair`` and
    ``t1c``) replaces INPUT by ``--channel NAME=FILE`` for each sequence."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown format(s) {bad}; use {', '.join(FORMATS)}")
    exe = [str(executable)] if isinstance(executable, (str, Path)) else list(executable)
    inputs = [arg for name, path in (channels or {}).items() for arg in ("--channel", f"{name}={path}")] \
        if channels else [str(input_path)]
    return exe + ["predict", *inputs, "-o", str(output_dir), "--model", model.strip() or DEFAULT_MODEL,
                  "--device", device] + [arg for fmt in formats for arg in ("--format", fmt)]


def find_output(output_dir, fmt: str = "seg.nrrd") -> Optional[Path]:
    """The one output medseg wrote into ``output_dir`` in format ``fmt`` (its name comes from medseg)."""
    found = sorted(p for p in Path(output_dir).glob("*" + FORMATS[fmt]) if p.is_file()) \
        if Path(output_dir).is_dir() else []
    return found[0] if len(found) == 1 else None


def safe_name(name: str) -> str:
    """A file-name-safe version of a Slicer node name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "volume"


def make_work_dir(prefix: str = "medseg-slicer-") -> Path:
    """A fresh temporary folder with ``input/`` (volume from Slicer) and ``output/`` (medseg's)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    (work / "input").mkdir()
    return work


def cleanup_work_dir(work_dir, keep: bool = False) -> bool:
    """Delete the temporary folder unless ``keep``; True when it was removed."""
    if keep or not work_dir or not Path(work_dir).exists():
        return False
    shutil.rmtree(work_dir, ignore_errors=True)
    return not Path(work_dir).exists()


@dataclass
class RunResult:
    success: bool
    output_path: Optional[Path]
    error: str = ""  # medseg's one-line error message, "cancelled", or what went wrong
    elapsed: float = 0.0  # seconds
    returncode: Optional[int] = None
    cancelled: bool = False
    timed_out: bool = False
    lines: list = field(default_factory=list)  # all output lines, stdout and stderr


class MedsegJob:
    """medseg as a child process that never blocks its caller: call :meth:`poll` repeatedly.

    Its stdout/stderr go to ``log_dir``/stdout.log and stderr.log and are read back as they grow:
    no reader thread (nothing runs behind Slicer's event loop) and no pipe that could fill up.
    """

    def __init__(self, command: Sequence[str], output_path=None, log_dir=None, timeout: Optional[float] = None,
                 env: Optional[Mapping[str, str]] = None, grace: float = 3.0):
        self.command, self.timeout, self.grace = list(command), timeout, grace
        self.output_path = None if output_path is None else Path(output_path)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="medseg-log-"))
        self._own_log_dir = log_dir is None  # removed once medseg has ended
        self.lines, self._stderr, self.cancelled, self.timed_out = [], [], False, False
        self.result: Optional[RunResult] = None  # set when medseg has ended
        self.start_time = time.monotonic()
        out, err = (open(self.log_dir / f"{n}.log", "wb") for n in ("stdout", "stderr"))
        self._readers = {n: open(self.log_dir / f"{n}.log", "rb") for n in ("stdout", "stderr")}
        self._partial = {n: b"" for n in self._readers}
        try:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=clean_environment(env))
        except OSError as exc:
            self._close()
            raise MedsegNotFound(f"cannot start {self.command[0]}: {exc.strerror or exc}") from None
        finally:
            out.close()
            err.close()

    def _close(self) -> None:
        for reader in self._readers.values():
            reader.close()

    @property
    def finished(self) -> bool:
        return self.result is not None

    def _read(self, final: bool) -> list:
        new = []
        for name, reader in self._readers.items():
            parts = re.split(rb"\r\n|\r|\n", self._partial[name] + reader.read())
            self._partial[name] = b"" if final else parts.pop()
            lines = [ln for ln in (raw.decode("utf-8", "replace").rstrip() for raw in parts) if ln]
            new += lines
            self._stderr += lines if name == "stderr" else []
        self.lines += new
        return new

    def cancel(self) -> None:
        """Stop medseg (terminate, then kill after ``grace`` seconds)."""
        if self.proc.poll() is None:
            self.cancelled = True
            self._stop()

    def _stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(self.grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def poll(self) -> list:
        """New output lines since the last call; sets :attr:`result` once medseg has ended."""
        if self.finished:
            return []
        if self.timeout is not None and time.monotonic() - self.start_time > self.timeout and self.proc.poll() is None:
            self.timed_out = True
            self._stop()
        code = self.proc.poll()
        new = self._read(final=code is not None)
        if code is not None:
            self._close()
            cleanup_work_dir(self.log_dir, keep=not self._own_log_dir)
            self.result = self._make_result(code, time.monotonic() - self.start_time)
        return new

    def _make_result(self, code: int, elapsed: float) -> RunResult:
        out = self.output_path
        if self.cancelled:
            error = "cancelled"
        elif self.timed_out:
            error = f"medseg did not finish within {self.timeout:g} s and was stopped"
        elif code != 0:
            error = error_line(self._stderr) or f"medseg exited with status {code}"
        else:
            error = f"medseg finished but did not write {out}" if out is not None and not out.is_file() else ""
        return RunResult(not error, out, error, elapsed, code, self.cancelled, self.timed_out, list(self.lines))


def error_line(stderr_lines: Sequence[str]) -> str:
    """medseg's one-line ``error: ...`` message, else the last stderr text (box borders removed)."""
    lines = [ln.strip(" \u2500\u2502\u256d\u256e\u256f\u2570") for ln in stderr_lines]
    lines = [ln for ln in lines if ln and not ln.startswith("Try '")]
    errors = [ln for ln in lines if ln.lower().startswith("error:")]
    return (errors or lines or [""])[-1]


def run_medseg(command: Sequence[str], output_path=None, on_line: Optional[Callable[[str], None]] = None,
               should_cancel: Optional[Callable[[], bool]] = None, timeout: Optional[float] = None,
               log_dir=None, env=None, interval: float = 0.1) -> RunResult:
    """Run medseg to the end (blocking), streaming each output line to ``on_line``."""
    job = MedsegJob(command, output_path, log_dir=log_dir, timeout=timeout, env=env)
    while True:
        for line in job.poll():
            if on_line:
                on_line(line)
        if job.finished:
            return job.result
        if should_cancel and should_cancel():
            job.cancel()
        time.sleep(interval)


def read_nrrd_header(path) -> dict:
    """Fields and key/value pairs of a NRRD header (pynrrd when importable, else a small parser)."""
    try:
        import nrrd  # not in Slicer's Python by default

        return {k: v if isinstance(v, str) else str(v) for k, v in nrrd.read_header(str(path)).items()}
    except Exception:  # no pynrrd, or a header it rejects
        return parse_nrrd_header(path)


def parse_nrrd_header(path) -> dict:
    """The text header of a NRRD file, up to the first blank line: ``key: value`` and ``key:=value``."""
    header = {}
    with open(path, "rb") as f:
        if not f.readline().startswith(b"NRRD"):
            raise ValueError(f"{path} is not a NRRD file")
        for line in (raw.decode("latin-1").rstrip("\r\n") for raw in f):
            if not line:
                break
            key, sep, value = line.partition(":=") if ":=" in line else line.partition(": ")
            if sep and not line.startswith("#"):
                header[key.strip()] = value.strip()
    return header


def segment_info(path) -> list:
    """``[{"name", "color" (r, g, b in 0..1), "label"}]`` from a Slicer .seg.nrrd header."""
    header = read_nrrd_header(path)
    segments = []
    while f"Segment{len(segments)}_ID" in header or f"Segment{len(segments)}_Name" in header:
        key = f"Segment{len(segments)}_"
        label = header.get(key + "LabelValue", "").strip()
        segments.append({"name": header.get(key + "Name", key[:-1]),
                         "color": tuple(float(c) for c in header.get(key + "Color", "").split()[:3]) or None,
                         "label": int(label) if label.isdigit() else None})
    return segments


def describe_segments(path) -> str:
    """``"2 segments: Anterior, Posterior"`` for a status message ('' when there is nothing to say)."""
    try:
        segs = segment_info(path)
    except Exception:  # a message only: never fail the run because of it
        return ""
    return f"{len(segs)} segment(s): " + ", ".join(s["name"] for s in segs) if segs else ""
