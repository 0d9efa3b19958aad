"""Training across processes: torchrun + DistributedDataParallel (gloo on CPU), rank-0 checkpoints,
--max-steps, resume, and the checkpoint loads and samples."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.config import config_from_dict, dump_yaml
from medsynth.data.phantoms import write_phantoms


def _config(tmp_path: Path, ae_steps: int = 4) -> Path:
    man = write_phantoms(tmp_path / "data", 4, seed=1, shape=(20, 20, 12), spacing=(16.0, 16.0, 27.0))
    raw = {"name": "ddp", "data": {"manifest": str(man), "shape": [16, 16, 16], "spacing": [20.0, 20.0, 20.0],
                                   "cache": "memory", "val_fraction": 0.0},
           "model": {"autoencoder": {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 8,
                                     "latent_channels": 2},
                     "unet": {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 8,
                              "num_head_channels": 8, "num_class_embeds": 2}},
           "training": {"device": "cpu", "precision": "fp32", "checkpoint_every": 2,
                        "autoencoder": {"steps": ae_steps, "batch_size": 2, "adv_start": 2, "adv_weight": 0.01,
                                        "disc_layers": 1, "val_every": 1000, "log_every": 1},
                        "diffusion": {"steps": 4, "batch_size": 2, "num_train_timesteps": 50, "val_every": 1000,
                                      "log_every": 1}},
           "sampling": {"scheduler": "ddim", "steps": 2, "batch_size": 2}}
    cfg = config_from_dict(raw)
    p = tmp_path / "ddp.yaml"
    p.write_text(dump_yaml(cfg))
    return p


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_cmd(cfg: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
            "-m", "medsynth", "train", str(cfg), "--no-progress", "--run-dir", str(run), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(cfg: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(cfg, run, *extra), env=ENV, capture_output=True, text=True, timeout=600)


def test_two_process_gloo_training_resumes_and_samples(tmp_path, run_cli):
    cfg = _config(tmp_path)
    run = tmp_path / "run"
    # 3 steps, stopped by --max-steps: the autoencoder is checkpointed but not finished
    r = _torchrun(cfg, run, "--max-steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(run / "autoencoder" / "last.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 3 and not (run / "diffusion" / "last.pt").exists()
    # rank 0 alone writes the metrics log: one line per logged step, no duplicates
    lines = (run / "autoencoder" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # resume (as after a kill): both stages finish
    r = _torchrun(cfg, run, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "model_card.json").is_file()
    ck = torch.load(run / "diffusion" / "last.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 4
    # the checkpoint loads and samples in a single process
    code, out, err = run_cli("generate", run, "-n", "2", "--out", tmp_path / "samples", "--seed", "3")
    assert code == 0, err
    vols = sorted((tmp_path / "samples").glob("synth-*.nii.gz"))
    assert len(vols) == 2 and all(np.isfinite(np.asarray(nib.load(str(v)).dataobj)).all() for v in vols)


def test_batch_not_divisible_by_processes_is_refused(tmp_path):
    cfg = _config(tmp_path)
    text = cfg.read_text().replace("batch_size: 2", "batch_size: 3", 1)
    cfg.write_text(text)
    r = _torchrun(cfg, tmp_path / "run", "--max-steps", "1")
    assert r.returncode != 0
    assert "not divisible by the 2 training processes" in r.stderr  # torchrun's launcher adds its own report


def test_killed_torchrun_training_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL of the whole torchrun process group mid-training, then --resume: the same weights as a
    run that was never interrupted (batches and noise are functions of (seed, step), not of history)."""
    cfg = _config(tmp_path, ae_steps=40)
    r = _torchrun(cfg, tmp_path / "whole")
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "killed"
    p = subprocess.Popen(_torchrun_cmd(cfg, run), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    ck_path = run / "autoencoder" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not ck_path.exists():
        time.sleep(0.02)
    assert p.poll() is None, "training ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # launcher and both workers at once, as a scheduler's kill would
    p.wait()
    assert not (run / "model_card.json").exists()
    # the checkpoint on disk is whole (atomic write) and from before the end
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    assert 0 < ck["step"] < 40

    r = _torchrun(cfg, run, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("autoencoder", "diffusion"):
        a = torch.load(tmp_path / "whole" / stage / "last.pt", map_location="cpu", weights_only=False)
        b = torch.load(run / stage / "last.pt", map_location="cpu", weights_only=False)
        assert a["step"] == b["step"]
        for k, v in a["model"].items():
            assert torch.equal(v, b["model"][k]), f"{stage}: {k} differs after resume"
