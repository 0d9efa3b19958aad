"""The Python API at the package top, end to end on the tiny config: train -> generate -> qc ->
export -> anonymise -> expand, each name imported on first use."""

from __future__ import annotations

import json
import pydoc
import subprocess
import sys

import pytest

import medsynth
from tests.helpers import tiny_config

# QC ranges widened so that a tiny model's samples can pass (as in tests/test_expand.py)
WIDE_QC = {"percentile_margin": 20.0, "range_floor": 1.0, "artefact_threshold": 1.0,
           "label_outside_body_max": 1.0}


def test_api_names_are_documented_and_lazy():
    code = ("import sys, medsynth; "
            "print(sorted(m for m in ('torch', 'monai', 'medsynth.model.train', 'medsynth.export.release', "
            "'medsynth.privacy.audit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # importing the package imports no stage
    for name in ("train", "generate", "qc", "export", "anonymise", "expand", "audit", "release"):
        fn = getattr(medsynth, name)
        assert callable(fn) and name in medsynth.__all__ and name in dir(medsynth)
        assert (fn.__doc__ or "").strip(), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        medsynth.nope  # noqa: B018


def test_callable_stage_modules_keep_their_module_paths():
    from medsynth.export import export_samples
    from medsynth.expand import merge

    assert medsynth.export.export_samples is export_samples and medsynth.expand.merge is merge
    assert pydoc.locate("medsynth.export.bundle.sample_bundle") is not None  # what MONAI bundles resolve
    assert pydoc.locate("medsynth.qc.gate.run_qc") is not None


def test_end_to_end_through_the_package_top(phantoms, tmp_path):
    raw = tiny_config(phantoms, qc=WIDE_QC)
    res = medsynth.train(raw, tmp_path / "run")  # a plain mapping, a YAML path or a Config
    assert [s["stage"] for s in res.summaries] == ["autoencoder", "diffusion"]

    gen = medsynth.generate(tmp_path / "run", tmp_path / "samples", range(4), seed=0)
    assert len(list((tmp_path / "samples").glob("synth-*.json"))) == 4 and gen is not None

    outcome = medsynth.qc(tmp_path / "samples", phantoms, tmp_path / "qc", run_dir=tmp_path / "run",
                          quarantine=False)
    report = json.loads((tmp_path / "qc" / "qc.json").read_text())
    assert report["counts"]["samples"] == 4 and outcome is not None

    exp = medsynth.export(tmp_path / "samples", tmp_path / "dataset", formats="nifti,dicom", reference=phantoms,
                          force=True)
    assert len(exp.exported) == 4 and (tmp_path / "dataset" / "manifest.json").is_file()

    key = tmp_path / "deid.key"
    key.write_bytes(b"k" * 32)
    rep = medsynth.anonymise(tmp_path / "dataset" / "dicom", tmp_path / "deid", key)
    assert rep.processed > 0 and rep.failed == 0

    job = medsynth.expand(tmp_path / "run", phantoms, tmp_path / "expanded", n=2, max_tries=2)
    assert job.merged and (tmp_path / "expanded" / "expand.json").is_file()
