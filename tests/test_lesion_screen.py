"""The lesion-level memorisation screen: a training patient's lesion copied into a new sample is
flagged (noised, mirrored, moved, rescaled in contrast, pasted into another patient), the lesions of
distinct patients are not, a screen that cannot be calibrated fails closed, and `medsynth qc` records
its verdicts, calibration and planted-copy self-test.

Training, hold-out and "genuine" cases are built-in CT phantoms of different seeds on the demo's
grid (32 x 32 x 24 at 10 x 10 x 14 mm), where a lesion is 5-32 voxels.
"""

import json

import numpy as np
import pytest

from medsynth.config import DataConfig, PrivacyConfig
from medsynth.data.phantoms import write_phantoms
from medsynth.data.transforms import target_affine
from medsynth.manifest import load_manifest
from medsynth.privacy.lesion_screen import LesionScreen, find_lesions, lr_axis, plant_lesion_copy
from medsynth.qc.gate import resample_cases
from medsynth.samples import write_sample
from medsynth.volume import Volume

GRID = {"shape": (32, 32, 24), "spacing": (10.0, 10.0, 14.0)}
WINDOW = (-1000.0, 1000.0)
LESION = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lesion_screen")
    dcfg = DataConfig(shape=GRID["shape"], spacing=GRID["spacing"], orientation="RAS", cache="none")
    out = {"root": root, "aff": target_affine(dcfg)}
    for name, n, seed in (("train", 16, 1), ("hold", 10, 3), ("gen", 12, 2)):
        man = write_phantoms(root / name, n, seed=seed, **GRID)
        r = resample_cases(load_manifest(man).cases, dcfg, with_labels=True)
        out[name] = [(i, np.clip(a, *WINDOW).astype(np.float32), lab) for i, a, lab in zip(r.ids, r.arrays, r.labels)]
        out[name + "_manifest"] = man
    return out


def _screen(world, hold=None, **pc):
    cfg = PrivacyConfig(**pc)
    held = [(a, lab) for _, a, lab in (world["hold"] if hold is None else hold)]
    return LesionScreen(LESION, GRID["spacing"], world["aff"], WINDOW[0], world["train"], held, cfg)


def test_find_lesions_are_the_connected_components_largest_first():
    lab = np.zeros((12, 12, 12), np.int32)
    lab[1:3, 1:3, 1:3] = LESION                  # 8 voxels, centroid (1.5, 1.5, 1.5)
    lab[6:9, 6:9, 6:9] = LESION                  # 27 voxels, centroid (7, 7, 7)
    lab[10, 10, 10] = 1                          # another label
    les = find_lesions(lab, LESION)
    assert [x.voxels for x in les] == [27, 8]
    assert les[0].centre == (7, 7, 7) and les[1].centre == (2, 2, 2)
    assert find_lesions(np.zeros_like(lab), LESION) == []


