"""A fork server for the tests' ``medseg`` command lines: ``conftest.run_cli`` runs each command in a process of its own.

Started once per test process, this interpreter imports the CLI and its heavy dependencies (torch, MONAI: about 5 s
on 2 cores) without running anything, then forks one child per request. The child takes the request's arguments,
environment and working directory, writes its stdout and stderr to the request's files and runs ``python -m medseg``
as a fresh interpreter would (``runpy``, exit code from ``SystemExit``, a traceback and code 1 for an uncaught
exception, ``atexit`` handlers at the end). What it skips is only the imports. The imports leave the idle thread
servers of numpy's and SciPy's OpenBLAS running (OpenBLAS stops and restarts them around a fork); forking is refused
(and the caller starts a real interpreter) should any further thread appear: an OpenMP pool does not survive a fork.

Protocol, JSON lines: request ``{"args", "env", "cwd", "out", "err"}`` on stdin; replies ``{"pid": N}`` at once, then
``{"code": N}`` when the child has ended (``{"refused": reason}`` instead when it cannot fork).
"""

from __future__ import annotations

import json
import os
import sys


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0  # unknown: not Linux; refuse


def _child(req: dict) -> None:
    import atexit
    import logging
    import runpy
    import traceback
    import warnings

    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["out"]), (2, req["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        if os.environ.get("PYTHONWARNINGS") == "ignore":
            warnings.simplefilter("ignore")
        import medseg.__main__ as entry

        sys.argv = [entry.__file__, *req["args"]]
        try:
            runpy.run_module("medseg", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - what the interpreter would print, and its exit code
            traceback.print_exc()
            code = 1
        logging.shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def main() -> None:
    import medseg.cli  # noqa: F401 - the imports every command pays
    import medseg.apps.run  # noqa: F401
    import medseg.training.trainer  # noqa: F401

    reply = sys.stdout
    baseline = _threads()
    for line in sys.stdin:
        req = json.loads(line)
        if not baseline or _threads() > baseline:
            reply.write(json.dumps({"refused": f"{_threads()} threads"}) + "\n")
            reply.flush()
            continue
        reply.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
