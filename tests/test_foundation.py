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
