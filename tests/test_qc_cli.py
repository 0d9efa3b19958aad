"""`medsynth qc` end to end: verdicts, quarantine, qc.json, the HTML report, bad inputs.

A samples folder is written in the format of ``medsynth generate`` (``write_sample``) holding
genuine samples (phantoms of other seeds, resampled onto the sample grid) and crafted failures:
NaN, checkerboard, a copy of a training case, labels painted outside the body, the wrong grid,
and a corrupt image file.
"""

import base64
import io
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest

from medsynth.config import DataConfig
from medsynth.data.phantoms import write_phantoms
from medsynth.data.transforms import target_affine
from medsynth.manifest import load_manifest, save_manifest
from medsynth.qc.features import body_mask
from medsynth.qc.gate import resample_cases
from medsynth.samples import list_samples, write_sample
from medsynth.volume import Volume, affine_from_spacing

N = 24
PHANTOM = {"shape": (48, 48, 36), "spacing": (6.67, 6.67, 9.33)}
GOOD = [f"synth-t-{i:05d}" for i in range(4)]
BAD = {"synth-t-00100": "non_finite_values", "synth-t-00101": "artefact_suspected",
       "synth-t-00102": "possible_copy", "synth-t-00103": "label_outside_body",
       "synth-t-00104": "geometry_mismatch", "synth-t-00105": "unreadable_image"}


def _write(sd, sid, arr, aff, label=None, index=0):
    lab = Volume(label, aff, modality="SEG", units="label") if label is not None else None
    write_sample(sd, sid, Volume(np.asarray(arr, np.float32), aff), {"index": index, "seed": index,
                                                                       "class": 0}, label=lab)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc_cli")
    dcfg = DataConfig(shape=(N, N, N), spacing=(320 / N,) * 3, orientation="RAS", cache="none")
    aff = target_affine(dcfg)
    ref = write_phantoms(root / "ref", 6, seed=1, **PHANTOM)
    gen = write_phantoms(root / "gen", 4, seed=2, **PHANTOM)
    r = resample_cases(load_manifest(ref).cases, dcfg)
    ref_ids, ref_arr = r.ids, r.arrays
    gen_arr = resample_cases(load_manifest(gen).cases, dcfg).arrays
    sd = root / "samples"
    sd.mkdir()
    for i, a in enumerate(gen_arr):
        lungs = (body_mask(a, aff, "CT") & (a < -500)).astype(np.uint8) if i == 0 else None
        _write(sd, GOOD[i], a, aff, label=lungs, index=i)
    rng = np.random.default_rng(0)
    nan = gen_arr[0].copy()
    nan[4, 4, 4] = np.nan
    _write(sd, "synth-t-00100", nan, aff, index=100)
    i, j, k = np.indices((N, N, N))
    _write(sd, "synth-t-00101", gen_arr[1] + 100.0 * (-1.0) ** (i + j + k), aff, index=101)
    _write(sd, "synth-t-00102", ref_arr[2] + rng.normal(0, 10, ref_arr[2].shape), aff, index=102)
    outside = (~body_mask(gen_arr[2], aff, "CT")).astype(np.uint8)
    _write(sd, "synth-t-00103", gen_arr[2], aff, label=outside, index=103)
    _write(sd, "synth-t-00104", gen_arr[3], affine_from_spacing((12.0, 12.0, 12.0), (N, N, N)), index=104)
    _write(sd, "synth-t-00105", gen_arr[3], aff, index=105)
    (sd / "synth-t-00105.nii.gz").write_bytes(b"\x1f\x8b not a nifti file")
    return {"root": root, "ref": ref, "samples": sd, "ref_ids": ref_ids, "aff": aff}


@pytest.fixture(scope="module")
def ran(world, tmp_path_factory):
    from medsynth.cli import main

    out = world["root"] / "qc"
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["--no-progress", "qc", str(world["samples"]), "--reference", str(world["ref"]),
                     "--out", str(out)])
    return code, buf.getvalue(), json.loads((out / "qc.json").read_text()), out


def test_exit_code_and_summary(ran):
    code, stdout, summary, out = ran
    assert code == 0
    assert f"{len(GOOD) + len(BAD)} samples: {len(GOOD)} passed, {len(BAD)} failed" in stdout
    assert "report:" in stdout and (out / "report.html").is_file()
    assert summary["counts"] == {"samples": 10, "passed": 4, "failed": 6, "quarantined": 6, "unreadable_sidecars": 0}


