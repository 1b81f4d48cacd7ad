"""The GPU path checked on one CUDA machine that has PyTorch and nothing else of ctvlab's: no Ray, no MLflow,
no MONAI, no pydantic, no network.

    make gpu-bundle                              # here, once: wheels + prepared patients into .gpu-bundle/
    bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
    python3 benchmarks/gpu_check.py [--bundle .gpu-bundle] [--out DIR] [--device cuda|cpu] [--quick]

The bundle (`--build-bundle DIR`, what `make gpu-bundle` runs) holds the wheels of the two pure-Python
libraries ctvlab's training code needs and a GPU image lacks (MONAI for augmentation, pydantic for the
configuration, with pydantic's four small dependencies), for Python 3.12 on manylinux x86_64 at the versions
of constraints.txt, and a few synthetic patients prepared here (`ctvlab synth`, `ctvlab preprocess`), their
volume files deflated byte for byte, so that `ctvlab.data.readers.load_patient` verifies them against
their sidecars' sha256 on the node. The check installs the wheels with `pip install --no-index --no-deps
--target` into a temporary folder, rebuilds the prepared dataset in another, and imports ctvlab's own
functions, the ones the Ray Train workers and the search's trials run (`ctvlab.unet.loop`): no copies.

What it checks (exit 1 when one fails; 2 when it cannot start):
- no Ray or MLflow module was imported by the time it ends;
- on CUDA, `ctvlab.unet.conv`'s oneDNN path stays out of the way (on CPU: it is taken, so the parity
  below compares two different kernels);
- fp32 parity: the same weights and batch give a loss and gradients on the device within `LOSS_ATOL` and
  `GRAD_RTOL` of the CPU's (TF32 off; on `--device cpu` the reference is PyTorch's own CPU kernels);
- bf16 training: a few hundred steps of `run_training` (a `LocalSession`) on the sent patients lower the
  training loss by at least `LOSS_DROP`;
- the weights it trained load and predict in a process that sees no GPU (`CUDA_VISIBLE_DEVICES=`);
- inference parity: `predict_arrays` on the device gives the CPU's probability map within `PROB_MEAN_ATOL`
  and the same model CTV (`ctvlab.ctv.construct.model_ctv`, Dice ≥ `CTV_DICE_MIN`).

What it measures, for the study's network (48 base features, six channels; the 3 mm full-brain grid,
region "grid", and the default "ring" region as rows of their own) with bf16 autocast and fp32, batch 1
and 2: volumes per second of the loop as `run_training` runs it (augmentation, then `train_step`) and of
the step alone, step time, peak GPU memory, the GPU's busy share of an iteration (CUDA events around the
step against wall time; and the kernels' own time from the profiler) and the data path's share (the
augmentation on the CPU). Channels-last, cuDNN autotuning and `torch.compile` are rows of their own, run
while the time budget allows. Results go to `--out` (default `$OUT`, else runs/gpu-check): gpu_check.json
and gpu_check.md, written after each part so that a run cut short keeps what it measured.

`--device cpu --quick` runs every part with an 8-feature network and a few steps: the test suite runs it
in a process where importing Ray or MLflow fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import json
import math
import os
import platform as std_platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / ".gpu-bundle"
BUNDLE_FORMAT = 1
# The node's Python and platform: the reference GPU image runs Python 3.12 on manylinux x86_64. Its PyTorch
# wheel needs glibc 2.28, so wheels for manylinux_2_28 (and the older manylinux2014) fit it.
WHEEL_PYTHON = "3.12"
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
# What ctvlab's training code imports that a PyTorch image lacks: MONAI (augmentation) and pydantic
# (configuration) with its dependencies. Versions come from constraints.txt.
WHEELS = ("monai", "pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions")
NEEDED_MODULES = ("monai", "pydantic")
FORBIDDEN = ("ray", "mlflow")
UPLOAD_LIMIT_MIB = 64

# Tolerances of the checks.
LOSS_ATOL = 1e-4  # fp32 loss (a PCC loss in [0, 1]), device against CPU
GRAD_RTOL = 1e-3  # each gradient tensor: |Δg| ≤ GRAD_RTOL·|g| + GRAD_ATOL_SHARE·|all gradients| (L2 norms)
GRAD_ATOL_SHARE = 1e-5  # tensors with almost no gradient (biases ahead of an instance norm) need a floor
LOSS_DROP = 0.10  # the last fifth of the bf16 epochs' training loss ≤ 90% of the first fifth's
PROB_MEAN_ATOL = 0.01  # mean |Δp| over the brain, bf16 on the device against fp32 on the CPU
PROB_VOXEL_ATOL, PROB_VOXEL_SHARE = 0.05, 0.01  # at most 1% of brain voxels differ by more than 0.05
CTV_DICE_MIN = 0.99
# Ranger's own default: the study's 5e-5 is for 150 epochs of 101 patients; a few hundred steps need more
# to show the loss going down.
TRAIN_LR = 1e-3


class SetupError(RuntimeError):
    """The check cannot start: no bundle, no CUDA device, wheels that do not fit this Python."""


# --- the bundle ----------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    """The file's sha256, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder` (bytes)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def pinned_versions(names: Sequence[str], constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """{name: version} of `names` in constraints.txt (names compared case- and separator-blind).

    Raises:
        SetupError: a name is not pinned there.
    """

    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    pins = {}
    for line in constraints.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[norm(name.strip())] = version.strip()
    missing = [n for n in names if norm(n) not in pins]
    if missing:
        raise SetupError(f"{constraints} pins no version of {missing}; run `make constraints`")
    return {n: pins[norm(n)] for n in names}


def download_wheels(dest: Path, python_version: str = WHEEL_PYTHON) -> list[Path]:
    """Download the `WHEELS` at their pinned versions for `python_version` on manylinux x86_64 (no deps:
    the node has numpy and torch, and the list is complete for the rest)."""
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    specs = [f"{n}=={v}" for n, v in pinned_versions(WHEELS).items()]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi,
           *(a for p in WHEEL_PLATFORMS for a in ("--platform", p)), "--dest", str(dest), *specs]  # fmt: skip
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def pack_patients(
    prep: Path,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    dest: Path,
    python_version: str = WHEEL_PYTHON,
) -> None:
    """Write prepared patients into a bundle folder: `patients/<id>.npz` holds the patient's two volume files
    as they are (deflated; an .npz is a zip of .npy files), `patients/<id>.json` its sidecar, and
    `dataset.json` the dataset's. Unpacked, the files are byte for byte the prepared ones."""
    from ctvlab.data.layout import PrepPaths

    paths = PrepPaths(prep)
    out = dest / "patients"
    out.mkdir(parents=True, exist_ok=True)
    for pid in [*train_ids, *val_ids]:
        with zipfile.ZipFile(out / f"{pid}.npz", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            z.write(paths.features(pid), "features.npy")
            z.write(paths.masks(pid), "masks.npy")
        shutil.copyfile(paths.sidecar(pid), out / f"{pid}.json")
    shutil.copyfile(paths.dataset_json, dest / "dataset.json")
    write_manifest(dest, {"train": list(train_ids), "val": list(val_ids)}, python_version)


def write_manifest(dest: Path, patients: dict[str, list[str]], python_version: str = WHEEL_PYTHON) -> None:
    """bundle.json: the patients' split and the sha256 of every file, which the check verifies first."""
    files = {
        str(p.relative_to(dest)): sha256(p)
        for p in sorted(dest.rglob("*"))
        if p.is_file() and p.name != "bundle.json"
    }
    import ctvlab

    manifest = {"format": BUNDLE_FORMAT, "ctvlab_version": ctvlab.__version__, "patients": patients,
                "python": python_version, "platforms": list(WHEEL_PLATFORMS), "files": files}  # fmt: skip
    (dest / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")


def build_bundle(
    dest: Path, n_patients: int, seed: int, wheels: bool = True, python_version: str = WHEEL_PYTHON
) -> int:
    """`make gpu-bundle`: synthesise and prepare `n_patients` (a third for validation), pack them, download
    the wheels; returns the bundle's size in bytes."""
    from ctvlab.config import PreprocessConfig, SynthConfig
    from ctvlab.preprocess.ray_pipeline import preprocess_cohort
    from ctvlab.synth.cohort import generate_cohort

    if n_patients < 2:
        raise SetupError("the bundle needs at least 2 patients (one for training, one for validation)")
    if dest.exists():
        if any(dest.iterdir()) and not (dest / "bundle.json").is_file():
            raise SetupError(f"{dest} exists and is not a GPU bundle: choose another folder")
        shutil.rmtree(dest)  # a previous bundle: rebuilt from scratch
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        cohort, prep = Path(tmp) / "cohort", Path(tmp) / "prep"
        # One worker: the cohort is small, and a process pool would need memory this step does not.
        generate_cohort(cohort, SynthConfig(n_patients=n_patients, seed=seed, num_workers=1), progress=False)
        report = preprocess_cohort(cohort, prep, PreprocessConfig(), progress=False, engine="serial")
        if not report.ok:
            raise SetupError(f"preprocessing the bundle's patients failed: {report}")
        ids = sorted(p["patient_id"] for p in json.loads((prep / "dataset.json").read_text())["patients"])
        n_val = max(1, len(ids) // 3)
        if wheels:
            download_wheels(dest / "wheels", python_version)
        pack_patients(prep, ids[:-n_val], ids[-n_val:], dest, python_version)
    return folder_bytes(dest)


def size_line(dest: Path) -> str:
    """The bundle's size, by part, against the node's upload limit."""
    mib = 2**20
    total = folder_bytes(dest) / mib
    wheels = folder_bytes(dest / "wheels") / mib if (dest / "wheels").is_dir() else 0.0
    n = len(list((dest / "patients").glob("*.npz")))
    return (f"gpu bundle {dest}: {total:.1f} MiB (wheels {wheels:.1f} MiB, {n} patients "
            f"{total - wheels:.1f} MiB); the node's upload limit is {UPLOAD_LIMIT_MIB} MiB with the code")  # fmt: skip


def verify_bundle(bundle: Path) -> dict[str, Any]:
    """bundle.json, after checking every file it lists (a partial upload fails here, clearly).

    Raises:
        SetupError: no bundle, another format, or a file missing or changed.
    """
    try:
        manifest = json.loads((bundle / "bundle.json").read_text())
    except FileNotFoundError:
        raise SetupError(
            f"no GPU bundle at {bundle}: run `make gpu-bundle` and send the folder along"
        ) from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise SetupError(f"{bundle} has bundle format {manifest.get('format')}, this check reads "
                         f"{BUNDLE_FORMAT}: run `make gpu-bundle` again")  # fmt: skip
    bad = [name for name, digest in manifest["files"].items()
           if not (bundle / name).is_file() or sha256(bundle / name) != digest]  # fmt: skip
    if bad:
        raise SetupError(f"{bundle}: {len(bad)} file(s) missing or changed since `make gpu-bundle` "
                         f"(first: {bad[0]}); send the whole folder again")  # fmt: skip
    return manifest


def unpack_patients(bundle: Path, prep: Path) -> tuple[list[str], list[str]]:
    """Rebuild the bundle's prepared dataset in `prep`; returns (train ids, val ids)."""
    from ctvlab.data.layout import PrepPaths

    manifest = verify_bundle(bundle)
    paths = PrepPaths(prep)
    paths.volumes.mkdir(parents=True, exist_ok=True)
    train, val = manifest["patients"]["train"], manifest["patients"]["val"]
    for pid in [*train, *val]:
        with zipfile.ZipFile(bundle / "patients" / f"{pid}.npz") as z:
            paths.features(pid).write_bytes(z.read("features.npy"))
            paths.masks(pid).write_bytes(z.read("masks.npy"))
        shutil.copyfile(bundle / "patients" / f"{pid}.json", paths.sidecar(pid))
    shutil.copyfile(bundle / "dataset.json", paths.dataset_json)
    return list(train), list(val)


# --- the node's Python: wheels, forbidden imports -------------------------------------------------------


def install_wheels(
    wheels: Sequence[Path], target: Path, use_pip: bool = True, python_version: str = WHEEL_PYTHON
) -> str:
    """Install wheels into `target` without an index (the caller puts `target` on sys.path); returns how.

    `pip install --no-index --no-deps --target`; where the Python has no pip, the wheels are unpacked,
    which is what pip does for these (no scripts, no compiled build step).

    Raises:
        SetupError: pip refused them (another Python version or platform than the bundle's).
    """
    target.mkdir(parents=True, exist_ok=True)
    if use_pip:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
               "--no-deps", "--target", str(target), *map(str, wheels)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            return "pip --no-index --target"
        if "No module named pip" not in done.stderr:
            raise SetupError(
                f"pip could not install the bundle's wheels (built for Python {python_version}, "
                f"{'/'.join(WHEEL_PLATFORMS)}; this is Python {std_platform.python_version()} on "
                f"{std_platform.machine()}): {done.stderr.strip()[-800:]}. Rebuild the bundle for this "
                "Python (GPU_PYTHON=3.x make gpu-bundle)"
            )
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    return "unzipped (no pip)"


def ensure_packages(bundle: Path, tmp: Path, python_version: str = WHEEL_PYTHON) -> dict[str, Any]:
    """Make MONAI and pydantic importable: the machine's own when it has both, else the bundle's wheels.
    Returns where each came from and its version."""
    import importlib
    import importlib.util

    how = "the machine's own"
    if any(importlib.util.find_spec(m) is None for m in NEEDED_MODULES):
        wheels = sorted((bundle / "wheels").glob("*.whl"))
        if not wheels:
            raise SetupError(f"{bundle}/wheels has no wheels and this Python lacks {NEEDED_MODULES}: "
                             "run `make gpu-bundle` (it downloads them)")  # fmt: skip
        target = tmp / "site"
        how = f"bundle wheels, {install_wheels(wheels, target, python_version=python_version)}"
        sys.path.insert(0, str(target))
        # A subprocess (the no-GPU prediction) must see them too.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
        importlib.invalidate_caches()
    try:
        versions = {m: getattr(importlib.import_module(m), "__version__", "?") for m in NEEDED_MODULES}
    except ImportError as e:
        raise SetupError(
            f"{how}: {e}; the bundle's wheels are for Python {python_version} on "
            f"{'/'.join(WHEEL_PLATFORMS)}, this is Python {std_platform.python_version()}"
        ) from e
    return {"source": how, "versions": versions}


class ImportBlocker:
    """Makes every import of `FORBIDDEN` (and their submodules) fail in this process, as on a GPU node that
    lacks them, whatever this machine has installed; records each attempt and the file that made it.

    Installed before anything else is imported (`main`), so that ctvlab's training path runs here under the
    node's conditions: an import of Ray or MLflow in it fails, or, inside try/except, is recorded. Other
    libraries' guarded optional imports (MONAI's `monai.handlers` tries MLflow) fail quietly, as on the node.
    """

    def __init__(self, names: Sequence[str] = FORBIDDEN):
        self.names = tuple(names)
        self.attempts: list[tuple[str, str]] = []

    def find_spec(self, name: str, path=None, target=None):
        if name.split(".")[0] in self.names:
            self.attempts.append((name, _importer()))
            raise ImportError(f"{name}: gpu_check blocks it, as the GPU node lacks {name.split('.')[0]}")
        return None

    def install(self) -> ImportBlocker:
        sys.meta_path.insert(0, self)
        return self


def _importer() -> str:
    """The file of the code that asked for the import: the first frame outside the import machinery."""
    skip = (__file__, os.path.dirname(contextlib.__file__) + os.sep + "importlib")
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith("<")
                                 or frame.f_code.co_filename.startswith(skip)):  # fmt: skip
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else "?"


BLOCKER = ImportBlocker()


def _package_path(path: str) -> str:
    """A library file's path from its site-packages folder on (monai/utils/module.py), else its name."""
    parts = Path(path).parts
    return (
        "/".join(parts[parts.index("site-packages") + 1 :]) if "site-packages" in parts else Path(path).name
    )


def loaded_forbidden() -> list[str]:
    """The packages of `FORBIDDEN` that this process has imported."""
    return sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in FORBIDDEN})


