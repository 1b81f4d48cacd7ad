"""Training throughput: the path before the fast-training work against today's, side by side, and the
machine's practical limit.

    .venv/bin/python benchmarks/train_throughput.py [--data runs/demo/prep] [--epochs 6] [--base-features 8]
                                                   [--threads 1 2] [--no-ray] [--json OUT.json]

On the training and validation patients of a prepared dataset's split (default: the demo's, `make demo`
makes it), with the same U-Net, loss (PCC), optimiser (Ranger), augmentation and seed:

1. The bare step (one process, one fixed input, forward + backward + optimiser step), for each thread
   count: before (the whole 3 mm grid, every convolution PyTorch's own choice) and now (the region box,
   `ctvlab.unet.conv`'s oneDNN path); GFLOP per step (PyTorch's FLOP counter), GFLOP/s, and the share of
   the practical limit: one large 3D convolution (32→32 channels, 48³, batch 1, oneDNN) on the same cores.
2. The training loop (`ctvlab.unet.loop.run_training` in a `LocalSession`: reading, augmentation, step,
   validation), before and now, `--epochs` epochs from the same seed, one thread: training volumes per
   second (first epoch left out as warm-up), and the validation Tversky (α = 0.02, β = 0.98) at every
   epoch: what is learned in equal epochs.
3. The same loop on Ray Train (one `TorchTrainer` worker, what `ctvlab train` runs): its volumes per
   second, so that Ray's share shows (skip with `--no-ray`).
4. Where a step's time goes (`--profile`): forward, loss, backward and optimiser step timed apart, and
   PyTorch's profiler's self time grouped into convolutions, normalisation and the rest, for the demo
   network and the study's (48 base features), before and now; augmentation and reading per example.

Goal (the project's): now ≥ 3× before in training volumes per second, validation Tversky no worse.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def unet_config(base_features: int, epochs: int, region: str):
    from ctvlab.config import UNetConfig

    cfg = UNetConfig()
    cfg.model.base_features = base_features
    cfg.model.input_region = region
    cfg.loss.name = "pcc"
    cfg.optim.lr = 1e-3
    cfg.train.epochs = epochs
    cfg.train.checkpoint_every = epochs
    return cfg


def path_context(now: bool):
    from ctvlab.unet.conv import aten_only

    return contextlib.nullcontext() if now else aten_only()


def large_conv_gflops(threads: int) -> float:
    """GFLOP/s of one large 3D convolution (forward, oneDNN): the practical limit of these cores."""
    import torch

    torch.set_num_threads(threads)
    x, w = torch.randn(1, 32, 48, 48, 48), torch.randn(32, 32, 3, 3, 3)
    flops = 2 * 32 * 32 * 27 * 48**3
    with torch.no_grad():
        for _ in range(2):
            torch.nn.functional.conv3d(x, w, padding=1)
        t0 = time.perf_counter()
        n = 5
        for _ in range(n):
            torch.nn.functional.conv3d(x, w, padding=1)
    return flops * n / (time.perf_counter() - t0) / 1e9


def fresh_model(cfg, threads: int):
    """(model, optimiser, loss function) built as the training loop builds them, seeded, on `threads`."""
    import torch

    from ctvlab.data.layout import MODALITY_SETS
    from ctvlab.unet.losses import make_loss
    from ctvlab.unet.model import build_unet
    from ctvlab.unet.optim import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_unet(cfg.model, len(MODALITY_SETS[cfg.model.modality_set]))
    return model, build_optimizer(model.parameters(), cfg.optim), make_loss(cfg.loss)


def bare_step(example: dict, cfg, threads: int, now: bool, steps: int = 6) -> tuple[float, float]:
    """(seconds per step, GFLOP per step) of the step alone on one example."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ctvlab.unet.conv import aten_only
    from ctvlab.unet.loop import train_step

    model, optimizer, loss_fn = fresh_model(cfg, threads)
    device = torch.device("cpu")
    with aten_only(), FlopCounterMode(display=False) as counter:  # count with ATen's ops: the same maths
        train_step(model, optimizer, loss_fn, [example], 0, device, "off")
    times = []
    with path_context(now):
        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(model, optimizer, loss_fn, [example], 0, device, "off")
            times.append(time.perf_counter() - t0)
    return float(np.median(times[2:])), counter.get_total_flops() / 1e9