def test_every_sample_has_a_verdict_with_reasons(ran, world):
    _, _, summary, _ = ran
    by_id = {s["id"]: s for s in summary["samples"]}
    for sid in GOOD:
        assert by_id[sid]["passed"] is True and by_id[sid]["reasons"] == [], by_id[sid]
        assert by_id[sid]["file"] == f"{sid}.nii.gz"
    for sid, code in BAD.items():
        s = by_id[sid]
        assert s["passed"] is False and any(r.startswith(code + " (") for r in s["reasons"]), (sid, s["reasons"])
    copy = by_id["synth-t-00102"]
    assert any(f"nearest training case {world['ref_ids'][2]}" in r for r in copy["reasons"])
    assert copy["memorisation"]["nearest_training_case_image"] == world["ref_ids"][2]
    assert by_id["synth-t-00105"]["memorisation"] is None  # unreadable: nothing to screen


def test_failing_samples_are_quarantined_with_their_verdicts(ran, world):
    sd = world["samples"]
    q = sd / "quarantine"
    for sid in BAD:
        assert not (sd / f"{sid}.json").exists() and not (sd / f"{sid}.nii.gz").exists()
        assert (q / f"{sid}.json").is_file() and (q / f"{sid}.nii.gz").is_file()
        verdict = json.loads((q / f"{sid}.qc.json").read_text())
        assert verdict["passed"] is False and verdict["reasons"]
    assert (q / "synth-t-00103_label.nii.gz").is_file()
    assert [s.id for s in list_samples(sd)] == GOOD
    for s in list_samples(sd):
        v = s.qc_verdict()
        assert v["passed"] is True and v["format"] == "medsynth-qc/1"
        from medsynth.jobs import sha256_file

        assert v["image_sha256"] == sha256_file(s.image_path)
        assert "artefact_suspected" in v["checks"] and "non_finite_values" in v["checks"]
    _, _, summary, _ = ran
    moved = {s["id"]: s.get("quarantined_to") for s in summary["samples"]}
    assert moved["synth-t-00103"] and "quarantine/synth-t-00103.json" in moved["synth-t-00103"]


