"""benchmarks/gpu_check.py without a GPU: its CPU mode end to end in a process where Ray and MLflow cannot be
imported (as on the locked-down GPU node), the bundle's round trip, the wheel installation, the exit code."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.phantoms import PhantomSpec, make_phantom_cohort

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

# On PYTHONPATH, Python imports this at start-up: it logs that it ran, and makes every import of what the
# GPU node lacks and the bundle does not send fail (Ray, MLflow, nibabel, nilearn, XGBoost, jsonschema; their
# submodules too), logging the attempt and the file that made it.
BLOCKER = """
import os, sys

LOG = os.environ["GPU_CHECK_BLOCK_LOG"]
BLOCKED = ("ray", "mlflow", "nibabel", "nilearn", "xgboost", "jsonschema")


def _log(line):
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()} {line}\\n")


def _importer():
    frame = sys._getframe(2)
    while frame and (frame.f_code.co_filename.startswith("<") or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame.f_code.co_filename if frame else "?"


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            _log(f"blocked {name} {_importer()}")
            raise ImportError(f"{name} is not installed on the GPU node")
        return None


sys.meta_path.insert(0, _Blocker())
_log("loaded")
"""


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load_gpu_check()


@pytest.fixture(scope="module")
def phantom_bundle(tmp_path_factory, gpu_check) -> Path:
    """A bundle (no wheels) of four prepared phantom patients, three for training and one for validation."""
    from ctvlab.config import PreprocessConfig
    from ctvlab.preprocess.ray_pipeline import preprocess_cohort

    root = tmp_path_factory.mktemp("gpu_bundle")
    make_phantom_cohort(root / "cohort", n=4, spec=PhantomSpec(noise=0.05))
    report = preprocess_cohort(
        root / "cohort", root / "prep", PreprocessConfig(), progress=False, engine="serial"
    )
    assert report.ok, report
    ids = sorted(
        p["patient_id"] for p in json.loads((root / "prep" / "dataset.json").read_text())["patients"]
    )
    gpu_check.pack_patients(root / "prep", ids[:3], ids[3:], root / "bundle")
    return root / "bundle"


def blocked_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a process in which `import ray` and `import mlflow` fail."""
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    pythonpath = os.pathsep.join([str(site), str(ROOT / "platform")])
    return {**os.environ, "PYTHONPATH": pythonpath, "GPU_CHECK_BLOCK_LOG": str(tmp_path / "block.log")}


def test_the_blocker_makes_ray_and_mlflow_unimportable(tmp_path):
    env = blocked_env(tmp_path)
    for name in ("ray", "mlflow", "ray.train"):
        done = subprocess.run(
            [sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True
        )
        assert done.returncode != 0 and "not installed on the GPU node" in done.stderr, (name, done.stderr)
    assert subprocess.run([sys.executable, "-c", "import json"], env=env).returncode == 0


def test_cpu_quick_mode_passes_without_ray_and_mlflow(phantom_bundle, tmp_path):
    env = blocked_env(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--threads", "1",
           "--bundle", str(phantom_bundle), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    log = (tmp_path / "block.log").read_text().splitlines()
    # The check and its no-GPU prediction process both ran with the blocker, and neither ctvlab nor the check
    # even tried to import Ray or MLflow before the check's own blocker took over (it records what comes
    # after, and its verdict is the check "no Ray or MLflow import by ctvlab or the check" below). MONAI
    # tries MLflow: `import monai` loads `monai.handlers`, whose optional imports are guarded.
    assert sum(line.endswith(" loaded") for line in log) >= 2, log
    attempts = [line.split()[2:4] for line in log if line.split()[1] == "blocked"]
    ours = [
        (name, by)
        for name, by in attempts
        if name.split(".")[0] in ("ray", "mlflow") and by.startswith(str(ROOT))
    ]
    assert not ours, ours

    results = json.loads((out / "gpu_check.json").read_text())
    assert results["ok"] is True
    names = {c["name"] for c in results["checks"]}
    assert {"no Ray or MLflow import by ctvlab or the check", "fp32 training lowers the loss", "inference: same model CTV as the CPU's",
            "GPU-trained weights load and predict without a GPU"} <= names  # fmt: skip
    assert any(n.startswith("fp32 gradients on cpu") for n in names)
    assert all(c["ok"] for c in results["checks"]), results["checks"]
    rows = {(r["region"], r["precision"], r["batch"]) for r in results["throughput"]}
    assert rows == {(region, "fp32", b) for region in ("grid", "ring") for b in (1, 2)}
    assert all(r["volumes_per_s"] > 0 and 0 <= r["data_share"] < 1 for r in results["throughput"])
    table = (out / "gpu_check.md").read_text()
    assert "all checks passed" in table and "| grid |" in table and "| ring |" in table


def test_bundle_round_trip_is_byte_exact_and_a_changed_file_is_refused(gpu_check, phantom_bundle, tmp_path):
    from ctvlab.data.readers import load_patient

    manifest = gpu_check.verify_bundle(phantom_bundle)
    train, val = gpu_check.unpack_patients(phantom_bundle, tmp_path / "prep")
    assert (train, val) == (manifest["patients"]["train"], manifest["patients"]["val"])
    for pid in [*train, *val]:
        p = load_patient(tmp_path / "prep", pid)  # checks each volume file against its sidecar's sha256
        with zipfile.ZipFile(phantom_bundle / "patients" / f"{pid}.npz") as z:
            assert z.read("features.npy") == (tmp_path / "prep" / "volumes" / f"{pid}.npy").read_bytes()
        assert p.features.dtype.name == "float32" and p.masks.shape[1:] == p.features.shape[1:]

    damaged = tmp_path / "damaged"
    shutil.copytree(phantom_bundle, damaged)
    (damaged / "patients" / f"{val[0]}.json").write_text("{}")
    with pytest.raises(gpu_check.SetupError, match="missing or changed"):
        gpu_check.verify_bundle(damaged)
    with pytest.raises(gpu_check.SetupError, match="make gpu-bundle"):
        gpu_check.verify_bundle(tmp_path / "nowhere")


def test_the_check_blocks_an_import_and_names_the_file_that_tried(gpu_check):
    blocker = gpu_check.ImportBlocker(["gpucheck_forbidden_probe"]).install()
    try:
        with pytest.raises(ImportError, match="gpu_check blocks it"):
            import gpucheck_forbidden_probe  # noqa: F401
    finally:
        sys.meta_path.remove(blocker)
    assert blocker.attempts == [("gpucheck_forbidden_probe", __file__)]


@pytest.mark.parametrize(
    "attempts, loaded, ok",
    [
        ([], [], True),
        (
            [("mlflow", "/venv/lib/python3.12/site-packages/monai/utils/module.py")],
            [],
            True,
        ),  # guarded, MONAI's
        (
            [("mlflow", str(ROOT / ".venv/lib/python3.11/site-packages/monai/utils/module.py"))],
            [],
            True,
        ),  # MONAI's, from a virtual environment inside the checkout
        ([("mlflow", str(ROOT / "platform" / "ctvlab" / "unet" / "loop.py"))], [], False),  # ctvlab tried
        ([("ray.train", str(SCRIPT))], [], False),  # the check itself tried
        ([], ["ray"], False),  # imported before the blocker
    ],
)
def test_only_other_libraries_may_try_ray_or_mlflow(gpu_check, attempts, loaded, ok):
    result = gpu_check.forbidden_check(attempts, loaded)
    assert result["ok"] is ok, result
    if attempts and ok:
        assert "monai/utils/module.py" in result["detail"]


def tiny_wheel(folder: Path) -> Path:
    """A pure-Python wheel of a one-module package `gpucheck_probe`."""
    wheel = folder / "gpucheck_probe-0.1-py3-none-any.whl"
    info = "gpucheck_probe-0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("gpucheck_probe/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpucheck-probe\nVersion: 0.1\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.mark.parametrize("use_pip, how", [(True, "pip --no-index --target"), (False, "unzipped (no pip)")])
def test_wheels_install_into_a_folder_without_an_index(gpu_check, tmp_path, use_pip, how):
    target = tmp_path / "site"
    assert gpu_check.install_wheels([tiny_wheel(tmp_path)], target, use_pip=use_pip) == how
    code = "import gpucheck_probe; print(gpucheck_probe.VALUE)"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(target)},
                          capture_output=True, text=True)  # fmt: skip
    assert done.stdout.strip() == "42", done.stderr


def test_a_wheel_for_another_python_is_refused_with_the_fix(gpu_check, tmp_path):
    wheel = tmp_path / "gpucheck_probe-0.1-cp27-cp27mu-manylinux1_x86_64.whl"
    tiny_wheel(tmp_path).rename(wheel)
    with pytest.raises(gpu_check.SetupError, match=re.escape("GPU_PYTHON=3.x make gpu-bundle")):
        gpu_check.install_wheels([wheel], tmp_path / "site")


def test_every_wheel_is_pinned_in_constraints(gpu_check):
    pins = gpu_check.pinned_versions(gpu_check.WHEELS)
    assert set(pins) == set(gpu_check.WHEELS) and all(v[0].isdigit() for v in pins.values())


@pytest.mark.parametrize(
    "oks, code",
    [([True, True], 0), ([True, False], 1), ([False], 1), ([], 1)],
)
def test_exit_code(gpu_check, oks, code):
    results = {"checks": [gpu_check.check(f"c{i}", ok, 0, "") for i, ok in enumerate(oks)]}
    assert gpu_check.exit_code(results) == code
