"""Cross-validate a config on one GPU, the K folds training side by side, sized to a time budget.

    python benchmarks/gpu_cv.py CONFIG [--folds 5] [--budget-s 360] [--set KEY=VALUE ...]

1. Probe: K processes (as many as there will be folds, started together) each time training steps of
   the config's model on random batches of the config's patch and batch size, fp32 and AMP. The
   faster precision is kept.
2. ``train.epochs`` = budget / (step time under that contention x steps per epoch), at most
   ``--max-epochs``; validation every quarter of the run, ``last.pt`` every 25th. The learning-rate schedule then ends exactly at the last epoch; the epochs used
   are saved in every checkpoint's config, so ``--set train.epochs=N`` repeats the run anywhere.
3. The K folds train side by side (``medseg train CONFIG --folds K --fold I``), each logging to
   ``OUTPUT_DIR/fold_I.log``; each predicts its held-out cases when done.
4. ``medseg train CONFIG --folds K`` pools the out-of-fold Dice into ``OUTPUT_DIR/cv_summary.json``.

A hard deadline (``--deadline-s``, from the start of this script) stops folds still running; each can
be finished later with ``medseg train CONFIG --folds K --fold I --resume``. The figures (probe, epochs,
wall time per fold, pooled Dice) are printed and written to ``OUTPUT_DIR/gpu_cv.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _sets(values: list[str]) -> list[str]:
    return [x for s in values for x in ("--set", s)]


def probe(config: str, sets: list[str], barrier: Path, world: int, steps: int) -> dict:
    """Seconds per training step, fp32 and AMP, once ``world`` probes are all warmed up."""
    import torch

    from medseg.core.config import load_config
    from medseg.core.runtime import resolve_device
    from medseg.models.registry import build_model, get_spec
    from medseg.training.trainer import EMA, _loss, make_optimizer, speed_settings, supervised_loss, train_step

    cfg = load_config(config, sets)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    fmt = speed_settings(device, cfg.train, get_spec(cfg.model.name).dims) or torch.contiguous_format
    model = build_model(cfg.model, 1, cfg.num_classes).to(device)
    model.to(memory_format=fmt)
    model.train()
    loss_fn = _loss(cfg)
    opt = make_optimizer(model, cfg.train)  # the config's optimizer: SGD and AdamW steps cost differently
    shape = (cfg.train.batch_size, 1, *cfg.patch.size)
    x = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, cfg.num_classes, (shape[0], 1, *shape[2:]), device=device).float()
    ema = EMA(model, cfg.train.ema) if cfg.train.ema else None  # before any forward: DynUNet keeps its heads' outputs
    out = {}
    for amp in (False, True):
        if amp and device.type != "cuda":
            continue
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        def step():
            train_step(model, opt, scaler, device, amp, lambda: supervised_loss(loss_fn, model(x), y))
            if ema is not None:
                ema.update(model)
        for _ in range(5):
            step()
        # wait for the other probes, so the timed steps share the device as the folds will
        (barrier / f"{os.getpid()}-{amp}").touch()
        t_wait = time.time() + 300
        while len(list(barrier.glob(f"*-{amp}"))) < world and time.time() < t_wait:
            time.sleep(0.05)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        out["amp" if amp else "fp32"] = (time.perf_counter() - t0) / steps
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=360.0, help="training time per fold, all folds side by side")
    ap.add_argument("--deadline-s", type=float, default=0.0, help="stop folds still running after this (0: never)")
    ap.add_argument("--max-epochs", type=int, default=1000)
    ap.add_argument("--probe-steps", type=int, default=20)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # one probe process
    ap.add_argument("--barrier", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.config, args.sets, Path(args.barrier), args.folds, args.probe_steps)))
        return 0

    t_start = time.time()
    from medseg.core.config import load_config
    from medseg.preprocessing.datasets import kfold_split, training_pool

    cfg = load_config(args.config, args.sets)
    base = Path(cfg.train.output_dir)
    base.mkdir(parents=True, exist_ok=True)
    n_train = min(len(kfold_split(training_pool(cfg.data), args.folds, f, cfg.data.seed)[0]) for f in range(args.folds))
    steps_per_epoch = max(1, n_train // cfg.train.batch_size)

    barrier = base / ".probe"
    barrier.mkdir(exist_ok=True)
    for f in barrier.iterdir():
        f.unlink()
    me = [sys.executable, str(Path(__file__).resolve()), args.config, "--folds", str(args.folds),
          "--probe-steps", str(args.probe_steps), *_sets(args.sets)]
    procs = [subprocess.Popen([*me, "--probe", "--barrier", str(barrier)], stdout=subprocess.PIPE, text=True)
             for _ in range(args.folds)]
    probes = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    for f in barrier.iterdir():
        f.unlink()
    barrier.rmdir()
    step = {k: max(p[k] for p in probes) for k in probes[0]}
    amp = step.get("amp", float("inf")) < step["fp32"]
    t_step = min(step.values())
    epochs = max(1, min(args.max_epochs, int(args.budget_s / (t_step * steps_per_epoch))))
    print(f"probe ({args.folds} side by side): " + ", ".join(f"{k} {v * 1000:.1f} ms/step" for k, v in step.items())
          + f"; {'AMP' if amp else 'fp32'}; {steps_per_epoch} steps per epoch -> {epochs} epochs", flush=True)

    # a few validations (learning curve only under train.keep: last) and checkpoints per run: with
    # epochs of a second or less, validating or writing last.pt every epoch would cost more than training
    sets = [*args.sets, f"train.epochs={epochs}", f"train.amp={str(amp).lower()}",
            f"train.val_every={max(1, epochs // 4)}", f"train.checkpoint_every={max(1, epochs // 25)}"]
    cli = [sys.executable, "-m", "medseg", "train", args.config, "--folds", str(args.folds), *_sets(sets)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    t_train = time.time()
    runs = {}
    for f in range(args.folds):
        log = open(base / f"fold_{f}.log", "w")
        runs[f] = (subprocess.Popen([*cli, "--fold", str(f)], stdout=log, stderr=subprocess.STDOUT, env=env), log)
    wall, stopped = {}, []
    while len(wall) + len(stopped) < len(runs):
        for f, (p, log) in runs.items():
            if f in wall or f in stopped:
                continue
            if p.poll() is not None:
                wall[f] = round(time.time() - t_train, 1)
                log.close()
                print(f"fold {f}: exit {p.returncode} after {wall[f]:.0f} s", flush=True)
            elif args.deadline_s and time.time() - t_start > args.deadline_s:
                p.terminate()
                p.wait()
                stopped.append(f)
                print(f"fold {f}: stopped at the deadline; finish it with --fold {f} --resume", flush=True)
        time.sleep(1)
    summary = None
    if not stopped:
        res = subprocess.run(cli, capture_output=True, text=True, env=env)
        print(res.stdout[-3000:], res.stderr[-3000:] if res.returncode else "", flush=True)
        summary_path = base / "cv_summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    record = {"config": args.config, "sets": sets, "folds": args.folds, "probe_s_per_step": step, "amp": amp,
              "steps_per_epoch": steps_per_epoch, "epochs": epochs, "fold_wall_s": wall, "stopped": stopped,
              "total_s": round(time.time() - t_start, 1), "cv_summary": summary}
    (base / "gpu_cv.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "cv_summary"}, indent=1))
    if summary:
        print("pooled out-of-fold Dice:", summary["pooled_dice"])
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
