"""The extension-point tables (medsynth/registry.py): every stage table has exactly the registry's
names, and config validation takes its allowed values from them."""

from __future__ import annotations

import typing

import pytest

from medsynth import registry
from medsynth.config import AutoencoderConfig, ConfigError, ExportConfig, SamplingConfig, TrainingConfig, config_from_dict
from medsynth.export.dataset import DEFAULT_FORMATS, FORMAT_WRITERS, FORMATS, parse_formats
from medsynth.model.networks import AUTOENCODER_BUILDERS, SCHEDULER_BUILDERS
from medsynth.model.sample import SCHEDULER_STEPS


@pytest.mark.parametrize("table, code", [
    (registry.SCHEDULERS, SCHEDULER_BUILDERS), (registry.SCHEDULERS, SCHEDULER_STEPS),
    (registry.LATENT_KINDS, AUTOENCODER_BUILDERS), (registry.EXPORT_FORMATS, FORMAT_WRITERS),
], ids=["scheduler builders", "scheduler steps", "autoencoder builders", "format writers"])
def test_every_entry_has_its_code_and_nothing_else(table, code):
    assert list(code) == list(table)


def test_config_choices_come_from_the_tables():
    def choices(cls, name):
        return typing.get_args(typing.get_type_hints(cls)[name])

    assert choices(TrainingConfig, "scheduler") == tuple(registry.SCHEDULERS)
    assert choices(SamplingConfig, "scheduler") == tuple(registry.SCHEDULERS)
    assert choices(AutoencoderConfig, "kind") == tuple(registry.LATENT_KINDS)
    assert ExportConfig().formats == DEFAULT_FORMATS and FORMATS == tuple(registry.EXPORT_FORMATS)


def test_rules_follow_the_table_entries():
    with pytest.raises(ConfigError, match="did you mean 'rflow'"):
        config_from_dict({"training": {"scheduler": "rflw"}})
    with pytest.raises(ConfigError, match="must be sampled with scheduler 'rflow'"):
        config_from_dict({"training": {"scheduler": "rflow"}, "sampling": {"scheduler": "ddim"}})
    with pytest.raises(ConfigError, match="'rflow' sampling needs a model trained with training.scheduler: rflow"):
        config_from_dict({"sampling": {"scheduler": "rflow"}})
    with pytest.raises(ConfigError, match=r"DDPM samples with all training timesteps \(1000\); use 'ddim'"):
        config_from_dict({"sampling": {"scheduler": "ddpm", "steps": 10}})
    with pytest.raises(ConfigError, match="unknown format"):
        config_from_dict({"export": {"formats": ["nifti", "png"]}})
    assert parse_formats("seg,dicom") == ("dicom", "seg")
    with pytest.raises(Exception, match="seg needs dicom too: a DICOM SEG references") as exc:
        parse_formats("seg")
    assert "use `formats='nifti,dicom,seg'`" in str(exc.value)
