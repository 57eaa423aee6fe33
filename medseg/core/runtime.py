"""The machine medseg runs on: the compute device, mixed precision, and the host memory it may use.

Everything that asks the hardware or the operating system a question lives here, so that
reading, preprocessing, inference and training share one answer (and one place to port).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch

from medseg.core.errors import ConfigError

def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA requested but no GPU is available", expected="a CUDA build of torch and a GPU",
                          found=f"torch {torch.__version__} with CUDA available = False",
                          fix="use --device cpu, or install a CUDA build of torch (see README)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError("unknown device", expected="auto, cpu, cuda or cuda:N", found=repr(device),
                          fix="use --device auto") from None


AMP_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def amp_dtype(name: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """``fp16`` (default), ``bf16`` or ``auto`` -> the autocast dtype; anything else is a ConfigError.

    ``auto`` (inference): bf16 on a CPU with native bf16 units (:func:`cpu_has_fast_bf16`), where it is about
    twice as fast and gives the same labels (``tests/test_speed_paths.py``); fp16 otherwise, which on CUDA is
    fp16 and on any other CPU plain fp32 (see :func:`autocast`)."""
    if isinstance(name, torch.dtype):
        return name
    key = (name or "fp16").lower()
    if key == "auto":
        cpu = device is None or torch.device(device).type == "cpu"
        return torch.bfloat16 if cpu and cpu_has_fast_bf16() else torch.float16
    if key not in AMP_DTYPES:
        raise ConfigError("unknown mixed-precision type", expected="auto, fp16 or bf16", found=repr(name),
                          fix="use --amp auto, --amp fp16, --amp bf16 or --amp off")
    return AMP_DTYPES[key]


def amp_options(text: str) -> dict:
    """An ``--amp`` value (``auto``, ``fp16``, ``bf16`` or ``off``/``none``/``fp32``/``no``) -> the Predictor's
    ``amp`` and ``amp_dtype`` options."""
    off = text.lower() in ("off", "none", "fp32", "no")
    return {"amp": not off, "amp_dtype": "fp16" if off else text}


def autocast(device: torch.device, enabled: bool = True, dtype: str | torch.dtype | None = None):
    """Mixed precision: on CUDA fp16 (the default) or bf16; on the CPU bf16 only.

    fp16 asked for on the CPU is a no-op (fp32): CPU kernels gain nothing from it. bf16 on the
    CPU runs convolutions through oneDNN in bfloat16, about twice as fast on CPUs with AMX
    (Intel Xeon 4th generation and newer), slower on CPUs without native bf16 (see
    :func:`cpu_has_fast_bf16`).
    """
    if not enabled:
        return contextlib.nullcontext()
    dt = amp_dtype(dtype, device)
    if device.type == "cuda" or (device.type == "cpu" and dt == torch.bfloat16):
        return torch.autocast(device_type=device.type, dtype=dt)
    return contextlib.nullcontext()


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matrix units (AMX-BF16 or AVX-512 BF16), where
    ``bf16`` autocast speeds up convolutions; elsewhere oneDNN emulates it and it is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        flags = ""
    if flags:
        return not {"amx_bf16", "avx512_bf16"}.isdisjoint(flags.split())
    try:  # other systems: ask oneDNN
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


GB = 1024 ** 3


#: glibc ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks under this size come from malloc's heap and stay there when freed (larger ones, such as whole CT volumes,
#: are still mapped and returned to the system at once); the heap keeps up to twice this free before trimming.
KEEP_FREED_BYTES = 64 << 20
_allocator_set = False


def keep_freed_cpu_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to :data:`KEEP_FREED_BYTES` for reuse instead of returning them
    to the system; returns whether it was set (glibc only; once per process).

    A forward pass on the CPU allocates and frees the same activations window after window (5.7 MB each at the
    first level of the hippocampus DynUNet). glibc hands blocks that size back to the system when they are freed,
    so every window faults its pages in again: about 6,000 page faults per 40×56×40 window, and on 2 cores of a
    virtual machine one window took 110-153 ms that way against 91-134 ms with the memory kept, process for
    process (``docs/benchmarks.md``). Training on the CPU does the same each step (a DynUNet 16-128 step on 4
    patches of 40×56×40: 1.90-2.11 s against 1.74-2.13 s, page faults per step 63,000-78,000 against
    25,000-36,000). The peak is unchanged: what is kept is what the previous window or step used."""
    global _allocator_set
    if _allocator_set:
        return True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES) == 1 and \
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * KEEP_FREED_BYTES) == 1
    except (OSError, AttributeError):
        return False
    _allocator_set = ok
    return ok


def last_axis_slabs(shape, voxels: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges that cut the last axis of ``shape`` into slabs of about ``voxels`` voxels
    (at least one plane each): how every bounded-memory pass over a whole volume walks it."""
    step = max(1, voxels // max(1, math.prod(int(s) for s in shape[:-1])))
    n = int(shape[-1])
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def available_host_bytes() -> int | None:
    """Memory this process may still allocate: MemAvailable, the cgroup limit, MEDSEG_MEMORY_LIMIT_GB."""
    candidates = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        try:
            import psutil

            candidates.append(int(psutil.virtual_memory().available))
        except ImportError:
            pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as fh:
                raw = fh.read().strip()
            if raw.isdigit() and int(raw) < 1 << 60:
                with open(usage_file) as fh:
                    candidates.append(max(0, int(raw) - int(fh.read().strip())))
            break
        except OSError:
            continue
    env = os.environ.get("MEDSEG_MEMORY_LIMIT_GB")
    if env:
        try:
            candidates.append(max(0, int(float(env) * GB) - current_rss_bytes()))
        except ValueError:
            from medseg.core.errors import ConfigError

            raise ConfigError("bad MEDSEG_MEMORY_LIMIT_GB", expected="a number of gigabytes, e.g. 4",
                              found=repr(env), fix="unset it or give a number") from None
    return min(candidates) if candidates else None


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def available_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