def test_metrics_calibration_and_self_test_are_recorded(ran, capsys):
    _, _, s, _ = ran
    m = s["metrics"]
    for name in ("ms_ssim_mean_synthetic", "ms_ssim_mean_real", "mmd2_rbf_radiomics", "frechet_distance_radiomics",
                 "precision_k3_radiomics", "recall_k3_radiomics", "density_k3_radiomics", "coverage_k3_radiomics"):
        assert name in m and m[name]["value"] is not None and np.isfinite(m[name]["value"]), name
        assert m[name]["description"]
    assert m["ms_ssim_mean_real"]["settings"]["kernel_size"] == 5  # 24^3 fits 3 scales with a 5-voxel kernel
    assert s["metrics_n_synthetic"] == 4
    mem = s["memorisation"]
    assert mem["calibration"]["mode"] == "internal_split" and "trained on them too" in mem["calibration"]["note"]
    assert mem["self_test"]["planted"] == mem["self_test"]["flagged"] == mem["self_test"]["named_source"] == 6
    assert mem["n_flagged"] == 1
    assert s["reference"]["n_cases_used"] == 6 and s["grid"]["shape"] == [N, N, N]
    assert "inferred" in s["grid"]["source"]
    with capsys.disabled():
        print("\n[qc demo-like run] " + ", ".join(f"{k}={v['value']:.4g}" for k, v in m.items())
              + f"; memorisation threshold {mem['calibration']['image_threshold']:.4g}, "
              f"genuine flagged 0/4, planted {mem['self_test']['flagged']}/{mem['self_test']['planted']}")


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.tags, self.stack_ok = [], [], [], True
        self.open = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("href", "src"):
            if key in a and tag != "img":
                self.links.append(a[key])
        if tag not in ("img", "meta", "br", "hr", "link", "input"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.stack_ok = False
        else:
            self.open.pop()


def test_report_is_valid_self_contained_html_with_embedded_png(ran):
    from PIL import Image

    _, _, _summary, out = ran
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    p = _Imgs()
    p.feed(text)
    p.close()
    assert p.stack_ok and not p.open, "unbalanced tags"
    assert "script" not in p.tags and not p.links  # nothing external, nothing executable
    assert len(p.imgs) >= 2 + 4 + 4  # distance strip, histograms, real and synthetic montages
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 100
        Image.open(io.BytesIO(png)).verify()
        im = Image.open(io.BytesIO(png))
        px = np.asarray(im)
        assert im.width > 50 and im.height > 50 and px.std() > 5, "image is empty"
    for sid in GOOD + list(BAD):
        assert f"{sid}.nii.gz" in text
    assert "possible_copy" in text and "frechet_distance_radiomics" in text


def test_montage_orientation_and_aspect():
    """Axial slices show anterior up and patient right on the image left, whatever the voxel order;
    pixels are square in millimetres."""
    from medsynth.qc.report import orthogonal_slices

    shape, sp = (20, 30, 10), (2.0, 1.0, 3.0)
    ras = np.zeros(shape, np.float32)
    ras[15:, :, :] = 1000.0          # patient right (high i in RAS)
    ras[:, 25:, :] += 500.0          # anterior
    aff = affine_from_spacing(sp, shape, "RAS")
    ax, cor, sag = orthogonal_slices(ras, aff, (0.0, 1500.0), min_size=1)
    assert ax.shape == (30, 40) and cor.shape == (30, 40) and sag.shape == (30, 30)  # mm / 1 mm pixels
    assert ax[:, :5].mean() > ax[:, -5:].mean()   # right side on the image left
    assert ax[:3, 20:25].mean() > ax[-3:, 20:25].mean()  # anterior at the top
    # the same anatomy stored LPS with the matching affine gives the same pictures
    lps = ras[::-1, ::-1, :].copy()
    aff_lps = affine_from_spacing(sp, shape, "LPS")
    for a, b in zip(orthogonal_slices(lps, aff_lps, (0.0, 1500.0), min_size=1), (ax, cor, sag)):
        assert np.array_equal(a, b)


def test_png_writer_roundtrip():
    from PIL import Image

    from medsynth.qc.report import png_bytes

    g = (np.arange(12 * 7) % 256).astype(np.uint8).reshape(12, 7)
    rgb = np.stack([g, 255 - g, g // 2], axis=-1)
    for img in (g, rgb):
        back = np.asarray(Image.open(io.BytesIO(png_bytes(img))))
        assert np.array_equal(back, img)


def test_config_grid_and_holdout_manifest(world, run_cli, tmp_path, repo_root):
    """--config gives the grid (that of configs/demo.yaml) and --holdout the calibration set."""
    from medsynth.config import load_config

    demo = load_config(repo_root / "configs" / "demo.yaml").data
    dcfg = DataConfig(shape=demo.shape, spacing=demo.spacing, orientation=demo.orientation, cache="none")
    aff = target_affine(dcfg)
    hold = write_phantoms(tmp_path / "hold", 2, seed=3, **PHANTOM)
    gen = write_phantoms(tmp_path / "gen", 2, seed=4, **PHANTOM)
    arrs = resample_cases(load_manifest(gen).cases, dcfg).arrays
    sd = tmp_path / "samples"
    sd.mkdir()
    for i, a in enumerate(arrs):
        _write(sd, f"synth-c-{i:05d}", a, aff, index=i)
    ref = load_manifest(world["ref"])
    ref.cases = ref.cases[:4]
    small_ref = save_manifest(ref, tmp_path / "ref4.json")
    code, _out, err = run_cli("--no-progress", "qc", sd, "--reference", small_ref, "--out", tmp_path / "qc",
                             "--config", repo_root / "configs" / "demo.yaml", "--holdout", hold, "--no-quarantine")
    assert code == 0, err
    s = json.loads((tmp_path / "qc" / "qc.json").read_text())
    assert s["grid"]["shape"] == list(demo.shape) and s["grid"]["spacing"] == list(demo.spacing)
    assert "demo.yaml" in s["grid"]["source"] and s["grid"]["analysis_window"] == [-1000.0, 1000.0]
    cal = s["memorisation"]["calibration"]
    assert cal["mode"] == "holdout_manifest" and cal["n_heldout"] == 2 and cal["n_train"] == 4
    assert s["counts"]["samples"] == 2 and not (sd / "quarantine").exists()
    assert all((sd / f"synth-c-{i:05d}.qc.json").is_file() for i in range(2))


def test_unreadable_reference_case_is_skipped(world, run_cli, tmp_path):
    ref = load_manifest(world["ref"])
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"garbage")
    ref.cases = ref.cases[:3] + [ref.cases[3].__class__(id="bad-case", image=broken)]
    man = save_manifest(ref, tmp_path / "ref.json")
    sd = tmp_path / "samples"
    shutil.copytree(world["samples"], sd, ignore=shutil.ignore_patterns("quarantine"))
    code, _out, err = run_cli("--no-progress", "qc", sd, "--reference", man, "--out", tmp_path / "qc", "--no-quarantine")
    assert code == 0, err
    s = json.loads((tmp_path / "qc" / "qc.json").read_text())
    assert s["reference"]["n_cases_skipped"] == 1 and s["reference"]["skipped"][0]["id"] == "bad-case"
    assert "bad-case" in err  # the log names the case, never patient data


@pytest.mark.parametrize("case", ["missing_reference", "too_few_reference", "no_samples", "run_without_config",
                                  "config_and_run"])
def test_bad_inputs_fail_cleanly(case, world, run_cli, tmp_path):
    sd, ref = world["samples"], world["ref"]
    args = ["qc", sd, "--reference", ref, "--out", tmp_path / "qc"]
    if case == "missing_reference":
        args[3] = tmp_path / "nope.json"
        expect, msg = 3, "manifest not found"
    elif case == "too_few_reference":
        m = load_manifest(ref)
        m.cases = m.cases[:2]
        args[3] = save_manifest(m, tmp_path / "two.json")
        # both cases were read: the message says the reference is too small, not that reading failed
        expect, msg = 7, "two.json: the reference has 2 case(s); the quality gate needs at least 3"
    elif case == "no_samples":
        (tmp_path / "empty").mkdir()
        args[1] = tmp_path / "empty"
        expect, msg = 7, "holds no medsynth samples"
    elif case == "run_without_config":
        (tmp_path / "run").mkdir()
        args += ["--run", tmp_path / "run"]
        expect, msg = 7, "no config.yaml in the run directory"
    else:
        args += ["--run", tmp_path, "--config", tmp_path / "c.yaml"]
        with pytest.raises(SystemExit) as ei:
            run_cli(*args)
        assert ei.value.code == 2
        return
    code, _out, err = run_cli(*args)
    assert code == expect and msg in err, (code, err)
    assert "Traceback" not in err


def test_too_few_readable_reference_cases_says_how_many_were_read(world, run_cli, tmp_path):
    ref = load_manifest(world["ref"])
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"garbage")
    ref.cases = ref.cases[:2] + [ref.cases[2].__class__(id="bad-case", image=broken)]
    man = save_manifest(ref, tmp_path / "ref.json")
    code, _out, err = run_cli("--no-progress", "qc", world["samples"], "--reference", man, "--out", tmp_path / "qc")
    assert code == 7 and "only 2 of 3 reference cases could be read; the quality gate needs at least 3" in err
    assert "fix the unreadable cases" in err and "Traceback" not in err


def test_damaged_samples_fail_or_are_reported_and_the_others_are_judged(world, run_cli, tmp_path):
    """One bad sample never sinks QC: a damaged sidecar is reported (no verdict, so export refuses
    it), a sidecar naming another folder's file or an unknown modality fails that sample only."""
    sd = tmp_path / "samples"
    shutil.copytree(world["samples"], sd, ignore=shutil.ignore_patterns("quarantine", "*.qc.json"))
    (sd / f"{GOOD[1]}.json").write_text('{"format": "medsynth-sample/1", "id": "syn')  # cut short
    side = json.loads((sd / f"{GOOD[2]}.json").read_text())
    (sd / f"{GOOD[2]}.json").write_text(json.dumps({**side, "image": "../../elsewhere.nii.gz"}))
    side = json.loads((sd / f"{GOOD[3]}.json").read_text())
    (sd / f"{GOOD[3]}.json").write_text(json.dumps({**side, "modality": "PET"}))
    code, _out, err = run_cli("--no-progress", "qc", sd, "--reference", world["ref"], "--out", tmp_path / "qc",
                              "--no-quarantine")
    assert code == 0, err
    summary = json.loads((tmp_path / "qc" / "qc.json").read_text())
    assert summary["counts"]["unreadable_sidecars"] == 2
    assert any(f"{GOOD[1]}.json: not a readable sample sidecar" in m for m in summary["unreadable_sidecars"])
    assert any(f"{GOOD[2]}.json: 'image' must name a file beside the sidecar" in m
               for m in summary["unreadable_sidecars"])
    assert f"{GOOD[1]}.json" in err and "Traceback" not in err
    by_id = {e["id"]: e for e in summary["samples"]}
    assert GOOD[1] not in by_id and GOOD[2] not in by_id
    assert not (sd / f"{GOOD[1]}.qc.json").exists() and not (sd / f"{GOOD[2]}.qc.json").exists()
    pet = by_id[GOOD[3]]
    assert pet["passed"] is False and pet["reasons"][0].startswith("unreadable_image (") and "'PET'" in pet["reasons"][0]
    assert by_id[GOOD[0]]["passed"] is True


def _claims_17_gb(path) -> None:
    """The fuzzer's out-of-memory input, rebuilt: a .nii.gz of a few hundred bytes whose header says
    2060 x 516 x 16385 uint8 voxels (17 GB).  nibabel allocated all of it before failing (71 s, 17 GB)."""
    import gzip

    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2060, 516, 16385))
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 352
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 1024))


