"""The package layout, configuration loading and the schema files."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from ctvlab.config import StudyConfig, load_config
from ctvlab.errors import ConfigError
from ctvlab.schemas import render_all

REPO = Path(__file__).resolve().parents[1]


def test_platform_is_the_standard_library_module():
    import platform

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(platform.__file__).resolve().parent == stdlib
    assert callable(platform.system) and platform.system()
    assert not (REPO / "platform" / "__init__.py").exists()


def test_every_shipped_config_loads():
    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert configs, "jobs/configs/ holds no config"
    for path in configs:
        assert isinstance(load_config(path), StudyConfig)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("unet:\n  optim:\n    lrr: 0.1\n", "unknown key 'unet.optim.lrr'"),
        ("splitt:\n  seed: 1\n", "unknown key 'splitt'"),
        ("split:\n  dl_fractions: [0.5, 0.5, 0.5]\n", "must sum to 1"),
        ("unet:\n  loss:\n    name: focal\n", "unet.loss.name"),
        ("- a\n- b\n", "must be a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_overrides_apply_dotted_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    cfg = load_config(path, {"unet.train.epochs": 3, "split.seed": 7})
    assert (cfg.unet.train.epochs, cfg.split.seed, cfg.name) == (3, 7, "x")


def test_set_items_are_parsed_as_yaml_values():
    from ctvlab.config import StudyConfig, parse_overrides

    got = parse_overrides(["unet.train.epochs=2", "unet.optim.lr=5.0e-4", "tune.space.base_features=[16, 32]",
                           "unet.train.use_gpu=true", "name=my study"])  # fmt: skip
    assert got == {"unet.train.epochs": 2, "unet.optim.lr": 5e-4, "tune.space.base_features": [16, 32],
                   "unet.train.use_gpu": True, "name": "my study"}  # fmt: skip
    # YAML 1.1 reads 5e-4 (no dot) as text; validation still makes it the number the user meant
    lr = parse_overrides(["unet.optim.lr=5e-4"])["unet.optim.lr"]
    assert StudyConfig.model_validate({"unet": {"optim": {"lr": lr}}}).unet.optim.lr == 5e-4


@pytest.mark.parametrize("item", ["unet.train.epochs", "=3", "unet..epochs=3", "unet.train.epochs=[1"])
def test_a_malformed_set_item_is_a_config_error(item):
    from ctvlab.config import parse_overrides

    with pytest.raises(ConfigError, match="--set"):
        parse_overrides([item])


def test_set_on_the_command_line_is_validated_like_the_file(tmp_path):
    """`--set` goes through the same validation as the YAML: a wrong key or value is exit 2, named, no
    traceback; a good one reaches the command (here: `ctvlab synth` writes the number of patients set)."""
    import subprocess
    import sys

    def ctvlab(*args):
        return subprocess.run([sys.executable, "-m", "ctvlab.cli", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)  # fmt: skip

    bad = ctvlab("split", "--set", "unet.optim.lrr=1")
    assert (
        bad.returncode == 2 and "unknown key 'unet.optim.lrr'" in bad.stderr and "Traceback" not in bad.stderr
    )
    bad = ctvlab("split", "--set", "unet.train.epochs=many")
    assert bad.returncode == 2 and "unet.train.epochs" in bad.stderr and "Traceback" not in bad.stderr
    path = tmp_path / "c.yaml"
    path.write_text("synth:\n  n_patients: 9\n")
    cfg = __import__("ctvlab.config", fromlist=["load_config"]).load_config(path, {"synth.n_patients": 3})
    assert cfg.synth.n_patients == 3  # --set wins over the file


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_schema_files_match_the_models():
    rendered = render_all()
    assert {"manifest.schema.json", "config.schema.json"} <= set(rendered)
    for name, text in rendered.items():
        path = REPO / "schemas" / name
        assert path.exists(), f"schemas/{name} missing: run `make schemas`"
        assert path.read_text() == text, f"schemas/{name} is out of date: run `make schemas`"
