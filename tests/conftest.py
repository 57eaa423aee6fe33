"""Shared fixtures: synthetic volumes with awkward geometry, tiny checkpoints, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"
# the bundled single-network model: batch bookkeeping tests over many or whole-head volumes use it, since the
# default model (an ensemble with mirror TTA) costs several times more per volume and the labels are not under test
FAST_MODEL = ["--model", "hippocampus-fast"]
SHARED = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first, each module's tests in their own order: under ``make test`` (two workers, one
    module per worker at a time) the long modules start early and the short ones fill in beside them, instead of
    one long module holding up the end while the other core idles."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)  # a stable sort: modules stay contiguous


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(direction: np.ndarray, spacing, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.asarray(direction) @ np.diag(spacing)
    a[:3, 3] = origin
    return a


#: name -> (shape, affine): the geometry traps every output must survive.
GEOMETRIES = {
    "identity": ((20, 24, 16), make_affine(np.eye(3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))),
    "oblique": ((22, 18, 14), make_affine(rotation(15, -10, 30), (0.9, 1.1, 1.7), (-40.5, 12.25, 7.0))),
    "flipped": ((18, 20, 16), make_affine(np.diag([-1.0, 1.0, -1.0]), (1.2, 0.8, 1.5), (30.0, -20.0, 60.0))),
    "permuted": ((16, 22, 18), make_affine(np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]]), (1.0, 1.3, 0.9),
                                           (10.0, -5.0, 2.0))),
    "anisotropic": ((24, 24, 6), make_affine(np.eye(3), (0.7, 0.7, 5.0), (-8.0, -8.0, -12.0))),
}


def blob_label(shape) -> np.ndarray:
    """An asymmetric object (box plus ball, off centre) so that a flip or shift is visible."""
    lab = np.zeros(shape, np.uint8)
    x, y, z = shape
    lab[x // 5: x // 2, y // 4: (3 * y) // 5, max(1, z // 4): max(2, (3 * z) // 4)] = 1
    gi, gj, gk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    r = max(2.0, min(shape) / 4.0)
    ball = (gi - 0.7 * x) ** 2 + (gj - 0.65 * y) ** 2 + ((gk - 0.5 * z) * (min(shape) / z)) ** 2 <= r ** 2
    lab[ball] = 2
    return lab


def image_from_label(lab: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100.0 + 200.0 * (lab == 1) + 400.0 * (lab == 2) + rng.normal(0, 5, lab.shape)).astype(np.float32)


@pytest.fixture(params=sorted(GEOMETRIES))
def geometry(request):
    shape, affine = GEOMETRIES[request.param]
    return request.param, shape, affine


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present in this checkout")
    return SHARED


@pytest.fixture(scope="session")
def hippo_data() -> Path:
    return TEST_DATA / "hippocampus"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 900,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """Run the real ``medseg`` entry point in a process of its own: forked from a process that has made the imports
    (``cli_forkserver.py``, about 5 s saved per call), or with ``fresh`` (or ``MEDSEG_TEST_FRESH_PROCESSES=1``, or
    where forking is not possible) a new interpreter, start-up included."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "medseg", *map(str, args)]
    if not fresh and os.environ.get("MEDSEG_TEST_FRESH_PROCESSES") != "1":
        done = _FORKS.run(cmd, env, str(cwd or REPO), timeout)
        if done is not None:
            return done
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=timeout)


class _ForkServer:
    """Client of ``cli_forkserver.py``, started on first use (one per test process, so one per xdist worker)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.buffer = b""

    def _line(self, timeout: float | None) -> dict | None:
        import json
        import select

        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if timeout is not None and not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("the fork server ended")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, cmd: list[str], env: dict, cwd: str, timeout: float) -> subprocess.CompletedProcess | None:
        """``cmd`` (``python -m medseg ARGS``) in a forked child; None where the server cannot fork."""
        import atexit
        import json
        import signal
        import tempfile

        if not hasattr(os, "fork"):
            return None
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_forkserver.py"))],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         cwd=REPO, env=env)
            self.buffer = b""
            atexit.register(self.proc.kill)
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"args": cmd[3:], "env": env, "cwd": cwd, "out": str(out), "err": str(err)}
            try:
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                self.proc.stdin.flush()
                first = self._line(None)
                if "refused" in first:
                    return None
                reply = self._line(timeout)
                if reply is None:
                    os.kill(first["pid"], signal.SIGKILL)
                    self._line(None)
                    raise subprocess.TimeoutExpired(cmd, timeout)
            except (EOFError, BrokenPipeError, ValueError):
                self.proc.kill()
                return None
            return subprocess.CompletedProcess(cmd, reply["code"], out.read_text(), err.read_text())


_FORKS = _ForkServer()


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit, a one-line message naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert err.startswith("error:"), err
    flat = " ".join(err.split())
    for frag in fragments:
        assert frag in flat, (frag, flat)


@pytest.fixture(scope="session")
def threshold_model():
    """Register a model whose prediction is known: class = round(intensity), so inverse mapping is checkable."""
    from medseg.models.registry import MODELS, ModelSpec, register_model

    class Threshold(torch.nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.classes = classes
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            centres = torch.arange(self.classes, dtype=x.dtype, device=x.device).view(1, -1, 1, 1, 1)
            return -10.0 * (x - centres) ** 2 + 0 * self.dummy

    if "test-threshold" not in MODELS:
        register_model(ModelSpec("test-threshold", 3, "test only", lambda cfg, i, o: Threshold(o)))
    return "test-threshold"


def write_checkpoint(path: Path, *, model_name: str = "unet3d", spacing=None, patch=(16, 16, 16),
                     intensity: str = "zscore", channels=(4, 8), strides=(2,), num_classes: int = 3) -> Path:
    from medseg.core.config import Config
    from medseg.models.registry import build_model
    from medseg.models.checkpoint import save_checkpoint

    cfg = Config(name="tiny", labels={i: f"class{i}" for i in range(num_classes)})
    cfg.model.name = model_name
    cfg.model.channels = list(channels)
    cfg.model.strides = list(strides)
    cfg.model.num_res_units = 1
    cfg.patch.size = list(patch)
    cfg.preprocess.spacing = None if spacing is None else list(spacing)
    cfg.preprocess.intensity.mode = intensity
    cfg.inference.overlap = 0.25
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, cfg.num_classes)
    return save_checkpoint(path, model=model, cfg=cfg, epoch=0)


# the reference DICOM converter, newest found (pip package in the venv, or Debian's)
@pytest.fixture(scope="session")
def dcm2niix() -> str:
    from dicom_helpers import _dcm2niix_found

    found = _dcm2niix_found()
    if not found:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix, or apt-get install dcm2niix)")
    return found[-1][1]  # the newest


@pytest.fixture
def dcm2niix_optional():
    from dicom_helpers import _dcm2niix_found

    found = _dcm2niix_found()
    return found[-1][1] if found else None
