"""benchmarks/run.py: a tiny-mode smoke run writes every reported key (no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medsynth.model.fastpath import resolve_sampling_precision

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "result.json"
    md = out.with_suffix(".md")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--tiny", "--threads", "1",
                           "--out", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


# Untrained benchmark networks, medsynth's fast path vs the fp32 baseline.  fp32 on both sides:
# differences are rounding, far below one HU.  bf16 (precision auto on CPUs with native bf16):
# measured max 22 HU / 54 dB (DDIM-50) and 46 HU / 49 dB (RF-30) on a Xeon with AMX.
BENCH_TOLERANCE = {"fp32": (1.0, 60.0), "bf16": (100.0, 40.0)}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_tiny_run_writes_the_issue_keys(result):
    r, _ = result
    s, d = r["sampling"], r["decode"]
    assert r["format"] == "medsynth-benchmark/1" and r["mode"] == "tiny"
    for value in (s["baseline_s_per_volume"], s["medsynth_s_per_volume"], s["speedup"], d["full_peak_mb"],
                  d["tiled_peak_mb"], r["unet_gflops"], r["matmul_peak_gflops"], r["matmul_peak_gflops_bf16"],
                  r["unet_peak_fraction"]):
        assert _number(value) and value > 0
    assert r["unet_peak_fraction"] == pytest.approx(r["unet_gflops"] / r["matmul_peak_gflops"], abs=1e-3)
    # both times are rounded to 0.1 ms in the JSON: allow for that on tiny-mode times
    b, m = s["baseline_s_per_volume"], s["medsynth_s_per_volume"]
    assert s["speedup"] == pytest.approx(b / m, rel=0.01 + 2e-4 / min(b, m))
    env = r["environment"]
    assert env["threads"] == 1 and len(env["load_before"]) == 3 and len(env["load_after"]) == 3


def test_every_scheduler_and_size_is_reported_and_extrapolations_say_so(result):
    r, _ = result
    runs = r["sampling"]["runs"]
    sizes = r["profile"]["sizes"]
    for size in sizes:
        assert {x["scheduler"] for x in runs if x["size"] == size} == {"ddpm", "ddim", "rflow"}
    assert all(x["how"] == "extrapolated" for x in runs if x["scheduler"] == "ddpm")
    measured = [x for x in runs if x["how"] == "measured"]
    assert measured and all(len(x["baseline_s"]) == len(x["medsynth_s"]) >= 1 for x in measured)
    assert all(x["steps"] == 1000 for x in runs if x["scheduler"] == "ddpm")
    # a size the profile only extrapolates is sampled end to end when its estimate fits the budget
    # (the tiny run's 32³ does), and the decision is recorded
    budget = r["sampling"]["e2e_budget"]
    decided = budget["sizes"][str(sizes[1])]
    assert decided["estimated_s"] > 0 and decided["measured_end_to_end"] is True
    assert {x["how"] for x in runs if x["size"] == sizes[1] and x["scheduler"] != "ddpm"} == {"measured"}


def test_outputs_of_the_two_paths_agree_and_the_exact_path_is_monai_bit_for_bit(result):
    r, _ = result
    s = r["sampling"]
    assert s["exact_path_bitwise_equal_to_monai"] is True
    assert s["settings"]["baseline"]["precision"] == "fp32"
    precision = s["settings"]["medsynth"]["precision"]
    # what `precision: auto` resolves to on this CPU for the latent the paths sampled: fp32, or bf16 on
    # CPUs with native bf16 from a 16³ latent up (the tiny run's latents are smaller: fp32 on both kinds)
    latent_voxels = s["settings"]["medsynth"]["latent_voxels"]
    assert precision == resolve_sampling_precision("auto", torch.device("cpu"), latent_voxels)
    max_hu, min_psnr = BENCH_TOLERANCE[precision]
    for figures in s["numerics"].values():
        assert figures["max_abs_diff_hu"] < max_hu and figures["psnr_db"] > min_psnr


def test_decode_memory_and_training_sections(result):
    r, md = result
    d, t = r["decode"], r["training"]
    assert d["size"] == r["profile"]["decode_size"] and d["autoencoder"]["channels"] == [8, 16, 16]
    assert d["tiling"]["tiles"] > 1 and d["full"]["out_shape"] == d["tiled"]["out_shape"] == [1, 1, 32, 32, 32]
    assert d["tiled_over_full"] == pytest.approx(d["tiled_peak_mb"] / d["full_peak_mb"], abs=0.002)
    for stage in ("autoencoder", "diffusion"):
        assert _number(t[stage]["median_step_s"]) and len(t[stage]["step_s"]) == t["timed_steps"]
    assert "| sampling (per volume, decode included) |" in md and "exact path" in md
    assert set(r["targets"]) >= {"sampling_speedup_ge_2", "tiled_decode_peak_le_third_of_full"}


def test_training_speedup_records_both_paths_and_what_each_ran_in(result):
    """``training.speedup``: for each stage the plain fp32 step (fp32, channels-first, MONAI's
    attention) and medsynth's, in the precision ``training.precision: auto`` resolves to on this CPU
    (fp32 here without native bf16; MEDSYNTH_CPU_BF16=1 makes it bf16 for the stages that qualify)."""
    from medsynth.model.fastpath import resolve_training_precision
    from medsynth.model.networks import cpu_has_native_bf16

    r, md = result
    sp = r["training"]["speedup"]
    assert sp["bf16_native"] is cpu_has_native_bf16() and len(sp["load_before"]) == 3
    assert {(c["networks"], c["stage"]) for c in sp["cases"]} == {
        ("demo", "diffusion"), ("demo_kl", "autoencoder"), ("demo_kl", "diffusion"), ("demo_kl", "controlnet")}
    for c in sp["cases"]:
        assert c["baseline"]["precision"] == "fp32" and c["baseline"]["channels_last"] is False
        assert c["baseline"]["fused_attention"] in (False, None) and c["baseline"]["fused_optimizer"] is False
        assert c["medsynth"]["fused_optimizer"] is True  # training.fused_optimizer: auto on the CPU
        assert c["medsynth"]["precision"] in ("fp32", "bf16")
        assert len(c["baseline_steps_s"]) == len(c["medsynth_steps_s"]) == sp["timed_steps"]
        assert c["speedup"] == pytest.approx(c["baseline_step_s"] / c["medsynth_step_s"], rel=0.01)
    ae = next(c for c in sp["cases"] if c["stage"] == "autoencoder")
    assert ae["medsynth"]["precision"] == resolve_training_precision("auto", torch.device("cpu"), 32 * 32 * 24)
    # the headline is stage 2 of the default demo (wavelet latent 16 x 16 x 12: bf16 where native)
    demo2 = next(c for c in sp["cases"] if c["networks"] == "demo")
    assert sp["speedup"] == sp["speedup_demo"] == demo2["speedup"] and sp["speedup_bench"] is None  # tiny: no bench case
    assert demo2["medsynth"]["precision"] == resolve_training_precision("auto", torch.device("cpu"), 16 * 16 * 12)
    assert "| training step, demo diffusion" in md and "| training step, demo_kl autoencoder" in md


def test_bad_arguments_are_refused():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--tiny"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 2 and "--out RESULT.json is required" in proc.stderr