def forbidden_check(attempts: Sequence[tuple[str, str]], loaded: Sequence[str]) -> dict[str, Any]:
    """Neither ctvlab nor this check imported Ray or MLflow, or even tried to.

    Args:
        attempts: (module, file that asked) of every blocked import, this process's and the no-GPU
            prediction's (`ImportBlocker.attempts`).
        loaded: `loaded_forbidden()`.
    """
    loaded = list(loaded)

    def ours(
        by: str,
    ) -> bool:  # ctvlab's or the check's code; a virtual environment inside the checkout is not
        path = Path(by).resolve()
        return by != "?" and any(path.is_relative_to(ROOT / d) for d in ("platform", "benchmarks", "jobs"))

    mine = sorted(
        {f"{name} from {Path(by).resolve().relative_to(ROOT)}" for name, by in attempts if ours(by)}
    )
    others = sorted({f"{name.split('.')[0]} by {_package_path(by)}" for name, by in attempts if not ours(by)})
    return check("no Ray or MLflow import by ctvlab or the check", not loaded and not mine,
                 "; ".join(loaded + mine) or "none", "none",
                 f"guarded attempts by other libraries (they fail quietly, as on the node): "
                 f"{', '.join(others) or 'none'}")  # fmt: skip


# --- checks and results --------------------------------------------------------------------------------


