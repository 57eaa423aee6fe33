"""``medseg batch --engine ray``: segment an archive with a pool of Ray actors.

Each actor loads the model once (one :class:`~medseg.inference.predictor.Predictor` per
actor) and segments whole series: it reads the input, predicts and writes the outputs
itself, then returns a small result (status, output paths, timings, input hash). The driver
merges the results into the manifest as they arrive, so resuming, failure isolation and the
manifest format are exactly those of the local batch. Inputs, outputs and the model file
must be on a file system every Ray node can see (the usual set-up of a cluster with a
shared or network file system).

Ray is optional (``pip install 'medseg[ray]'``); it is imported only when this engine runs.
"""

from __future__ import annotations

from pathlib import Path

from medseg.core.errors import MedsegError, MissingDependencyError


def import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("Ray is not installed", expected="the ray package for --engine ray",
                                     fix="pip install 'medseg[ray]' (or pip install ray), or use --engine local "
                                         "(and --shard I/N for job arrays)") from None
    return ray


class SegmentWorker:
    """One model per actor; ``run(item)`` segments one series and writes its outputs."""

    def __init__(self, model, device: str, runtime: dict, outdir: str, formats, anonymize: bool,
                 dicom_options: dict, threads: int | None, extras: dict | None = None) -> None:
        import torch

        from medseg.inference.predictor import Predictor

        if threads:
            torch.set_num_threads(int(threads))
        runtime = dict(runtime or {})
        runtime.setdefault("threads", threads)
        self.predictor = Predictor(model, device=device, **runtime)
        self.outdir = Path(outdir)
        self.formats = formats
        self.anonymize = anonymize
        self.dicom_options = dict(dicom_options or {})
        self.extras = dict(extras or {})  # run_one's preview / statistics

    def ready(self) -> bool:
        return True

    def run(self, item) -> dict:
        """Segment one item through the run loop; its manifest fields (never raises for bad input)."""
        from medseg.apps.run import run_one

        res = run_one(self.predictor, item, item.mirrored_base(self.outdir), self.formats,
                      dicom_options=self.dicom_options, anonymize=self.anonymize, isolate=True, hash_input=True,
                      **self.extras)
        return res.record(self.outdir)


def run_ray(todo: list, *, model, device: str, runtime: dict | None, outdir: Path, formats, anonymize: bool,
            dicom_options: dict | None, address: str | None = None, workers: int | None = None,
            cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, log=None, extras: dict | None = None):
    """Yield ``(item, result)`` as Ray actors finish items (any order)."""
    ray = import_ray()
    say = log or (lambda msg: None)
    started = False
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {}
        try:
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            from medseg.core.errors import ConfigError

            raise ConfigError("cannot connect to the Ray cluster", path=None, expected="a running Ray cluster",
                              found=f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                              fix="start one with 'ray start --head' (or give --ray-address), or use --engine local")\
                from None
        started = True
    try:
        cpus = float(ray.available_resources().get("CPU", 1.0))
        n = int(workers or max(1, int(cpus // max(cpus_per_worker, 1e-3))))
        n = max(1, min(n, len(todo)))
        threads = max(1, int(cpus_per_worker))
        actor_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(SegmentWorker)
        actors = [actor_cls.remote(str(model) if model is not None else None, device, runtime or {}, str(outdir),
                                   formats, anonymize, dicom_options or {}, threads, extras) for _ in range(n)]
        say(f"ray: {n} worker(s), {cpus_per_worker:g} CPU{' + %g GPU' % gpus_per_worker if gpus_per_worker else ''} each")
        queue = list(range(len(todo)))
        pending: dict = {}

        def submit(actor) -> None:
            if queue:
                idx = queue.pop(0)
                pending[actor.run.remote(todo[idx])] = (actor, idx)

        for actor in actors:  # two in flight per actor: the next item waits in the actor's queue
            submit(actor)
            submit(actor)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor, idx = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a crashed actor fails its item, not the batch
                cause = getattr(exc, "cause", None) or exc
                if isinstance(cause, MedsegError):
                    raise cause from None  # e.g. the model cannot be loaded: same for every item
                result = {"status": "failed", "reason": f"worker error: {type(cause).__name__}: "
                                                        f"{str(cause).splitlines()[0][:300] if str(cause) else ''}"}
            yield todo[idx], result
            submit(actor)
        for actor in actors:
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