def test_lr_axis_follows_the_affine():
    assert lr_axis(np.diag([-2.0, 2.0, 3.0, 1.0])) == 0
    perm = np.array([[0, 0, 3.0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    assert lr_axis(perm) == 2


def test_copied_lesions_are_flagged_and_name_their_source(world):
    screen = _screen(world)
    cal = screen.calibration
    assert cal.threshold is not None and cal.n_heldout_lesions >= 3 and cal.n_train_lesions >= 6
    rng = np.random.default_rng(0)
    dst_id, dst, dst_lab = world["gen"][0]
    n = 0
    for cid, img, lab in world["train"]:
        les = find_lesions(lab, LESION)
        if not les:
            continue
        for kind in ("noise", "mirror", "shift"):
            pimg, plab = plant_lesion_copy(img, lab, dst, dst_lab, les[0].centre, screen.half, LESION, kind,
                                           screen.axis, rng, WINDOW)
            v = screen.screen(pimg, plab)
            assert v is not None and v.flagged, (cid, kind, v and v.to_dict(), cal.to_dict())
            assert v.reason.startswith("possible_lesion_copy") and cid in v.reason
            hit = [r for r in v.lesions if r["flagged"]]
            assert hit and hit[0]["nearest_training_case"] == cid
            assert hit[0]["mirrored"] == (kind == "mirror")
            n += 1
    assert n >= 18


def test_a_copy_pasted_elsewhere_at_another_contrast_is_flagged(world):
    screen = _screen(world)
    rng = np.random.default_rng(1)
    cid, img, lab = next(t for t in world["train"] if find_lesions(t[2], LESION))
    les = find_lesions(lab, LESION)[0]
    _, dst, dst_lab = world["gen"][1]
    # another place, 0.9x the contrast around -500 HU: NCC ignores gain and offset
    dimmer = np.clip((img + 500.0) * 0.9 - 500.0, *WINDOW)
    at = tuple(c + d for c, d in zip(les.centre, (2, -2, 1)))
    pimg, plab = plant_lesion_copy(dimmer, lab, dst, dst_lab, les.centre, screen.half, LESION, "noise",
                                   screen.axis, rng, WINDOW, at=at)
    v = screen.screen(pimg, plab)
    assert v.flagged and cid in v.reason, v.to_dict()


def test_lesions_of_distinct_patients_are_not_flagged(world):
    screen = _screen(world)
    verdicts = [screen.screen(img, lab) for _, img, lab in world["gen"]]
    with_lesions = [v for v in verdicts if v is not None]
    assert len(with_lesions) >= 5
    flagged = [v.to_dict() for v in with_lesions if v.flagged]
    assert not flagged, (flagged, screen.calibration.to_dict())
    # every distance is recorded with the nearest training case and lesion
    for v in with_lesions:
        for r in v.lesions:
            assert r["distance"] >= screen.calibration.threshold and r["nearest_training_case"].startswith("phantom-")
    # a volume without a lesion label has nothing to screen
    assert screen.screen(world["gen"][0][1], np.zeros(GRID["shape"], np.int32)) is None
    assert screen.screen(world["gen"][0][1], None) is None


def test_a_screen_without_enough_held_out_lesions_fails_closed(world):
    no_lesions = [t for t in world["hold"] if not find_lesions(t[2], LESION)]
    screen = _screen(world, hold=no_lesions)
    assert screen.calibration.threshold is None and screen.calibration.n_heldout_lesions == 0
    _, img, lab = next(t for t in world["gen"] if find_lesions(t[2], LESION))
    v = screen.screen(img, lab)
    assert v.flagged and v.reason.startswith("lesion_screen_cannot_judge") and "held-out" in v.reason
    # samples without lesions are still not judged by it
    assert screen.screen(img, np.zeros_like(lab)) is None


def test_privacy_config_checks_the_lesion_keys():
    errs = PrivacyConfig(lesion_radius_mm=0.0, lesion_max_shift=5, lesion_label=" ").check("privacy")
    assert any("lesion_radius_mm" in e for e in errs)
    assert any("lesion_max_shift" in e for e in errs)
    assert any("lesion_label" in e for e in errs)


def test_qc_fails_a_sample_with_a_copied_lesion_and_records_the_screen(world, run_cli):
    screen = _screen(world)
    sd = world["root"] / "samples"
    sd.mkdir()
    aff = world["aff"]

    def write(sid, img, lab, cls, index):
        write_sample(sd, sid, Volume(img, aff), {"index": index, "seed": index, "class": cls},
                     label=Volume(lab.astype(np.uint8), aff, modality="SEG", units="label"))

    cid, img, lab = next(t for t in world["train"] if find_lesions(t[2], LESION))
    gen_lesion = [t for t in world["gen"] if find_lesions(t[2], LESION)]
    _, dst, dst_lab = gen_lesion[0]
    pimg, plab = plant_lesion_copy(img, lab, dst, dst_lab, find_lesions(lab, LESION)[0].centre, screen.half,
                                   LESION, "mirror", screen.axis, np.random.default_rng(2), WINDOW)
    write("synth-copy-00000", pimg, plab, 1, 0)
    for n, (_, g, glab) in enumerate(gen_lesion[1:3]):
        write(f"synth-gen-{n + 1:05d}", g, glab, 1, n + 1)
    # the training cases are the reference; the hold-out manifest calibrates
    code, out, err = run_cli("qc", str(sd), "--reference", world["train_manifest"], "--holdout",
                        world["hold_manifest"], "--out", str(world["root"] / "qc"), "--no-quarantine")
    assert code == 0, err
    assert "lesion memorisation: 1 of 3 samples with a lesion flagged" in out
    summary = json.loads((world["root"] / "qc" / "qc.json").read_text())
    lm = summary["lesion_memorisation"]
    assert lm["applied"] and lm["label"] == "lesion" and lm["value"] == LESION
    assert lm["calibration"]["threshold"] is not None and lm["n_samples_with_lesions"] == 3
    st = lm["self_test"]
    assert st["planted"] == 6 and st["flagged"] == 6 and st["named_source"] == 6, st
    rows = {r["id"]: r for r in summary["samples"]}
    copy = rows["synth-copy-00000"]
    assert any(r.startswith("possible_lesion_copy") and cid in r for r in copy["reasons"]), copy["reasons"]
    assert copy["lesion_memorisation"]["flagged"]
    for sid in ("synth-gen-00001", "synth-gen-00002"):
        assert not rows[sid]["lesion_memorisation"]["flagged"]
        assert not any("lesion_copy" in r for r in rows[sid]["reasons"])
    html = (world["root"] / "qc" / "report.html").read_text()
    assert "Lesion memorisation screen" in html and "planted lesion copies flagged" in html
    verdict = json.loads((sd / "synth-copy-00000.qc.json").read_text())
    assert verdict["lesion_memorisation"]["flagged"] and not verdict["passed"]


def test_qc_without_a_lesion_label_says_why_the_screen_does_not_apply(world, run_cli, tmp_path):
    from medsynth.manifest import save_manifest

    man = load_manifest(world["train_manifest"])
    man.extra["labels"] = {"background": 0, "lung": 1, "nodule": 2}
    ref = world["root"] / "train" / "renamed.json"
    save_manifest(man, ref)
    sd = tmp_path / "s"
    sd.mkdir()
    _, g, glab = next(t for t in world["gen"] if find_lesions(t[2], LESION))
    write_sample(sd, "synth-x-00000", Volume(g, world["aff"]), {"index": 0, "seed": 0, "class": 1},
                 label=Volume(glab.astype(np.uint8), world["aff"], modality="SEG", units="label"))
    run_cli("qc", str(sd), "--reference", str(ref), "--out", str(tmp_path / "q"), "--no-quarantine")
    lm = json.loads((tmp_path / "q" / "qc.json").read_text())["lesion_memorisation"]
    assert lm["applied"] is False and "'lesion'" in lm["why"]
    assert "Not applied" in (tmp_path / "q" / "report.html").read_text()