def check(name: str, ok: bool, value: Any, limit: str, detail: str = "") -> dict[str, Any]:
    """One check's record: its name, whether it passed, the measured value and the limit it was held to."""
    return {"name": name, "ok": bool(ok), "value": value, "limit": limit, "detail": detail}


def exit_code(results: dict[str, Any]) -> int:
    """0 when every check passed, 1 when one failed or none ran."""
    checks = results.get("checks", [])
    return 0 if checks and all(c["ok"] for c in checks) else 1


def relative_l2(a, b) -> float:
    """|a − b| / |b| (L2 norms, float64); 0 when both are 0."""
    import torch

    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = float(torch.linalg.vector_norm(b))
    diff = float(torch.linalg.vector_norm(a - b))
    return 0.0 if diff == 0 else diff / max(denom, 1e-300)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 convolutions and matmuls without TF32 (PyTorch lets cuDNN use TF32 for convolutions by default)."""
    import torch

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@contextlib.contextmanager
def count_onednn(model) -> Iterator[list[bool]]:
    """Records, for each `ctvlab.unet.conv.Conv3d` call in the block, whether it took the oneDNN path."""
    from ctvlab.unet.conv import Conv3d, takes_onednn_path

    calls: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append(takes_onednn_path(args[0], mod)))
             for m in model.modules() if isinstance(m, Conv3d)]  # fmt: skip
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def parity_checks(example: dict[str, Any], ucfg, device) -> list[dict[str, Any]]:
    """One fp32 `train_step` from the same weights on the same example, on the device and on the CPU.

    On CUDA the CPU runs ctvlab's own path (oneDNN for batch-1 convolutions); on `--device cpu` the
    reference is PyTorch's own CPU kernels (`conv.aten_only`), so that two different kernels still meet.
    """
    import copy

    import torch

    from ctvlab.data.layout import MODALITY_SETS
    from ctvlab.unet.conv import aten_only
    from ctvlab.unet.loop import train_step
    from ctvlab.unet.losses import make_loss
    from ctvlab.unet.model import build_unet
    from ctvlab.unet.optim import build_optimizer

    torch.manual_seed(0)
    ref = build_unet(ucfg.model, len(MODALITY_SETS[ucfg.model.modality_set]))
    cand = copy.deepcopy(ref).to(device)
    loss_fn = make_loss(ucfg.loss)
    ref_opt, cand_opt = (
        build_optimizer(ref.parameters(), ucfg.optim),
        build_optimizer(cand.parameters(), ucfg.optim),
    )
    cpu = torch.device("cpu")
    with no_tf32() if device.type == "cuda" else contextlib.nullcontext(), count_onednn(cand) as calls:
        cand_loss = train_step(cand, cand_opt, loss_fn, [example], 0, device, "off")
    with aten_only() if device.type == "cpu" else contextlib.nullcontext():
        ref_loss = train_step(ref, ref_opt, loss_fn, [example], 0, cpu, "off")

    pairs = list(zip(ref.named_parameters(), cand.parameters(), strict=True))
    total = math.sqrt(sum(float(r.grad.double().norm()) ** 2 for (_, r), _c in pairs))
    worst, worst_name = 0.0, ""
    for (name, r), c in pairs:
        err = float((c.grad.detach().double().cpu() - r.grad.double()).norm())
        allowed = GRAD_RTOL * float(r.grad.double().norm()) + GRAD_ATOL_SHARE * total
        if err / allowed > worst:
            worst, worst_name = err / allowed, name
    whole = relative_l2(torch.cat([c.grad.flatten().cpu() for _, c in pairs]),
                        torch.cat([r.grad.flatten() for (_, r), _c in pairs]))  # fmt: skip
    ref_name = "PyTorch's own CPU kernels" if device.type == "cpu" else "the CPU (fp32)"
    onednn, n_calls = sum(calls), len(calls)
    if device.type == "cuda":
        conv = check("conv path: ctvlab's oneDNN path stays off on CUDA", onednn == 0 and n_calls > 0,
                     f"{onednn} of {n_calls} calls", "0")  # fmt: skip
    else:
        conv = check("conv path: ctvlab's oneDNN path taken on CPU", onednn > 0, f"{onednn} of {n_calls} calls",
                     "> 0", "so that the parity below compares it with PyTorch's own kernels")  # fmt: skip
    return [
        conv,
        check(f"fp32 loss on {device.type} = {ref_name}", abs(cand_loss - ref_loss) <= LOSS_ATOL,
              abs(cand_loss - ref_loss), f"≤ {LOSS_ATOL:g}", f"loss {cand_loss:.6f} vs {ref_loss:.6f}"),
        check(f"fp32 gradients on {device.type} = {ref_name}", worst <= 1.0, round(worst, 4),
              f"each tensor |Δg| ≤ {GRAD_RTOL:g}·|g| + {GRAD_ATOL_SHARE:g}·|all g| (value: worst ratio to that)",
              f"worst: {worst_name}; the whole gradient's relative L2 error {whole:.2e}"),
    ]  # fmt: skip


def train_check(prep: Path, train_ids, val_ids, ucfg, device, steps: int, threads: int, model_dir: Path):
    """`run_training` in a `LocalSession` for about `steps` optimiser steps (bf16 autocast on CUDA); the
    last epoch's weights are kept in `model_dir`. Returns (check, history, seconds)."""
    from ctvlab.unet.inference import SPEC_FILE, WEIGHTS_FILE
    from ctvlab.unet.loop import LocalSession, load_examples, run_training
    from ctvlab.unet.trainer import run_view

    view = run_view(prep, ucfg, train_ids, val_ids)
    train = load_examples(prep, train_ids, ucfg.model.modality_set, view)
    val = load_examples(prep, val_ids, ucfg.model.modality_set, view)
    per_epoch = math.ceil(len(train) / ucfg.train.batch_size)
    epochs = max(5, math.ceil(steps / per_epoch))
    ucfg = ucfg.model_copy(deep=True)
    ucfg.train.epochs, ucfg.train.checkpoint_every = epochs, epochs
    ucfg.train.val_every = max(1, epochs // 8)  # few validations: each improvement writes a checkpoint
    ucfg.train.mixed_precision = "bf16" if device.type == "cuda" else "off"

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        if checkpoint is not None and metrics["epoch"] == epochs - 1:
            model_dir.mkdir(parents=True, exist_ok=True)
            for name in (WEIGHTS_FILE, SPEC_FILE):
                shutil.copyfile(checkpoint / name, model_dir / name)

    config = {"unet": ucfg.model_dump(mode="json"), "view": view, "threads_per_worker": threads}
    t0 = time.perf_counter()
    history = run_training(config, LocalSession(train, val, report, device))
    seconds = time.perf_counter() - t0
    losses = [h["train_loss"] for h in history]
    window = max(1, len(losses) // 5)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    precision = "bf16" if device.type == "cuda" else "fp32"
    ok = math.isfinite(last) and last <= (1 - LOSS_DROP) * first
    result = check(f"{precision} training lowers the loss", ok, round(last / first, 4),
                   f"≤ {1 - LOSS_DROP:g} (last fifth of epochs / first fifth)",
                   f"{epochs * per_epoch} steps, {epochs} epochs of {len(train)} patients in {seconds:.0f} s; "
                   f"train loss {first:.4f} → {last:.4f}")  # fmt: skip
    return result, history, seconds


def predict_patients(model_dir: Path, prep: Path, ids: Sequence[str], device: str | None) -> dict[str, Any]:
    """`predict_arrays` of each patient with the model in `model_dir` on `device` (None: where
    `load_model` puts it). Returns {patient id: probability (X, Y, Z)}."""
    from ctvlab.data.readers import load_patient
    from ctvlab.unet.inference import load_model, predict_probability

    model = load_model(model_dir, device=device)
    return {pid: predict_probability(model, load_patient(prep, pid)) for pid in ids}


def predict_without_gpu(model_dir: Path, prep: Path, ids: Sequence[str], out: Path) -> dict[str, Any]:
    """Predict in a fresh process that sees no GPU (`CUDA_VISIBLE_DEVICES=`): weights trained on a GPU must
    load and predict on a machine without one. Returns the probabilities and what that process saw."""
    import numpy as np

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--predict-cpu", str(model_dir), "--prep", str(prep),
           "--ids", *ids, "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"prediction without a GPU failed: {done.stderr.strip()[-1500:]}")
    info = json.loads((out / "predict_cpu.json").read_text())
    with np.load(out / "predict_cpu.npz") as z:
        return {"probs": {pid: z[pid] for pid in ids}, **info}


def _predict_cpu_main(model_dir: Path, prep: Path, ids: Sequence[str], out: Path) -> int:
    """The no-GPU process of `predict_without_gpu`."""
    import numpy as np
    import torch

    t0 = time.perf_counter()
    probs = predict_patients(model_dir, prep, ids, device=None)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "predict_cpu.npz", **probs)
    info = {"cuda_available": torch.cuda.is_available(), "seconds": time.perf_counter() - t0,
            "blocked_imports": BLOCKER.attempts}  # fmt: skip
    (out / "predict_cpu.json").write_text(json.dumps(info))
    return 0


def inference_checks(gpu: dict[str, Any], cpu: dict[str, Any], prep: Path, threshold: float) -> list[dict]:
    """The device's probability maps and model CTVs against the CPU's, patient by patient."""
    import numpy as np

    from ctvlab.ctv.construct import model_ctv
    from ctvlab.ctv.metrics import dice
    from ctvlab.data.readers import load_patient

    mean_err, share_err, dices = [], [], []
    for pid, p_dev in gpu.items():
        p_cpu, patient = cpu[pid], load_patient(prep, pid)
        brain = patient.mask("brain") > 0
        diff = np.abs(p_dev - p_cpu)[brain]
        mean_err.append(float(diff.mean()))
        share_err.append(float((diff > PROB_VOXEL_ATOL).mean()))
        lesion = (patient.mask("cel") > 0) | (patient.mask("t2l") > 0)
        critical = patient.mask("critical") > 0
        ctv_dev = model_ctv(p_dev, threshold, lesion, brain, critical)
        ctv_cpu = model_ctv(p_cpu, threshold, lesion, brain, critical)
        dices.append(float(dice(ctv_dev, ctv_cpu, brain)))
    n = len(gpu)
    return [
        check("inference: probability map = CPU's", max(mean_err) <= PROB_MEAN_ATOL and max(share_err) <= PROB_VOXEL_SHARE,
              round(max(mean_err), 6), f"mean |Δp| over the brain ≤ {PROB_MEAN_ATOL:g}, and ≤ {PROB_VOXEL_SHARE:.0%} "
              f"of brain voxels with |Δp| > {PROB_VOXEL_ATOL:g}",
              f"{n} patients; worst share of voxels beyond {PROB_VOXEL_ATOL:g}: {max(share_err):.2e}"),
        check("inference: same model CTV as the CPU's", min(dices) >= CTV_DICE_MIN, round(min(dices), 5),
              f"Dice ≥ {CTV_DICE_MIN:g}", f"{n} patients, threshold {threshold:g}"),
    ]  # fmt: skip


# --- throughput ------------------------------------------------------------------------------------------


def measure_row(examples, ucfg, device, precision: str, batch: int, steps: int, warmup: int,
                variant: str = "", threads: int = 4) -> dict[str, Any]:  # fmt: skip
    """Throughput of the training loop's iteration as `run_training` runs it (augmentation of the batch on
    the CPU, then `train_step`) on one configuration.

    Args:
        examples: network examples (`load_examples`) of one view; cycled through in batches.
        precision: "bf16" (autocast on CUDA) or "fp32".
        variant: "" (as ctvlab trains), "channels_last", "cudnn_benchmark" or "compile".

    Returns:
        volumes per second (loop, and step alone), median step and iteration times (ms), data-path share,
        GPU busy share (CUDA events around the step / wall), the kernels' share (profiler), peak GPU
        memory (MiB), the first step's time (s: warm-up, or compilation).
    """
    import numpy as np
    import torch

    from ctvlab.data.layout import MODALITY_SETS
    from ctvlab.unet.augment import build_augmentation
    from ctvlab.unet.loop import train_step
    from ctvlab.unet.losses import make_loss
    from ctvlab.unet.model import build_unet
    from ctvlab.unet.optim import build_optimizer

    cuda = device.type == "cuda"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_unet(ucfg.model, len(MODALITY_SETS[ucfg.model.modality_set])).to(device)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = build_optimizer(model.parameters(), ucfg.optim)
    loss_fn = make_loss(ucfg.loss)
    net = torch.compile(model) if variant == "compile" else model
    augment = build_augmentation(ucfg.augment, seed=0)
    mode = "bf16" if precision == "bf16" else "off"
    order = [examples[i % len(examples)] for i in range((warmup + steps + 3) * batch)]
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    bench_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = variant == "cudnn_benchmark" or bench_before
    if cuda:
        gc.collect()  # the previous row's network and optimiser state
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def iteration(exs) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        exs = [{**ex, **augment({k: ex[k] for k in ("image", "label", "brain")})} for ex in exs]
        t1 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        train_step(net, optimizer, loss_fn, exs, 0, device, mode)
        if cuda:
            end.record()
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, (start.elapsed_time(end) / 1000 if cuda else float("nan"))

    try:
        first = sum(iteration(batches[0])[:2])
        for b in batches[1:warmup]:
            iteration(b)
        data, step, span = np.array([iteration(b) for b in batches[warmup : warmup + steps]]).T
        kernels = kernel_share(iteration, batches[-3:]) if cuda else None
    finally:
        torch.backends.cudnn.benchmark = bench_before
    wall = data + step
    row = {
        "variant": variant or "default", "precision": precision, "batch": batch,
        "volumes_per_s": batch * steps / float(wall.sum()),
        "step_volumes_per_s": batch * steps / float(step.sum()),
        "step_ms": 1000 * float(np.median(step)), "iteration_ms": 1000 * float(np.median(wall)),
        "data_share": float(data.sum() / wall.sum()),
        "gpu_busy_share": float(span.sum() / wall.sum()) if cuda else None,
        "gpu_kernel_share": kernels,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "first_step_s": first, "steps": steps,
    }  # fmt: skip
    if variant == "compile":
        torch._dynamo.reset()  # drop the compiled graphs before the next row
    return row


def kernel_share(run, batches) -> float | None:
    """The GPU kernels' summed time over the wall time of a few iterations (torch.profiler, recording the
    device only, which adds little to the wall time); None where the profiler cannot see the device."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for b in batches:
                run(b)
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        key = (
            "self_device_time_total"
            if hasattr(events[0], "self_device_time_total")
            else "self_cuda_time_total"
        )
        busy_us = sum(
            getattr(e, key)
            for e in events
            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        )
        return float(busy_us / 1e6 / wall) if busy_us > 0 else None
    except Exception:  # the profiler is a bonus: its absence must not fail the check
        return None


# --- the run ---------------------------------------------------------------------------------------------


def environment(device) -> dict[str, Any]:
    """What ran the check: the machine, PyTorch, CUDA and cuDNN."""
    import numpy as np
    import torch

    env = {"python": std_platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "device": device.type, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(), "bf16_supported": torch.cuda.is_bf16_supported()})  # fmt: skip
    else:
        env["cpu"] = std_platform.processor() or std_platform.machine()
    return env


def study_config(base_features: int, region: str, lr: float = TRAIN_LR):
    """The study's U-Net settings (ctvlab's defaults: six channels, PCC loss, Ranger, batch 1, the study's
    augmentation) with `base_features`, the input region and the check's learning rate."""
    from ctvlab.config import UNetConfig

    cfg = UNetConfig()
    cfg.model.base_features = base_features
    cfg.model.input_region = region
    cfg.optim.lr = lr
    return cfg