def test_header_claiming_more_voxels_than_the_file_holds_is_refused_at_once(tmp_path):
    import time

    from medsynth.volume import check_voxel_bytes
    from medsynth.errors import ImageReadError

    bomb = tmp_path / "bomb.nii.gz"
    _claims_17_gb(bomb)
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError, match=r"bomb.nii.gz: the header claims 2060 x 516 x 16385 voxels of uint8 "
                                             r"\(17,416,599,952 bytes\), more than this [0-9,]+-byte file can hold"):
        check_voxel_bytes(bomb)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ImageReadError, match=r"bomb.nii.gz: the header claims"):  # every NIfTI read checks first
        Volume.load_nifti(bomb)
    # an uncompressed file cut short is refused exactly; whole files, gzipped or not, pass
    good = Volume(np.zeros((8, 8, 8), np.float32), np.eye(4)).save_nifti(tmp_path / "good.nii")
    check_voxel_bytes(good)
    check_voxel_bytes(Volume(np.zeros((8, 8, 8), np.float32), np.eye(4)).save_nifti(tmp_path / "good.nii.gz"))
    (tmp_path / "cut.nii").write_bytes(good.read_bytes()[:-1])
    with pytest.raises(ImageReadError,
                       match=r"claims 8 x 8 x 8 voxels of float32 \(2,400 bytes\), more than this 2,399-byte file"):
        check_voxel_bytes(tmp_path / "cut.nii")


