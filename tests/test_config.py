from pathlib import Path

import pytest

from medsynth.config import Config, config_from_dict, config_to_dict, dump_yaml, load_config
from medsynth.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "ct_chest.yaml", "mri_brain.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # round trip: the resolved config is itself a valid config
    again = config_from_dict(config_to_dict(cfg))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_misspelt_key_is_named_with_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  spcing: [1.0, 1.0, 1.0]\n")
    with pytest.raises(ConfigError, match=r"data\.spcing: unknown key; did you mean 'spacing'\?"):
        load_config(p)


def test_nested_misspelt_key_has_full_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  diffusion:\n    learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"training\.diffusion\.learning_rate: unknown key"):
        load_config(p)


def test_wrong_types_reported_with_key_path_all_at_once(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  shape: [32, 32]\n  modality: CX\nsampling:\n  steps: ten\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "data.shape: expected a list of 3 values, got 2" in msg
    assert "data.modality: must be one of 'CT', 'MR', got 'CX'" in msg
    assert "sampling.steps: expected an integer" in msg
    assert "3 problem(s)" in msg


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.intensity: modality MR needs 'percentiles'"):
        config_from_dict({"data": {"modality": "MR"}})
    with pytest.raises(ConfigError, match=r"data\.shape: every size must be divisible by 4"):
        config_from_dict({"data": {"shape": [30, 32, 32]}})
    with pytest.raises(ConfigError, match=r"sampling\.guidance_scale: classifier-free guidance needs"):
        config_from_dict({"sampling": {"guidance_scale": 3.0}})
    with pytest.raises(ConfigError, match=r"sampling\.scheduler: 'rflow' sampling needs"):
        config_from_dict({"sampling": {"scheduler": "rflow"}})
    with pytest.raises(ConfigError, match=r"data\.orientation: need three axis codes"):
        config_from_dict({"data": {"orientation": "RRS"}})


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  shape: [1, 2\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+ is not valid YAML"):
        load_config(p)


def test_relative_paths_resolve_against_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "c.yaml"
    p.write_text("data:\n  manifest: ../m.json\n")
    cfg = load_config(p)
    assert cfg.data.manifest == str((tmp_path / "m.json").resolve())


def test_config_check_cli(run_cli, repo_root, tmp_path):
    code, out, err = run_cli("config", "check", repo_root / "configs" / "demo.yaml")
    assert code == 0
    assert "spacing" in out and "OK" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {}\n")
    code, out, err = run_cli("config", "check", bad)
    assert code == 2
    assert "modle: unknown key; did you mean 'model'?" in err
    assert "Traceback" not in err


def test_dump_yaml_roundtrip(tmp_path):
    cfg = config_from_dict({})
    p = tmp_path / "d.yaml"
    p.write_text(dump_yaml(cfg))
    assert config_to_dict(load_config(p)) == config_to_dict(cfg)