def markdown(results: dict[str, Any]) -> str:
    """The short table of gpu_check.md: the environment, each check, each throughput row."""
    env = results["environment"]
    head = env.get("gpu") or env.get("cpu", "")
    lines = [f"# gpu_check: {'all checks passed' if results.get('ok') else 'FAILED'}", "",
             f"{head} · torch {env['torch']} · CUDA {env.get('cuda', '-')} · Python {env['python']} · "
             f"{results['started']} · {results.get('seconds', 0):.0f} s · network {results['network']}", "",
             "| check | result | value | limit |", "|---|---|---|---|"]  # fmt: skip
    for c in results["checks"]:
        lines.append(f"| {c['name']} | {'ok' if c['ok'] else 'FAILED'} | {c['value']} | {c['limit']} |")
    lines += ["", "| region | grid | precision | batch | variant | volumes/s | step-only volumes/s | step ms | "
              "data share | GPU busy (events) | GPU kernels | peak GPU MiB | first step s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in results["throughput"]:
        lines.append(f"| {r['region']} | {'×'.join(map(str, r['grid']))} | {r['precision']} | {r['batch']} | "
                     f"{r['variant']} | {r['volumes_per_s']:.2f} | {r['step_volumes_per_s']:.2f} | "
                     f"{r['step_ms']:.1f} | {r['data_share']:.0%} | {num(r['gpu_busy_share'], '.0%')} | "
                     f"{num(r['gpu_kernel_share'], '.0%')} | {num(r['peak_gpu_mib'], '.0f')} | "
                     f"{r['first_step_s']:.1f} |")  # fmt: skip
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(results["skipped"])]
    if results.get("error"):
        lines += ["", f"Stopped by an error: {results['error']}"]
    return "\n".join(lines) + "\n"


