"""Training throughput: Ray Train with Ray Data shards against a plain PyTorch loop, and the data path's cost.

    .venv/bin/python benchmarks/train_throughput.py [--data runs/demo/prep] [--epochs 4] [--base-features 8]
                                                   [--threads 1] [--use-gpu] [--mixed-precision bf16|off]

On the training patients of a prepared dataset's split (default: the demo's, `make demo` makes it), with
the same U-Net, loss (PCC), optimiser (Ranger) and augmentation:

(a) Ray Train: one `TorchTrainer` worker (`ctvlab.unet.train.build_trainer`, exactly what `ctvlab train`
    runs) fed by its Ray Data shard; volumes per second from the workers' own per-epoch training time
    (`train_seconds`: the loop over the shard, validation excluded);
(b) the plain loop: one process reads the same `.npy` files with NumPy, prepares and augments each
    example with the same functions, and trains; timed the same way;
(c) the plain loop on one dummy input already on the device (no reading, no preparing, no augmenting):
    the step alone. The data path's share of a step is 1 − (c)/(b) (nnU-Net's check of its loader).

The first epoch of each is warm-up and not counted. Both use `--threads` intra-op threads (Ray Train's
worker gets as many CPUs). Goals: (a) ≥ 0.85 × (b) on CPU; data path < 10% of a step.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np


def plain_loop(prep: Path, ids: list[str], cfg, shape, epochs: int, device, dummy: bool) -> list[float]:
    """Seconds per epoch of a plain PyTorch loop (one process), real or dummy inputs."""
    import torch

    from ctvlab.data.layout import MODALITY_SETS
    from ctvlab.data.readers import load_patient
    from ctvlab.unet.augment import build_augmentation
    from ctvlab.unet.batches import autocast_context, batch_to_tensors, prepare_row
    from ctvlab.unet.losses import make_loss
    from ctvlab.unet.model import build_unet
    from ctvlab.unet.optim import build_optimizer

    torch.manual_seed(0)
    model = build_unet(cfg.model, len(MODALITY_SETS[cfg.model.modality_set])).to(device)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    loss_fn = make_loss(cfg.loss)
    fixed = None
    if dummy:
        p = load_patient(prep, ids[0])
        ex = prepare_row({"patient_id": ids[0], "features": p.features, "masks": p.masks},
                         cfg.model.modality_set, shape)  # fmt: skip
        fixed = batch_to_tensors([ex], device)
    times = []
    rng = random.Random(0)
    for epoch in range(epochs):
        order = list(ids)
        rng.shuffle(order)
        augment = build_augmentation(cfg.augment, seed=epoch)
        t0 = time.perf_counter()
        for pid in order:
            if dummy:
                x, y, brain = fixed
            else:
                p = load_patient(prep, pid)
                ex = prepare_row({"patient_id": pid, "features": p.features, "masks": p.masks},
                                 cfg.model.modality_set, shape)  # fmt: skip
                x, y, brain = batch_to_tensors([augment(ex)], device)
            with autocast_context(device, cfg.train.mixed_precision):
                logits = model(x)
            loss = loss_fn(logits.float(), y, brain, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def ray_train(prep: Path, train_ids: list[str], val_ids: list[str], cfg) -> list[dict]:
    """Per-epoch metrics reported by the Ray Train worker (one worker, its Ray Data shard)."""
    from ctvlab.runtime import init_ray
    from ctvlab.stages.train import _history
    from ctvlab.unet.train import build_trainer

    init_ray()
    with tempfile.TemporaryDirectory() as storage:
        trainer = build_trainer(prep, cfg, train_ids, val_ids, storage_path=storage, run_name="bench")
        return _history(trainer.fit())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("runs/demo/prep"), help="prepared dataset with a split")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--base-features", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "bf16", "off"])
    args = ap.parse_args()

    import torch

    from ctvlab.config import UNetConfig
    from ctvlab.splits import load_split
    from ctvlab.unet.batches import input_shape

    if not (args.data / "splits.json").exists():
        raise SystemExit(
            f"{args.data}: no prepared dataset with a split; run `make demo` or pass --data PREP"
        )
    split = load_split(args.data)
    train_ids, val_ids = split.patients("train"), split.patients("val")
    cfg = UNetConfig()
    cfg.model.base_features = args.base_features
    cfg.loss.name = "pcc"
    cfg.train.epochs = args.epochs
    cfg.train.checkpoint_every = args.epochs
    cfg.train.val_every = args.epochs
    cfg.train.cpus_per_worker = args.threads
    cfg.train.use_gpu = args.use_gpu
    cfg.train.mixed_precision = args.mixed_precision
    shape = input_shape(args.data)
    device = torch.device("cuda" if args.use_gpu else "cpu")
    torch.set_num_threads(args.threads)
    n = len(train_ids)
    print(f"{n} training volumes of {tuple(shape)}, base features {args.base_features}, {args.threads} "
          f"thread(s), {device}, {args.epochs} epochs (first is warm-up), load average {os.getloadavg()[0]:.2f}")  # fmt: skip

    hist = ray_train(args.data, train_ids, val_ids, cfg)
    ray_s = [h["train_seconds"] for h in hist[1:]]
    ray_vols = [h["train_volumes"] for h in hist[1:]]
    ray_vps = sum(ray_vols) / sum(ray_s)
    real = plain_loop(args.data, train_ids, cfg, shape, args.epochs, device, dummy=False)[1:]
    dummy = plain_loop(args.data, train_ids, cfg, shape, args.epochs, device, dummy=True)[1:]
    plain_vps = n * len(real) / sum(real)
    dummy_vps = n * len(dummy) / sum(dummy)
    share = 1 - dummy_vps**-1 / plain_vps**-1
    print(
        f"(a) Ray Train + Ray Data shard : {ray_vps:6.3f} volumes/s  ({np.mean(ray_s) / np.mean(ray_vols):.3f} s/step)"
    )
    print(f"(b) plain PyTorch loop         : {plain_vps:6.3f} volumes/s  ({1 / plain_vps:.3f} s/step)")
    print(f"(c) plain loop, dummy input    : {dummy_vps:6.3f} volumes/s  ({1 / dummy_vps:.3f} s/step)")
    print(f"Ray Train / plain loop          : {ray_vps / plain_vps:.3f}   (goal ≥ 0.85)")
    print(f"data path share of a step       : {100 * share:.1f}%  (goal < 10%)")
    if device.type == "cuda":
        print(f"peak GPU memory (plain loop)   : {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