def profile_step(example: dict, cfg, threads: int, now: bool, steps: int = 3) -> dict[str, float]:
    """Seconds per step of each phase and of each kind of operator (profiler self time), on one example."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ctvlab.unet.batches import batch_to_tensors, loss_extras

    model, optimizer, loss_fn = fresh_model(cfg, threads)
    device = torch.device("cpu")
    x, y, brain = batch_to_tensors([example], device)
    extras = loss_extras([example], device)
    phases = {"forward": 0.0, "loss": 0.0, "backward": 0.0, "optimiser": 0.0}

    def step(record: bool):
        t = [time.perf_counter()]
        logits = model(x)
        t.append(time.perf_counter())
        loss = loss_fn(logits, y, brain, 0, **extras)
        t.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        optimizer.step()
        t.append(time.perf_counter())
        if record:
            for k, a, b in zip(phases, t, t[1:], strict=False):
                phases[k] += (b - a) / steps

    with path_context(now):
        step(False)
        for _ in range(steps):
            step(True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(False)
    kinds = {"convolutions": 0.0, "normalisation": 0.0, "other operators": 0.0}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        name = e.key.lower()
        kind = "convolutions" if "conv" in name else "normalisation" if "norm" in name else "other operators"
        kinds[kind] += e.self_cpu_time_total / 1e6 / steps
    return {**phases, **kinds}


def training_loop(prep: Path, train_ids, val_ids, cfg, view: dict, now: bool) -> list[dict]:
    """Every epoch's metrics of `run_training` in one process, one thread."""
    from ctvlab.unet.loop import LocalSession, load_examples, run_training

    train = load_examples(prep, train_ids, cfg.model.modality_set, view)
    val = load_examples(prep, val_ids, cfg.model.modality_set, view)
    config = {"unet": cfg.model_dump(mode="json"), "view": view, "threads_per_worker": 1}
    with path_context(now):
        return run_training(config, LocalSession(train, val, lambda m, c: None))


def ray_train(prep: Path, train_ids, val_ids, cfg) -> list[dict]:
    from ctvlab.runtime import init_ray
    from ctvlab.unet.trainer import build_trainer, checkpoint_history

    init_ray()
    with tempfile.TemporaryDirectory() as storage:
        trainer = build_trainer(prep, cfg, train_ids, val_ids, storage_path=storage, run_name="bench")
        return checkpoint_history(trainer.fit())


def volumes_per_second(history: list[dict]) -> float:
    rows = history[1:] or history
    return sum(h["train_volumes"] for h in rows) / sum(h["train_seconds"] for h in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("runs/demo/prep"), help="prepared dataset with a split")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--base-features", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-ray", action="store_true", help="leave out the Ray Train row")
    ap.add_argument(
        "--profile", action="store_true", help="where a step's time goes (demo and study network)"
    )
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    ap.add_argument(
        "--record", action="store_true", help="also write the output to docs/results/train_throughput.md"
    )
    args = ap.parse_args()
    from record import recorded

    with recorded("train_throughput", args.record):
        run(args)