def save(results: dict[str, Any], out: Path) -> None:
    """gpu_check.json and gpu_check.md in `out` (rewritten after every part)."""
    out.mkdir(parents=True, exist_ok=True)
    results["seconds"] = time.perf_counter() - results["_t0"]
    results["ok"] = exit_code(results) == 0 and not results.get("error")
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    (out / "gpu_check.json").write_text(json.dumps(public, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(public))


def plan_rows(device, quick: bool) -> tuple[list[tuple], list[tuple]]:
    """(base rows, optional rows) as (region, precision, batch, variant). On the CPU autocast is off
    (`batches.autocast_context`), so only fp32 rows; the variants are GPU questions."""
    precisions = ("bf16", "fp32") if device.type == "cuda" else ("fp32",)
    base = [(region, p, b, "") for region in ("grid", "ring") for p in precisions for b in (1, 2)]
    if device.type != "cuda" or quick:
        return base, []
    optional = [
        ("grid", "bf16", b, v) for v in ("channels_last", "cudnn_benchmark", "compile") for b in (1, 2)
    ]
    return base, optional


def run_check(args: argparse.Namespace) -> int:
    """The whole check; returns the exit code."""
    t0 = time.perf_counter()
    out = Path(args.out)
    results: dict[str, Any] = {"_t0": t0, "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                               "checks": [], "throughput": [], "skipped": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            manifest = verify_bundle(Path(args.bundle))
            results["packages"] = ensure_packages(
                Path(args.bundle), tmp, manifest.get("python", WHEEL_PYTHON)
            )
            import torch

            if args.device == "cuda" and not torch.cuda.is_available():
                raise SetupError("no CUDA device visible to torch (run with --device cpu for the CPU mode)")
            device = torch.device(args.device)
            torch.set_num_threads(args.threads)
            results["environment"] = environment(device)
            prep = tmp / "prep"
            train_ids, val_ids = unpack_patients(Path(args.bundle), prep)
        except SetupError as e:
            print(f"gpu_check: cannot start: {e}", file=sys.stderr)
            return 2
        features = args.base_features or (8 if args.quick else 48)
        results["network"] = (
            f"U-Net, {features} base features, six channels, PCC loss, Ranger lr {TRAIN_LR:g}"
        )
        results["patients"] = {"train": train_ids, "val": val_ids}
        try:
            run_parts(args, results, device, prep, train_ids, val_ids, features, tmp)
        except Exception as e:  # keep what was measured; say where it stopped
            results["error"] = f"{type(e).__name__}: {e}"
            raise
        finally:
            attempts = BLOCKER.attempts + [tuple(a) for a in results.pop("_cpu_attempts", [])]
            results["checks"].append(forbidden_check(attempts, loaded_forbidden()))
            save(results, out)
            print(markdown({k: v for k, v in results.items() if not k.startswith("_")}))
            print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return exit_code(results)


def run_parts(args, results, device, prep: Path, train_ids, val_ids, features: int, tmp: Path) -> None:
    """The checks, then the throughput rows, saving after each part."""
    from ctvlab.unet.loop import load_examples
    from ctvlab.unet.trainer import run_view

    out = Path(args.out)
    parts = results.setdefault("part_seconds", {"setup": round(time.perf_counter() - results["_t0"], 1)})

    def done(part: str, t: float) -> float:
        parts[part] = round(time.perf_counter() - t, 1)
        save(results, out)
        return time.perf_counter()

    t = time.perf_counter()
    grid_cfg = study_config(features, "grid")
    view = run_view(prep, grid_cfg, train_ids, val_ids)
    example = load_examples(prep, train_ids[:1], grid_cfg.model.modality_set, view)[0]
    results["checks"] += parity_checks(example, grid_cfg, device)
    t = done("parity", t)

    model_dir = tmp / "model"
    steps = args.train_steps or (40 if args.quick else 300)
    trained, history, _ = train_check(
        prep, train_ids, val_ids, grid_cfg, device, steps, args.threads, model_dir
    )
    results["checks"].append(trained)
    results["train_loss"] = [round(h["train_loss"], 5) for h in history]
    t = done("training", t)

    ids = list(val_ids) if args.quick else [*train_ids, *val_ids]
    cpu = predict_without_gpu(model_dir, prep, ids, tmp / "cpu-predict")
    results["checks"].append(check("GPU-trained weights load and predict without a GPU", not cpu["cuda_available"],
                                   f"{len(ids)} patients in {cpu['seconds']:.1f} s", "a process with no CUDA device",
                                   f"CUDA visible there: {cpu['cuda_available']}"))  # fmt: skip
    results["_cpu_attempts"] = cpu["blocked_imports"]
    dev = predict_patients(model_dir, prep, ids, device=str(device))
    results["checks"] += inference_checks(dev, cpu["probs"], prep, grid_cfg.train.threshold)
    t = done("inference", t)

    base, optional = plan_rows(device, args.quick)
    steps, warmup = (2, 1) if args.quick else (args.timed_steps, 3)
    examples = {}
    for region in ("grid", "ring"):
        cfg = study_config(features, region)
        v = run_view(prep, cfg, train_ids, val_ids)
        examples[region] = (cfg, v["input_shape"], load_examples(prep, train_ids, cfg.model.modality_set, v))
    for region, precision, batch, variant in [*base, *optional]:
        elapsed = time.perf_counter() - results["_t0"]
        # torch.compile spends a minute or more compiling; the other rows take seconds.
        needs = 150 if variant == "compile" else 20
        if variant and elapsed + needs > args.budget_s:
            results["skipped"].append(f"{region} {precision} batch {batch} {variant} (time budget)")
            continue
        cfg, grid, exs = examples[region]
        try:
            row = measure_row(exs, cfg, device, precision, batch, steps, warmup, variant, args.threads)
        except Exception as e:  # a variant that does not run here is a finding, not a failed check
            if not variant:
                raise
            results["skipped"].append(
                f"{region} {precision} batch {batch} {variant}: {type(e).__name__}: {e}"
            )
            continue
        results["throughput"].append({"region": region, "grid": grid, **row})
        save(results, out)
    done("throughput", t)


def build_main(args: argparse.Namespace) -> int:
    """`--build-bundle DIR`: what `make gpu-bundle` runs."""
    dest = Path(args.build_bundle)
    try:
        build_bundle(
            dest, args.patients, args.seed, wheels=not args.no_wheels, python_version=args.wheel_python
        )
    except (SetupError, subprocess.CalledProcessError) as e:
        print(f"gpu bundle: {e}", file=sys.stderr)
        return 1
    print(size_line(dest))
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="the folder `make gpu-bundle` wrote")
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu-check"),
        help="where gpu_check.json and gpu_check.md go (default: $OUT, else runs/gpu-check)",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--quick", action="store_true", help="8 base features and a few steps (the tests' CPU mode)"
    )
    p.add_argument(
        "--base-features", type=int, default=0, help="the network's base features (default 48; quick 8)"
    )
    p.add_argument(
        "--threads", type=int, default=4, help="CPU threads (augmentation, CPU reference; default 4)"
    )
    p.add_argument(
        "--train-steps", type=int, default=0, help="steps of the training check (default 300; quick 40)"
    )
    p.add_argument("--timed-steps", type=int, default=15, help="timed steps per throughput row (default 15)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="optional rows (channels-last, cuDNN autotuning, torch.compile) start only while the "
                        "run is within this many seconds (default 300)")  # fmt: skip
    p.add_argument(
        "--build-bundle", metavar="DIR", help="build the bundle into DIR instead (`make gpu-bundle`)"
    )
    p.add_argument("--patients", type=int, default=6, help="--build-bundle: synthetic patients (default 6)")
    p.add_argument("--seed", type=int, default=1, help="--build-bundle: the cohort's seed (default 1)")
    p.add_argument("--no-wheels", action="store_true", help="--build-bundle: patients only")
    p.add_argument(
        "--wheel-python",
        default=WHEEL_PYTHON,
        help=f"--build-bundle: the node's Python (default {WHEEL_PYTHON})",
    )
    p.add_argument("--predict-cpu", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    p.add_argument("--prep", help=argparse.SUPPRESS)
    p.add_argument("--ids", nargs="*", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "platform"))  # ctvlab from this checkout, without installing it
    args = parse_args(argv)
    if args.build_bundle:  # here, with ctvlab's whole environment
        return build_main(args)
    BLOCKER.install()
    if args.predict_cpu:
        return _predict_cpu_main(Path(args.predict_cpu), Path(args.prep), args.ids, Path(args.out))
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
