"""Dataset expansion jobs: sharding, resume after SIGKILL, merge, combined manifest, bad arguments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.errors import JobError
from medsynth.expand import candidate_index, expand, merge, plan_slots
from medsynth.jobs import parse_shard, shard_items
from medsynth.manifest import load_manifest, verify_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny class-conditional run trained on 8 phantoms (QC ranges widened so some samples pass)."""
    from medsynth.config import config_from_dict, dump_yaml
    from medsynth.data.phantoms import write_phantoms
    from medsynth.model.train import train

    root = tmp_path_factory.mktemp("expand")
    man = write_phantoms(root / "data", 8, seed=3, shape=(24, 24, 16), spacing=(14.0, 14.0, 22.0))
    raw = {"name": "tiny", "data": {"manifest": str(man), "shape": [16, 16, 16], "spacing": [20.0, 20.0, 20.0],
                                    "cache": "memory", "val_fraction": 0.0},
           "model": {"autoencoder": {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 8,
                                     "latent_channels": 2},
                     "unet": {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 8,
                              "num_head_channels": 8, "num_class_embeds": 2}},
           "training": {"device": "cpu", "precision": "fp32",
                        "autoencoder": {"steps": 20, "batch_size": 2, "adv_start": 1000, "disc_layers": 1,
                                        "val_every": 1000, "log_every": 10, "lr": 0.003},
                        "diffusion": {"steps": 20, "batch_size": 4, "num_train_timesteps": 100, "val_every": 1000,
                                      "log_every": 10, "lr": 0.003}},
           "sampling": {"scheduler": "ddim", "steps": 2, "batch_size": 2},
           "qc": {"percentile_margin": 20.0}}
    cfg = config_from_dict(raw)
    train(cfg, root / "run")
    return {"root": root, "run": root / "run", "manifest": man}


def _dataset_state(job: Path) -> dict:
    """Ids and voxels of the merged dataset, plus the combined manifest's case ids."""
    ds = job / "dataset"
    vox = {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted((ds / "imagesTr").glob("*.nii.gz"))} \
        if (ds / "imagesTr").is_dir() else {}
    combined = json.loads((ds / "combined_manifest.json").read_text())
    return {"files": sorted(vox), "vox": vox, "ids": [c["id"] for c in combined["cases"]],
            "synthetic": [c["id"] for c in combined["cases"] if c.get("synthetic")]}


def _same(a: dict, b: dict) -> None:
    assert a["files"] == b["files"] and a["ids"] == b["ids"] and a["synthetic"] == b["synthetic"]
    for k in a["vox"]:
        assert np.array_equal(a["vox"][k], b["vox"][k]), k


def test_shard_parsing_and_partition():
    assert parse_shard(None) == (0, 1) and parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "a/b", "3", "1/0"):
        with pytest.raises(JobError, match="`shard"):
            parse_shard(bad)
    items = list(range(11))
    for n in (1, 2, 3, 5):
        parts = [shard_items(items, (i, n)) for i in range(n)]
        assert sorted(x for p in parts for x in p) == items


def test_plan_slots_and_candidates():
    class C:
        def __init__(self, c):
            self.class_label = c

    cases = [C(0), C(0), C(1)]
    assert plan_slots(cases, [0, 1], n=3) == [0, 1, 0]
    assert plan_slots(cases, [0, 1], per_class=2) == [0, 1, 0, 1]
    assert plan_slots(cases, [0, 1], factor=2) == [0, 0, 0, 0, 1, 1]
    assert plan_slots(cases, None, factor=1) == [None] * 3
    with pytest.raises(JobError, match="exactly one of"):
        plan_slots(cases, [0, 1], n=2, per_class=1)
    with pytest.raises(JobError, match="class-conditional"):
        plan_slots(cases, None, per_class=2)
    # replacement candidates never collide with another slot's candidates
    seen = {candidate_index(j, r, 5) for j in range(5) for r in range(4)}
    assert len(seen) == 20


