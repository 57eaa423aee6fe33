"""``medseg batch``: segment every series under a root folder, resumably, failures isolated.

* The model is loaded once; the next series is read on a worker thread while the
  current one is inferred.
* Outputs are mirrored by study/series under stable names holding no patient data.
* ``manifest.jsonl`` has exactly one row per series (status ``done``, ``failed`` or
  ``skipped``, the reason, timings and the input's SHA-256). It is rewritten atomically
  (temporary file, fsync, rename) after every series, so a run killed at any moment
  leaves a valid manifest and complete outputs; the same command resumes.
* ``--shard I/N`` splits the work deterministically by series key.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock
from filelock import Timeout as LockTimeout

from medseg.core.errors import ConfigError, InputNotFoundError, MedsegError, OutputError
from medseg.io.sources import InputItem
from medseg.io.volume import atomic_write, check_writable_folder
from medseg.core.privacy import path_token, redact

MANIFEST_FIELDS = ("key", "input", "kind", "output", "outputs", "status", "reason", "load_s", "predict_s", "write_s",
                   "input_hash", "fingerprint", "stored", "duplicates", "unreadable", "finished_at")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError("bad --shard", expected="I/N with 0 <= I < N, e.g. 0/4", found=repr(text),
                          fix="number shards from 0") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError("bad --shard", expected="I/N with 0 <= I < N, e.g. 0/4", found=repr(text),
                          fix="number shards from 0")
    return i, n


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    import hashlib

    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % shard[1] == shard[0]


def fingerprint(item: InputItem) -> str:
    """Cheap change detector (names, sizes, modification times) used to skip finished work."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted(item.files or [item.path]):
        st = os.stat(f)
        h.update(f"{Path(f).name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


class Manifest:
    """One row per series key; every update rewrites the file atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise OutputError(f"manifest line {n} is not valid JSON", path=path,
                                      fix="restore the manifest or move it away to start over") from None
                self.rows[row["key"]] = row

    def update(self, row: dict) -> None:
        self.rows[row["key"]] = {k: row.get(k) for k in MANIFEST_FIELDS}
        text = "".join(json.dumps(self.rows[k], sort_keys=False) + "\n" for k in sorted(self.rows))
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
        _fsync_dir(self.path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); Windows cannot open a folder for fsync, and need not."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class BatchSummary:
    outdir: Path
    manifest: Path
    done: int = 0
    failed: int = 0
    skipped: int = 0
    already_done: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)


class _Lock:
    """One batch per output folder (per manifest): a second one is refused at once, on every platform.

    ``filelock`` uses ``flock`` on POSIX and ``msvcrt.locking`` on Windows (both released by the
    operating system when the process ends, however it ends), and an exclusive-create lock file
    where neither is available.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = FileLock(path, timeout=0)

    def __enter__(self):
        try:
            self.lock.acquire()
        except LockTimeout:
            raise OutputError("another medseg batch is writing to this output folder", path=self.path.parent,
                              fix="wait for it to finish, or use another output folder or --shard") from None
        except OSError as exc:
            raise OutputError("cannot create the batch lock file", path=self.path,
                              found=exc.strerror or type(exc).__name__,
                              fix="make the output folder writable, or choose another one") from None
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _check_folders(root: Path, outdir: Path) -> None:
    if not root.exists():
        raise InputNotFoundError("batch root not found", path=root, expected="a folder of studies or volumes",
                                 fix="check the path")
    r, o = root.resolve(), outdir.resolve()
    if o == r or o.is_relative_to(r):
        raise OutputError("output folder is inside the input folder", path=outdir,
                          expected=f"a folder outside {root}", fix="inputs are never written to; choose another -o")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def run_batch(root: str | Path, outdir: str | Path, *, model: str | None = None, device: str = "auto",
              rules_path: str | Path | None = None, shard: str | None = None, retry_failed: bool = True,
              progress: bool = True, dicom_options: dict | None = None, formats: list[str] | None = None,
              on_done=None, log=None, anonymize: bool = False, record_paths: bool = False,
              runtime: dict | None = None, engine: str = "local", ray_address: str | None = None,
              workers: int | None = None, gpus_per_worker: float = 0.0, preview: bool = False,
              statistics: bool = False) -> BatchSummary:
    """Segment everything under ``root`` into ``outdir`` (see the module documentation).

    ``runtime``: :class:`~medseg.inference.predictor.Predictor` options (``backend``, ``amp``,
    ``amp_dtype``, ``compile``, ``threads``). ``engine="ray"`` spreads the series over Ray actors
    (one model each; :mod:`medseg.apps.ray_engine`), ``workers`` of them (default: one per CPU
    of the cluster), on the cluster at ``ray_address`` (default: a local one); the manifest is the same.

    ``on_done(item, written_paths) -> dict`` runs after each series is written (e.g. to
    store a DICOM SEG in a PACS); its dict is merged into the manifest row and must hold
    ``stored``. Finished rows without ``stored`` are completed by calling it again.

    Privacy: without ``record_paths`` the manifest, the summary and failure reasons name each
    input by a hash of its path relative to ``root`` (:func:`medseg.core.privacy.path_token`), as
    folder names often hold patient names. ``anonymize`` de-identifies DICOM SEG outputs.

    ``preview`` and ``statistics`` add ``<name>.preview.png`` and ``<name>.statistics.csv|json`` per series; with
    ``statistics`` the batch also writes ``statistics.csv`` (per shard: ``statistics.shard-I-of-N.csv``), one table
    over every finished series, named as in the manifest.
    """
    from medseg.apps.run import default_format, discover_inputs, run_items
    from medseg.core.labels import infos_from_config
    from medseg.core.progress import progress_bar
    from medseg.inference.predictor import Predictor
    from medseg.io.rules import load_rules
    from medseg.io.writers import check_formats

    root, outdir = Path(root), Path(outdir)
    if engine not in ("local", "ray"):
        raise ConfigError("unknown batch engine", expected="local or ray", found=repr(engine),
                          fix="use --engine local (with --shard I/N for job arrays) or --engine ray")
    _check_folders(root, outdir)
    check_writable_folder(outdir)
    shard_t = parse_shard(shard)
    rules = load_rules(rules_path)
    formats = check_formats(formats) if formats else None
    say = log or (lambda msg: None)

    def shown(path: Path | str, *, name_only: bool = False) -> str:  # an input's path, or a file's name alone
        text = Path(path).name if name_only else _rel(path, root)
        return text if record_paths else path_token(text)

    def hide(text: str, path: Path) -> str:  # paths in a reason -> the input's token (and ROOT)
        if record_paths or not text:
            return text
        p, r = Path(path), Path(root)
        return redact(text, {str(p): shown(p), str(p.resolve()): shown(p), str(r): "ROOT", str(r.resolve()): "ROOT"})

    t_start = time.perf_counter()
    from medseg.models.loading import model_config

    cfg = model_config(model)  # a model of several sequences segments cases, not series
    items, skipped = discover_inputs([root], cfg, rules, mirror_root=root if root.is_dir() else root.parent,
                                     progress=progress)
    items = [it for it in items if in_shard(it.key, shard_t)]
    skipped = [s for s in skipped if in_shard(s.key, shard_t)]
    outdir.mkdir(parents=True, exist_ok=True)
    name = "manifest.jsonl" if shard_t is None else f"manifest.shard-{shard_t[0]}-of-{shard_t[1]}.jsonl"
    summary = BatchSummary(outdir, outdir / name)
    extras = {"preview": preview, "statistics": statistics}
    extra_suffixes = [suf for on, suf in ((preview, ".preview.png"), (statistics, ".statistics.json")) if on]
    with _Lock(outdir / f".{name}.lock"):
        _remove_partial_files(outdir, items, summary.manifest)
        manifest = Manifest(summary.manifest)
        for s in skipped:
            prev = manifest.rows.get(s.key)
            if prev is None or prev.get("status") != "skipped" or prev.get("reason") != hide(s.reason, s.path):
                manifest.update({"key": s.key, "input": shown(s.path), "kind": "dicom", "status": "skipped",
                                 "reason": hide(s.reason, s.path), "finished_at": _now()})
            summary.skipped += 1
        todo = []
        for it in items:
            prev = manifest.rows.get(it.key)
            unchanged = prev is not None and prev.get("fingerprint") == fingerprint(it)
            if unchanged and prev.get("status") == "done" and _outputs_complete(prev, outdir, formats, extra_suffixes):
                if on_done is not None and not prev.get("stored"):
                    _finish(manifest, prev, it, on_done, outdir, summary)
                summary.already_done += 1
                continue
            if unchanged and prev.get("status") == "failed" and not retry_failed:
                summary.already_done += 1
                continue
            todo.append(it)
        say(f"{len(items)} series/volume(s) to segment ({summary.already_done} already done), "
            f"{len(skipped)} skipped by rules")
        if not todo:
            _study_table(manifest, outdir, name, statistics)
            summary.seconds = time.perf_counter() - t_start
            return summary
        if engine == "ray":
            from medseg.apps.ray_engine import run_ray
            from medseg.models.loading import model_config

            infos = infos_from_config(model_config(model))  # checks the model before any worker starts
            results = run_ray(todo, model=model, device=device, runtime=runtime, outdir=outdir, formats=formats,
                              anonymize=anonymize, dicom_options=dicom_options, address=ray_address, workers=workers,
                              gpus_per_worker=gpus_per_worker, log=say, extras=extras)
            _merge_results(results, manifest, summary, outdir, on_done, shown, hide, progress, len(todo), infos,
                           formats or sorted({default_format(t) for t in todo}))
            _study_table(manifest, outdir, name, statistics)
            summary.seconds = time.perf_counter() - t_start
            return summary
        predictor = Predictor(model, device=device, **(runtime or {}))
        infos = infos_from_config(predictor.cfg)
        table_formats = formats or sorted({default_format(t) for t in todo})
        with progress_bar("batch", total=len(todo), enabled=progress) as advance:
            for res in run_items(predictor, todo, lambda it: it.mirrored_base(outdir), formats,
                                 dicom_options=dicom_options, anonymize=anonymize, isolate=True, hash_input=True,
                                 **extras):
                _record(res.item, res.record(outdir), manifest, summary, outdir, on_done, shown, hide, infos,
                        table_formats)
                advance(res.item.name)
        _study_table(manifest, outdir, name, statistics)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _merge_results(results, manifest: Manifest, summary: BatchSummary, outdir: Path, on_done, shown, hide,
                   progress: bool, total: int, infos, table_formats: list[str]) -> None:
    """Record ``(item, fields)`` pairs from a distributed engine in the manifest, as the local loop does."""
    from medseg.core.progress import progress_bar

    with progress_bar("batch", total=total, enabled=progress) as advance:
        for it, fields in results:
            _record(it, fields, manifest, summary, outdir, on_done, shown, hide, infos, table_formats)
            advance(it.name)


def _record(it: InputItem, res: dict, manifest: Manifest, summary: BatchSummary, outdir: Path, on_done, shown, hide,
            infos, table_formats: list[str]) -> None:
    """One item's manifest row from its :meth:`~medseg.apps.run.ItemResult.record` (local loop and distributed
    engines alike)."""
    row = {"key": it.key, "input": shown(it.path), "kind": it.kind, "fingerprint": fingerprint(it),
           "load_s": res.get("load_s")}
    # files set aside while reading; each entry starts with file names (two for a duplicate), shown like the inputs
    for key, names in (("duplicates", 2), ("unreadable", 1)):
        entries = res.get(key) or None
        row[key] = entries and [[shown(v, name_only=True) for v in e[:names]] + list(e[names:]) for e in entries]
    err = None
    if res.get("status") == "done":
        rels = res["outputs"]
        row.update(status="done", output=rels[0], outputs=rels, reason=None, input_hash=res.get("input_hash"),
                   predict_s=res.get("predict_s"), write_s=res.get("write_s"))
        try:
            if on_done is not None:
                row.update(on_done(it, [outdir / r for r in rels]))
            summary.done += 1
        except Exception as exc:  # noqa: BLE001 - recorded, the batch goes on
            err = exc
    else:
        err = res.get("reason") or "failed"
    _record_row(row, err, it, manifest, summary, hide, outdir, infos, table_formats)


def _record_row(row: dict, err, it: InputItem, manifest: Manifest, summary: BatchSummary, hide, outdir: Path,
                infos, table_formats: list[str]) -> None:
    """Finish one manifest row (local loop and distributed engines alike): record a failure (an
    exception or a reason string) with the input's path hidden, stamp it, and write the colour
    tables once, after the first labels exist."""
    from medseg.io.writers import write_color_tables

    if err is not None:
        from medseg.apps.run import failure_reason

        reason = hide(failure_reason(err), it.path)
        row.update(status="failed", reason=reason)
        summary.failed += 1
        summary.failures.append((row["input"], reason))
    row["finished_at"] = _now()
    manifest.update(row)
    if summary.done == 1 and row["status"] == "done":
        write_color_tables(outdir, table_formats, infos)


def _finish(manifest: Manifest, row: dict, item: InputItem, on_done, outdir: Path, summary: BatchSummary) -> None:
    """Run ``on_done`` for a series that was written by an earlier run but not completed."""
    written = [outdir / o for o in row.get("outputs") or [row["output"]]]
    try:
        manifest.update({**row, **on_done(item, written), "finished_at": _now()})
    except MedsegError as exc:
        manifest.update({**row, "status": "failed", "reason": str(exc), "finished_at": _now()})
        summary.failed += 1
        summary.failures.append((row["input"], str(exc)))


def _outputs_complete(row: dict, outdir: Path, formats: list[str] | None, extra_suffixes=()) -> bool:
    """Every output of a finished row exists, in every format now asked for (and the previews or statistics
    now asked for)."""
    from medseg.io.writers import FORMATS

    outputs = row.get("outputs") or ([row["output"]] if row.get("output") else [])
    if not outputs or not all((outdir / o).is_file() for o in outputs):
        return False
    if any(not any(o.endswith(suf) for o in outputs) for suf in extra_suffixes):
        return False
    outputs = [o for o in outputs if not o.endswith((".preview.png", ".statistics.json", ".statistics.csv"))]
    if formats:
        have = {next((f for f, suf in sorted(FORMATS.items(), key=lambda kv: -len(kv[1])) if o.endswith(suf)), None)
                for o in outputs}
        return set(formats) <= have
    return True


def _study_table(manifest: "Manifest", outdir: Path, manifest_name: str, statistics: bool) -> None:
    """``statistics.csv`` beside the manifest: the statistics of every finished series (``--statistics``), each
    named as the manifest names it (a token of its path unless paths are recorded)."""
    if not statistics:
        return
    from medseg.evaluation.statistics import write_study_table

    cases = [(row.get("input", key), outdir / o) for key, row in sorted(manifest.rows.items())
             if row.get("status") == "done" for o in row.get("outputs") or [] if o.endswith(".statistics.json")]
    name = manifest_name.replace("manifest", "statistics").replace(".jsonl", ".csv")
    write_study_table(cases, outdir / name)


def _remove_partial_files(outdir: Path, items: list[InputItem], manifest: Path) -> None:
    """Delete temporary files that a killed run left (``.<name>.<random>.part<suffix>``).

    Only this run's own outputs and manifest are considered, so shards sharing an output
    folder never touch each other's files in progress.
    """
    targets = [(outdir / it.output_relpath()).parent / f".{it.name}." for it in items]
    targets.append(manifest.parent / f".{manifest.stem}.")
    for prefix in targets:
        if prefix.parent.is_dir():
            for tmp in prefix.parent.glob(prefix.name + "*.part*"):
                if tmp.is_file():
                    tmp.unlink()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