def run(args) -> None:

    from ctvlab.splits import load_split
    from ctvlab.unet.loop import load_examples
    from ctvlab.unet.trainer import run_view

    prep = args.data.resolve()
    if not (prep / "splits.json").exists():
        raise SystemExit(f"{prep}: no prepared dataset with a split; run `make demo` or pass --data PREP")
    split = load_split(prep)
    train_ids, val_ids = split.patients("train"), split.patients("val")
    before = unet_config(args.base_features, args.epochs, "grid")
    now = unet_config(args.base_features, args.epochs, "ring")
    view_before = run_view(prep, before, train_ids, val_ids)
    view_now = run_view(prep, now, train_ids, val_ids)
    print(f"{len(train_ids)} training and {len(val_ids)} validation volumes; base features {args.base_features}; "
          f"input grid before {tuple(view_before['input_shape'])}, now {tuple(view_now['input_shape'])} "
          f"(the region box); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    out: dict = {"base_features": args.base_features, "epochs": args.epochs, "n_train": len(train_ids),
                 "grid_before": view_before["input_shape"], "grid_now": view_now["input_shape"], "steps": []}  # fmt: skip

    ex_before = load_examples(prep, train_ids[:1], "all", view_before)[0]
    ex_now = load_examples(prep, train_ids[:1], "all", view_now)[0]
    print("\n1. the bare step (one fixed example)")
    print(
        f"{'threads':>7}  {'path':<7} {'s/step':>7} {'GFLOP':>6} {'GFLOP/s':>8} {'limit':>7} {'share':>6} {'speed-up':>8}"
    )
    for threads in args.threads:
        limit = large_conv_gflops(threads)
        t_b, f_b = bare_step(ex_before, before, threads, now=False)
        t_n, f_n = bare_step(ex_now, now, threads, now=True)
        for name, t, f in (("before", t_b, f_b), ("now", t_n, f_n)):
            print(f"{threads:>7}  {name:<7} {t:7.3f} {f:6.2f} {f / t:8.1f} {limit:7.1f} {f / t / limit:6.0%} "
                  f"{t_b / t:7.2f}×")  # fmt: skip
        out["steps"].append({"threads": threads, "limit_gflops": limit, "before_s": t_b, "before_gflop": f_b,
                             "now_s": t_n, "now_gflop": f_n})  # fmt: skip

    print(f"\n2. the training loop, {args.epochs} epochs, one thread (validation every epoch)")
    h_before = training_loop(prep, train_ids, val_ids, before, view_before, now=False)
    h_now = training_loop(prep, train_ids, val_ids, now, view_now, now=True)
    v_b, v_n = volumes_per_second(h_before), volumes_per_second(h_now)
    print(f"before: {v_b:.3f} volumes/s   now: {v_n:.3f} volumes/s   →  {v_n / v_b:.2f}× (goal ≥ 3×)")
    print("val Tversky by epoch   before: " + " ".join(f"{h['val_tversky']:.3f}" for h in h_before))
    print("                       now:    " + " ".join(f"{h['val_tversky']:.3f}" for h in h_now))
    best_b, best_n = max(h["val_tversky"] for h in h_before), max(h["val_tversky"] for h in h_now)
    print(
        f"best val Tversky in {args.epochs} epochs: before {best_b:.3f}, now {best_n:.3f} ({best_n - best_b:+.3f})"
    )
    out["loop"] = {"before_vps": v_b, "now_vps": v_n, "before_val_tversky": [h["val_tversky"] for h in h_before],
                   "now_val_tversky": [h["val_tversky"] for h in h_now],
                   "before_epoch_s": [h["epoch_seconds"] for h in h_before],
                   "now_epoch_s": [h["epoch_seconds"] for h in h_now]}  # fmt: skip

    if not args.no_ray:
        print("\n3. the same loop (now) on Ray Train, one worker of one CPU")
        v_r = volumes_per_second(ray_train(prep, train_ids, val_ids, now))
        print(f"Ray Train: {v_r:.3f} volumes/s  ({v_r / v_n:.2f} × the plain loop; {v_r / v_b:.2f}× before)")
        out["ray_vps"] = v_r
    if args.profile:
        print(
            "\n4. where a step's time goes (seconds per step, 1 thread; profiler self time by operator kind)"
        )
        from ctvlab.unet.augment import build_augmentation

        augment = build_augmentation(now.augment, seed=0)
        t0 = time.perf_counter()
        for _ in range(20):
            augment({k: ex_now[k] for k in ("image", "label", "brain")})
        t_aug = (time.perf_counter() - t0) / 20
        t0 = time.perf_counter()
        load_examples(prep, train_ids[:8], "all", view_now)
        t_read = (time.perf_counter() - t0) / 8
        print(f"augmentation {t_aug:.3f} s per example (region box); reading and preparing {t_read:.3f} s per "
              "patient (once per run: the examples stay in memory or in Ray's object store)")  # fmt: skip
        out["profile"] = {"augment_s": t_aug, "read_s": t_read}
        cols = (
            "forward",
            "loss",
            "backward",
            "optimiser",
            "convolutions",
            "normalisation",
            "other operators",
        )
        print(f"{'network':<10}{'path':<7}" + "".join(f"{c:>16}" for c in cols))
        for features in (args.base_features, 48):
            for name, now_path, view, ex in (
                ("before", False, view_before, ex_before),
                ("now", True, view_now, ex_now),
            ):
                cfg = unet_config(features, 1, view["input_region"])
                prof = profile_step(ex, cfg, 1, now_path)
                print(f"{features:<2} feat.  {name:<7}" + "".join(f"{prof[c]:16.3f}" for c in cols))
                out["profile"][f"{features}_{name}"] = prof
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