def test_qc_judges_a_sample_with_a_bomb_header_unreadable(world, run_cli, tmp_path):
    sd = tmp_path / "samples"
    shutil.copytree(world["samples"], sd, ignore=shutil.ignore_patterns("quarantine", "*.qc.json"))
    _claims_17_gb(sd / f"{GOOD[2]}.nii.gz")
    code, _out, err = run_cli("--no-progress", "qc", sd, "--reference", world["ref"], "--out", tmp_path / "qc",
                              "--no-quarantine")
    assert code == 0, err
    verdict = json.loads((sd / f"{GOOD[2]}.qc.json").read_text())
    assert verdict["passed"] is False and verdict["reasons"][0].startswith("unreadable_image (")
    assert "more than this" in verdict["reasons"][0]


def test_the_gate_judges_a_samples_labels_against_its_class(tmp_path):
    """`medsynth qc` end to end with a labelled, two-class reference: a class-1 sample whose lesion
    label is gone fails ``class_label_missing``, the same sample with its lesion passes that check,
    and qc.json records the rule learned per class."""
    from medsynth.qc.gate import run_qc

    dcfg = DataConfig(shape=(N, N, N), spacing=(320 / N,) * 3, orientation="RAS", cache="none")
    aff = target_affine(dcfg)
    ref = write_phantoms(tmp_path / "ref", 16, seed=1, **PHANTOM)
    gen = resample_cases(load_manifest(write_phantoms(tmp_path / "gen", 2, seed=2, **PHANTOM)).cases, dcfg,
                         with_labels=True)
    sd = tmp_path / "samples"
    sd.mkdir()
    arr, lab = gen.arrays[1], gen.labels[1].astype(np.uint8)      # phantom 1: class 1, with a lesion
    assert (lab == 2).any()
    for sid, lb in (("synth-c-00001", lab), ("synth-c-00003", np.where(lab == 2, 1, lab).astype(np.uint8))):
        write_sample(sd, sid, Volume(np.asarray(arr, np.float32), aff),
                     {"index": 1, "seed": 0, "class": 1}, label=Volume(lb, aff, modality="SEG", units="label"))
    run_qc(sd, ref, tmp_path / "qc", quarantine=False)
    summary = json.loads((tmp_path / "qc" / "qc.json").read_text())
    by_id = {s["id"]: s for s in summary["samples"]}
    assert not any(r.startswith("class_label") for r in by_id["synth-c-00001"]["reasons"])
    assert any(r.startswith("class_label_missing (class 1: label 2 is in 8 of 8 reference cases")
               for r in by_id["synth-c-00003"]["reasons"]), by_id["synth-c-00003"]["reasons"]
    rules = summary["reference_ranges"]["class_labels"]
    assert rules["1"]["required"] == [1, 2] and rules["0"]["forbidden"] == [2]