def test_sharded_equals_unsharded_and_resume_after_kill(tiny, tmp_path):
    run, man = tiny["run"], tiny["manifest"]
    common = dict(n=4, seed=11, max_tries=2)
    full = expand(run, man, tmp_path / "full", **common)
    assert full.merged and full.n_real == 8
    ref = _dataset_state(tmp_path / "full")
    assert len(ref["ids"]) == 8 + full.n_synthetic
    # every accepted sample passed QC; a rejected slot was refilled from a later candidate index
    acc = full.shards[0].accepted
    for slot, rel in acc.items():
        idx = int(Path(rel).stem.rsplit("-", 1)[1])
        assert idx % 4 == slot

    # shards 0/2 and 1/2, then merge: same ids and voxels as the unsharded run
    for i in (0, 1):
        r = expand(run, man, tmp_path / "sharded", shard=f"{i}/2", **common)
        assert not r.merged
    with pytest.raises(JobError, match="different arguments"):
        expand(run, man, tmp_path / "sharded", shard="0/2", n=5, seed=11, max_tries=2)
    merge(tmp_path / "sharded")
    _same(ref, _dataset_state(tmp_path / "sharded"))

    import torch

    # same thread count as this process: float reductions (and so voxels) depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    base = [sys.executable, "-m", "medsynth", "--no-progress", "expand", str(run), "--manifest", str(man),
            "--n", "4", "--seed", "11", "--max-tries", "2"]

    # both shards as processes running at the same time on one output folder, then --merge
    together = tmp_path / "together"
    procs = [subprocess.Popen([*base, "--out", str(together), "--shard", f"{i}/2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode in (0, 1), err
    r = subprocess.run([sys.executable, "-m", "medsynth", "--no-progress", "expand", "--merge", str(together)],
                       env=env, capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    _same(ref, _dataset_state(together))

    # kill -9 in the middle of the job, rerun the same command: same result
    job = tmp_path / "killed"
    cmd = [*base, "--out", str(job)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    r0 = job / "shards" / "0-of-1" / "round-0"
    while time.time() < deadline and p.poll() is None:
        if r0.is_dir() and any(r0.glob("synth-*.json")):
            break
        time.sleep(0.05)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (job / "expand.json").exists() or p.returncode == 0
    # nothing half-written is visible: every NIfTI present is complete
    for f in job.rglob("*.nii.gz"):
        if not f.name.startswith("."):
            nib.load(str(f)).get_fdata()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    _same(ref, _dataset_state(job))


def test_combined_manifest_verifies(tiny, tmp_path):
    res = expand(tiny["run"], tiny["manifest"], tmp_path / "job", per_class=1, seed=5, max_tries=1)
    man = load_manifest(tmp_path / "job" / "dataset" / "combined_manifest.json")
    assert sum(1 for c in man.cases if c.extra.get("synthetic")) == res.n_synthetic
    assert sum(1 for c in man.cases if c.extra.get("synthetic") is False) == 8
    assert verify_manifest(man) == []
    dl = json.loads((tmp_path / "job" / "dataset" / "combined_datalist.json").read_text())
    assert len(dl["training"]) == 8 + res.n_synthetic
    for it in dl["training"]:
        assert (tmp_path / "job" / "dataset" / it["image"]).is_file()


def test_cli_errors_without_traceback(tiny, run_cli, tmp_path):
    code, out, err = run_cli("expand", tiny["run"], "--manifest", tiny["manifest"], "--out", tmp_path / "j")
    assert code == 8 and "exactly one of --n, --per-class or --factor" in err and "Traceback" not in err
    code, out, err = run_cli("expand", "--merge", tmp_path / "nothing")
    assert code == 8 and "not an expand job folder" in err
    code, out, err = run_cli("expand", tiny["run"], "--manifest", tiny["manifest"], "--out", tmp_path / "j2",
                             "--n", "2", "--shard", "2/2")
    assert code == 8 and "--shard 2/2" in err
    code, out, err = run_cli("expand", tmp_path / "norun", "--manifest", tiny["manifest"], "--out", tmp_path / "j3",
                             "--n", "2")
    assert code != 0 and "Traceback" not in err


def _hand_made_job(root: Path, manifest: Path) -> Path:
    """A finished one-shard job folder with one accepted sample, built without a model."""
    from tests.fuzz.campaign import write_samples

    job = root / "job"
    rdir = job / "shards" / "0-of-1" / "round-0"
    sid = write_samples(rdir, [0])[0]
    (job / "shards" / "0-of-1" / "accepted.json").write_text(
        json.dumps({"shard": [0, 1], "accepted": {"0": f"round-0/{sid}.json"}, "exhausted": []}))
    (job / "job.json").write_text(json.dumps({"n_shards": 1, "manifest": str(manifest), "slots": [None],
                                              "formats": ["nifti"], "name": "hand"}))
    return job


def _dicom_reference(root: Path, break_vr: bool) -> Path:
    """A 'real patient' CT series and its manifest; optionally with the issue's unknown VR."""
    import struct

    import pydicom

    from medsynth.export import dicom as dcm
    from medsynth.volume import Volume, affine_from_spacing

    hu = np.full((8, 8, 3), -1000.0)
    hu[2:6, 2:6] = 40.0
    info, _ = dcm.write_series(Volume(hu, affine_from_spacing((1.0, 1.0, 2.0), hu.shape)), dcm.encode_ct(hu),
                               root / "ref" / "series", case_id="x", uid_key="ref")
    for f in info.files:
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.StudyID = "Oakenshield^Thorina", "PAT83731", "ST7781"
        ds.save_as(f)
    if break_vr:
        data = bytearray(info.files[0].read_bytes())
        at = data.index(struct.pack("<HH", 0x0010, 0x0010), 132)
        data[at + 4:at + 6] = b"\x55\x0c"
        info.files[0].write_bytes(bytes(data))
    man = root / "ref" / "manifest.json"
    man.write_text(json.dumps({"format": "medsynth-manifest/1", "name": "ref", "modality": "CT", "cases": [
        {"id": "case-000", "image": "series", "modality": "CT"}]}))
    return man


def test_merge_runs_the_phi_scan_and_fails_closed(tmp_path, run_cli):
    clean = _hand_made_job(tmp_path / "a", _dicom_reference(tmp_path / "a", break_vr=False))
    code, _out, err = run_cli("expand", "--merge", clean)
    assert code == 0, err
    assert (clean / "dataset" / "imagesTr").is_dir() and (clean / "expand.json").is_file()
    job = _hand_made_job(tmp_path / "b", _dicom_reference(tmp_path / "b", break_vr=True))
    code, _out, err = run_cli("expand", "--merge", job)
    assert code == 6 and "nothing was published" in err and "not scanned (not read: unknown value representation" in err
    assert "Traceback" not in err and "PAT83731" not in err and "Oakenshield" not in err
    assert not (job / "dataset").exists() and not (job / "expand.json").exists()


@pytest.mark.parametrize("damage, message", [
    ("job.json", "the job record is not readable JSON (JSONDecodeError)"),
    ("accepted.json", "the shard record is not readable JSON (JSONDecodeError)"),
    ("accepted-shape", "not a shard record"),
    ("sidecar", "every accepted sample is damaged"),
])
def test_merge_names_damaged_job_files(tmp_path, run_cli, damage, message):
    job = _hand_made_job(tmp_path, _dicom_reference(tmp_path, break_vr=False))
    shard = job / "shards" / "0-of-1"
    if damage == "job.json":
        (job / "job.json").write_text('{"n_shards": 1, "man')
    elif damage == "accepted.json":
        (shard / "accepted.json").write_text('{"accepted": {"0": ')
    elif damage == "accepted-shape":
        (shard / "accepted.json").write_text(json.dumps({"accepted": ["round-0/x.json"]}))
    else:
        side = next(p for p in (shard / "round-0").glob("*.json") if not p.name.endswith(".qc.json"))
        side.write_text("{")
    code, _out, err = run_cli("expand", "--merge", job)
    assert code == 8 and message in err and "Traceback" not in err, err
