"""Per-volume QC checks on crafted good and bad volumes, features and dataset metrics.

Real volumes are built-in CT phantoms resampled onto a 24^3 grid (13.3 mm) with medsynth's MONAI
chain; bad volumes are crafted from them (NaN, constant, out of range, wrong geometry, body and
intensity out of the learned range, checkerboard, tiling seams, label outside the body).
"""

import numpy as np
import pytest

from medsynth.config import DataConfig, QCConfig
from medsynth.data.phantoms import write_phantoms
from medsynth.data.transforms import target_affine
from medsynth.manifest import load_manifest
from medsynth.qc.checks import (
    Grid,
    artefact_score,
    check_volume,
    checkerboard_score,
    learn_ranges,
    seam_score,
    volume_stats,
)
from medsynth.qc.features import FEATURE_NAMES, body_mask, radiomics_features
from medsynth.qc.gate import resample_cases
from medsynth.volume import Volume, affine_from_spacing

N = 24
PHANTOM = {"shape": (48, 48, 36), "spacing": (6.67, 6.67, 9.33)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc_checks")
    dcfg = DataConfig(shape=(N, N, N), spacing=(320 / N,) * 3, orientation="RAS", cache="none")
    grid = Grid((N, N, N), target_affine(dcfg))
    ref = load_manifest(write_phantoms(root / "ref", 6, seed=1, **PHANTOM))
    gen = load_manifest(write_phantoms(root / "gen", 3, seed=2, **PHANTOM))
    r = resample_cases(ref.cases, dcfg)
    ref_arr, skipped = r.arrays, r.skipped
    gen_arr = resample_cases(gen.cases, dcfg).arrays
    assert not skipped
    qc = QCConfig()
    stats = [volume_stats(a, body_mask(a, grid.affine, "CT"), "CT") for a in ref_arr]
    return {"grid": grid, "ref": ref_arr, "gen": gen_arr, "qc": qc, "ranges": learn_ranges(stats, qc),
            "label": load_manifest(gen.path).cases[0].label, "dcfg": dcfg}


def _vol(a, grid, **kw):
    return Volume(np.asarray(a, dtype=np.float32), grid.affine, modality="CT", units="HU", **kw)


def _check(data, arr, **kw):
    return check_volume(_vol(arr, data["grid"]), data["grid"], data["qc"], data["ranges"], **kw)


def _codes(res):
    return [r.split(" ")[0] for r in res.reasons]


def test_genuine_volumes_pass(data):
    for a in data["gen"] + data["ref"]:
        res = _check(data, a)
        assert res.passed, res.reasons
        assert res.artefact["score"] < data["qc"].artefact_threshold
        assert all(c["passed"] for c in res.checks.values())
        assert 0.2 < res.stats["body_fraction"] < 0.8


def test_non_finite(data):
    a = data["gen"][0].copy()
    a[3, 4, 5], a[6, 7, 8] = np.nan, np.inf
    res = _check(data, a)
    assert _codes(res) == ["non_finite_values"]
    assert "2 of 13824 voxels are NaN or infinite" in res.reasons[0]


def test_constant(data):
    res = _check(data, np.full((N, N, N), -1000.0))
    assert _codes(res) == ["constant_volume"]


def test_out_of_physical_range(data):
    low = data["gen"][0].copy()
    low[0, 0, 0] = -2000.0
    high = data["gen"][1].copy()
    high[10:12, 10:12, 10:12] = 5000.0
    assert "out_of_physical_range" in _codes(_check(data, low))
    res = _check(data, high)
    assert "out_of_physical_range" in _codes(res)
    assert "5000" in res.reasons[0] and "3071" in res.reasons[0]
    # integer rounding exactly on the limits is fine
    edge = np.clip(data["gen"][2], -1024, 3071)
    edge[0, 0, 0], edge[1, 1, 1] = -1024, 3071
    assert "out_of_physical_range" not in _codes(_check(data, edge))


def test_wrong_geometry(data):
    grid, qc = data["grid"], data["qc"]
    small = Volume(data["gen"][0][:, :, :20].astype(np.float32), grid.affine)
    res = check_volume(small, grid, qc, data["ranges"])
    assert res.reasons[0].startswith("geometry_mismatch (shape [24, 24, 20] != configured [24, 24, 24])")
    other = Volume(data["gen"][0].astype(np.float32), affine_from_spacing((12.0, 12.0, 12.0), (N, N, N), "RAS"))
    res = check_volume(other, grid, qc, data["ranges"])
    assert _codes(res)[0] == "geometry_mismatch" and "spacing [12.0, 12.0, 12.0]" in res.reasons[0]
    lps = Volume(data["gen"][0].astype(np.float32), affine_from_spacing(grid.spacing, (N, N, N), "LPS"))
    res = check_volume(lps, grid, qc, data["ranges"])
    assert "orientation LPS" in res.reasons[0] and "RAS" in res.reasons[0]


def test_body_fraction_out_of_range(data):
    a = data["gen"][0].copy()
    a[:, :8, :] = -1000.0  # most of the body replaced by air
    a[:, 16:, :] = -1000.0
    res = _check(data, a)
    bf = [r for r in res.reasons if r.startswith("body_fraction_out_of_range")]
    assert bf, res.reasons
    lo, hi = data["ranges"].ranges["body_fraction"]
    assert f"[{lo:.3g}, {hi:.3g}]" in bf[0]


def test_intensity_percentiles_out_of_range(data):
    a = data["gen"][1].copy()
    body = body_mask(a, data["grid"].affine, "CT")
    a[body] += 300.0
    res = _check(data, a)
    assert "body_p50_out_of_range" in _codes(res)


def test_background_out_of_range(data):
    a = data["gen"][2].copy()
    body = body_mask(a, data["grid"].affine, "CT")
    a[~body] = -700.0  # haze instead of air around the patient
    res = _check(data, a)
    assert "background_fraction_out_of_range" in _codes(res)


def test_no_body(data):
    rng = np.random.default_rng(0)
    res = _check(data, -1000.0 + rng.normal(0, 5, (N, N, N)))
    assert "no_body_found" in _codes(res)


def test_checkerboard_flagged(data):
    i, j, k = np.indices((N, N, N))
    for pattern in ((-1.0) ** (i + j + k), (-1.0) ** i, (-1.0) ** (j + k)):
        a = data["gen"][0] + 100.0 * pattern
        res = _check(data, a)
        assert "artefact_suspected" in _codes(res), res.artefact
        assert "checkerboard" in next(r for r in res.reasons if r.startswith("artefact"))


def test_tiling_seams_flagged(data):
    i, j, k = np.indices((N, N, N))
    # tiled decoding with 8-voxel tiles whose intensity offsets differ: step discontinuities every 8 voxels
    offsets = 120.0 * (-1.0) ** (i // 8 + j // 8 + k // 8)
    for a in data["gen"]:
        res = _check(data, a + offsets)
        art = [r for r in res.reasons if r.startswith("artefact_suspected")]
        assert art and "tiling seam" in art[0], res.artefact
        assert res.artefact["seam_plane"] in (7, 15)
    # stripes along one axis only
    res = _check(data, data["gen"][1] + 150.0 * (-1.0) ** (k // 8))
    assert res.artefact["kind"] == "tiling_seam" and res.artefact["seam_axis"] == 2
    assert "artefact_suspected" in _codes(res)


def test_artefact_scores_bounded_and_low_on_smooth_volumes(data):
    from scipy import ndimage

    for a in data["ref"]:
        sm = ndimage.gaussian_filter(a, 0.8)  # decoder-like smoothness, no noise
        m = body_mask(sm, data["grid"].affine, "CT")
        s = artefact_score(sm, m)
        assert 0.0 <= s["score"] < data["qc"].artefact_threshold, s
        assert 0.0 <= seam_score(sm, m)[0] < 1.0 and 0.0 <= checkerboard_score(sm, m)[0] <= 1.0


def test_label_inside_and_outside_body(data):
    grid = data["grid"]
    a = data["gen"][0]
    body = body_mask(a, grid.affine, "CT")
    inside = np.zeros((N, N, N), np.uint8)
    inside[body & (a < -500)] = 1  # lungs
    res = _check(data, a, label=Volume(inside, grid.affine, modality="SEG", units="label"))
    assert res.passed and res.checks["label_outside_body"]["value"] == 0.0
    outside = inside.copy()
    outside[~body] = 2  # labels painted into the air
    res = _check(data, a, label=Volume(outside, grid.affine, modality="SEG", units="label"))
    lab = [r for r in res.reasons if r.startswith("label_outside_body")]
    assert lab and "lie outside the body" in lab[0]
    shifted = Volume(inside, affine_from_spacing((10.0,) * 3, (N, N, N), "RAS"), modality="SEG", units="label")
    assert "label_geometry_mismatch" in _codes(_check(data, a, label=shifted))


def test_lesion_intensity_inside_its_label_is_judged_against_the_reference(tmp_path):
    """Reference label maps teach the median HU inside each label (lung, lesion); a sample whose
    lesion label sits on tissue of the wrong density fails label_2_p50_out_of_range."""
    dcfg = DataConfig(shape=(N, N, N), spacing=(320 / N,) * 3, orientation="RAS", cache="none")
    grid = Grid((N, N, N), target_affine(dcfg))
    # lesion phantoms only (class 1: every other case), so every case has label 2
    cases = [c for c in load_manifest(write_phantoms(tmp_path / "p", 14, seed=4, **PHANTOM)).cases
             if c.class_label == 1]
    r = resample_cases(cases, dcfg, with_labels=True)
    arrs, skipped, labels = r.arrays, r.skipped, r.labels
    assert not skipped and len(labels) == len(arrs) and all(lab is not None for lab in labels)
    stats = [volume_stats(a, body_mask(a, grid.affine, "CT"), "CT", lab) for a, lab in zip(arrs, labels)]
    qc = QCConfig()
    ranges = learn_ranges(stats[:-1], qc)
    assert {"label_1_p50", "label_2_p50"} <= set(ranges.ranges)
    lo, hi = ranges.ranges["label_2_p50"]
    assert lo > -400 and hi < 400  # soft-tissue lesion, well away from the lung's -850 HU

    a, lab = arrs[-1], labels[-1]
    lab_vol = Volume(lab.astype(np.uint8), grid.affine, modality="SEG", units="label")
    res = check_volume(_vol(a, grid), grid, qc, ranges, label=lab_vol)
    assert res.checks["label_2_p50_out_of_range"]["passed"], res.reasons
    assert res.checks["label_1_p50_out_of_range"]["passed"], res.reasons
    # the same lesion label over air-filled lung: implausible lesion HU
    bad = a.copy()
    bad[lab == 2] = -850.0
    res = check_volume(_vol(bad, grid), grid, qc, ranges, label=lab_vol)
    reason = [r for r in res.reasons if r.startswith("label_2_p50_out_of_range")]
    assert not res.passed and reason and "inside label 2" in reason[0]
    # a sample without a lesion label (class 0) is not judged on label 2
    no_lesion = np.where(lab == 2, 1, lab).astype(np.uint8)
    res = check_volume(_vol(a, grid), grid, qc, ranges,
                       label=Volume(no_lesion, grid.affine, modality="SEG", units="label"))
    assert "label_2_p50_out_of_range" not in res.checks


def test_learned_range_has_a_floor():
    same = [{"body_fraction": 0.4, "background_fraction": 0.5, "body_p01": -900.0, "body_p50": 40.0,
             "body_p99": 800.0}] * 3
    r = learn_ranges(same, QCConfig(range_floor=0.02, percentile_margin=0.25))
    assert r.ranges["body_fraction"] == pytest.approx((0.38, 0.42))
    assert r.ranges["body_p50"] == pytest.approx((40.0 - 0.02 * 1700.0, 40.0 + 0.02 * 1700.0))
    wide = learn_ranges([{**same[0], "body_fraction": 0.2}, same[0]], QCConfig(percentile_margin=0.25))
    assert wide.ranges["body_fraction"] == pytest.approx((0.15, 0.45))


def test_radiomics_features_are_finite_and_sane(data):
    f = radiomics_features(data["ref"][0], data["grid"].affine, "CT", intensity_range=(-1000.0, 1000.0))
    assert list(f) == list(FEATURE_NAMES)
    assert all(np.isfinite(v) for v in f.values())
    assert 200 < f["extent_r_mm"] <= 320 and 0.0 < f["glcm_homogeneity"] <= 1.0
    assert f["int_p01"] < -800 and -100 < f["int_p50"] < 100  # lung and soft tissue in HU
    empty = radiomics_features(np.full((N, N, N), -1000.0), data["grid"].affine, "CT")
    assert empty["body_fraction"] == 0.0 and np.isnan(empty["int_mean"])


def test_network_features_from_local_checkpoint(tmp_path, data):
    """A MedicalNet-style checkpoint (state_dict with 'module.' prefixes) loads offline, strictly."""
    import torch
    from monai.networks.nets import resnet10

    from medsynth.errors import QCError
    from medsynth.qc.features import NetworkFeatures

    torch.manual_seed(0)
    net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B", bias_downsample=False)
    ck = tmp_path / "resnet_10_23dataset.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, ck)
    nf = NetworkFeatures(ck, "resnet10")
    a = data["ref"][0]
    feats = nf([a, data["ref"][1]], [body_mask(a, data["grid"].affine, "CT")] * 2)
    assert feats.shape == (2, 512) and np.all(np.isfinite(feats))
    with pytest.raises(QCError, match="not a resnet18 checkpoint"):
        NetworkFeatures(ck, "resnet18")
    with pytest.raises(QCError, match="not found"):
        NetworkFeatures(tmp_path / "missing.pth")


def test_msssim_settings_fit_monai_minimum_size():
    import torch
    from monai.metrics import MultiScaleSSIMMetric

    from medsynth.qc.metrics import msssim_settings

    assert msssim_settings((24, 24, 24)).kernel_size == 5
    assert len(msssim_settings((32, 32, 32)).weights) == 3 and msssim_settings((32, 32, 32)).kernel_size == 7
    assert len(msssim_settings((64, 64, 64)).weights) == 4
    assert len(msssim_settings((200, 200, 200)).weights) == 5 and msssim_settings((200,) * 3).kernel_size == 11
    assert msssim_settings((8, 8, 8)) is None
    for shape in ((16, 16, 16), (24, 24, 24), (32, 32, 32), (32, 32, 24)):
        st = msssim_settings(shape)
        assert abs(sum(st.weights) - 1.0) < 1e-9
        m = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=st.kernel_size,
                                 kernel_sigma=st.kernel_sigma, weights=st.weights)
        x = torch.rand(1, 1, *shape)
        assert float(m(x, x).mean()) == pytest.approx(1.0, abs=1e-4)  # MONAI accepts the settings


def test_distribution_metrics_respond_to_shift_and_collapse():
    from medsynth.qc.metrics import frechet_distance, mmd2_rbf, prdc

    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 6))
    same = rng.normal(size=(40, 6))
    moved = rng.normal(size=(40, 6)) + 2.0
    collapsed = np.repeat(real[:1], 40, axis=0) + rng.normal(0, 1e-3, (40, 6))
    assert abs(mmd2_rbf(real, same)) < 0.05 < mmd2_rbf(real, moved)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(real, same) < 2.0 < frechet_distance(real, moved)
    good, bad = prdc(real, same, 5), prdc(real, collapsed, 5)
    assert good["precision"] > 0.7 and good["recall"] > 0.7 and good["coverage"] > 0.7
    assert bad["recall"] < 0.1 and bad["coverage"] < good["coverage"] - 0.3
    assert prdc(real[:1], same, 5) is None and mmd2_rbf(real[:1], same) is None


def test_mr_volumes_use_otsu_body_and_optional_range(data):
    """MR has no absolute units: the body comes from Otsu's threshold and the physical range is
    only checked when qc.mr_range is set."""
    grid = data["grid"]
    # an MR-like volume: positive intensities, dark air and lungs, bright soft tissue
    mr = np.clip((data["gen"][0] + 1000.0) * 0.4, 0.0, None) + 5.0
    vol = Volume(mr.astype(np.float32), grid.affine, modality="MR", units="a.u.")
    m = body_mask(mr, grid.affine, "MR")
    assert 0.2 < m.mean() < 0.8
    res = check_volume(vol, grid, QCConfig())
    assert res.passed, res.reasons
    assert "out_of_physical_range" not in res.checks
    res = check_volume(vol, grid, QCConfig(mr_range=(0.0, 100.0)))
    assert "out_of_physical_range" in _codes(res)


def test_a_body_wall_one_voxel_thick_keeps_the_lung_inside_the_body():
    """The opening that drops noise specks must not open a thin body wall: a lung behind a wall of
    one voxel (fat on a 10 mm grid) is filled into the body, so its label is not 'outside'."""
    arr = np.full((24, 24, 8), -1000.0, np.float32)
    arr[4:20, 4:20] = -100.0            # body: fat ...
    arr[5:19, 5:14] = -860.0            # ... a wall of one voxel around a lung on three sides
    arr[4:20, 14:20] = 40.0             # the back: muscle, several voxels thick
    arr[0, 0, 0] = 40.0                 # a noise speck in the air
    mask = body_mask(arr, np.eye(4), "CT")
    assert mask[4:20, 4:20].all() and mask.sum() == 16 * 16 * 8 and not mask[0, 0, 0]


_DEMO_GRID = ((32, 32, 24), (10.0, 10.0, 14.0), (-1000.0, 1000.0))  # shape, spacing, HU window


def _demo_grid_case(seed, i):
    from medsynth.data.phantoms import make_phantom

    shape, spacing, _ = _DEMO_GRID
    return make_phantom(seed * 100003 + i, shape, spacing, lesion=bool(i % 2))[:2]


def _demo_grid_reference(n, qc):
    """Per-case statistics of the first ``n`` demo-grid phantoms of seed 0 (the demo's own)."""
    window, ref = _DEMO_GRID[2], []
    for i in range(n):
        img, lab = _demo_grid_case(0, i)
        a = np.clip(img.array.astype(np.float64), *window)
        ref.append(volume_stats(a, body_mask(a, img.affine, "CT", qc.body_threshold_hu), "CT", lab.array))
    return ref


def _held_out_passing(qc, ranges, what):
    """How many of 40 real phantoms of seed 7 (never in a reference) pass the gate with ``ranges``."""
    shape, _, window = _DEMO_GRID
    grid = Grid(shape, _demo_grid_case(0, 0)[0].affine)
    verdicts = []
    for i in range(40):
        img, lab = _demo_grid_case(7, i)
        vol = Volume(img.array.astype(np.float32), img.affine, modality="CT", units="HU")
        verdicts.append(check_volume(vol, grid, qc, ranges, label=lab, window=window))
    n_pass = sum(v.passed for v in verdicts)
    print(f"\n[gate] held-out real phantoms passing {what}: {n_pass} of 40; "
          f"{sorted(r.split(' ')[0] for v in verdicts for r in v.reasons)}")
    return n_pass


def test_held_out_real_phantoms_on_the_demo_grid_pass_the_gate():
    """Issue 15's bar for the gate: >= 95 % of real phantoms it never saw pass it (40 of another seed
    judged against the demo's 32).  Before the body mask kept thin walls, 14 of 40 passed
    (label_outside_body 26: the opening broke one-voxel body walls and lungs leaked out)."""
    qc = QCConfig()
    ranges = learn_ranges(_demo_grid_reference(32, qc), qc)
    assert set(ranges.trimmed.values()) == {0}  # 32 cases: the whole min..max
    assert _held_out_passing(qc, ranges, "against 32") >= 38


def test_a_large_reference_is_trimmed_so_one_atypical_case_does_not_open_a_range():
    """Two of the first 128 demo-grid phantoms have body p99 ~350 HU (too few cortex voxels for the
    99th percentile to reach bone): with their min..max the gate allowed body p99 from ~65 HU, i.e.
    samples without bone.  ``qc.range_trim`` (floor(0.025 x 128) = 3 cases at each end) keeps the
    range near the 32-case one, held-out real phantoms still pass >= 95 %, a boneless one fails."""
    qc = QCConfig()
    ref = _demo_grid_reference(128, qc)
    assert sum(s["body_p99"] < 500 for s in ref) == 2
    untrimmed = learn_ranges(ref, QCConfig(range_trim=0.0))
    ranges = learn_ranges(ref, qc)
    assert untrimmed.ranges["body_p99"][0] < 100          # what the atypical cases did
    assert ranges.trimmed["body_p99"] == 3 and ranges.to_dict()["trimmed_per_end"]["body_p99"] == 3
    lo, hi = ranges.ranges["body_p99"]
    assert 820 < lo < 900 and 930 < hi < 980
    assert _held_out_passing(qc, ranges, "against 128 (trimmed)") >= 38
    shape, _, window = _DEMO_GRID
    grid = Grid(shape, _demo_grid_case(0, 0)[0].affine)
    img, lab = _demo_grid_case(7, 0)
    boneless = np.where(img.array > 300, 40.0, img.array).astype(np.float32)
    res = check_volume(Volume(boneless, img.affine, modality="CT", units="HU"), grid, qc, ranges, label=lab,
                       window=window)
    assert "body_p99_out_of_range" in _codes(res)
    res = check_volume(Volume(boneless, img.affine, modality="CT", units="HU"), grid, qc, untrimmed, label=lab,
                       window=window)
    assert "body_p99_out_of_range" not in _codes(res)   # the untrimmed range let it through


def test_a_sample_must_hold_the_labels_its_class_holds_in_the_reference():
    """A class-1 ("lesion") sample without a lesion label is a wrong label for the model trained on
    the exported set (the demo's samples: every QC-passed class-1 sample of session 11 had none), and
    a class-0 sample with one is the converse.  The rule is learned per class from the reference's
    label maps: held-out real phantoms judged with their class still pass 38 of 40 (as without it)."""
    qc = QCConfig()
    ref = _demo_grid_reference(32, qc)
    ranges = learn_ranges(ref, qc, classes=[i % 2 for i in range(32)])
    rules = ranges.class_labels
    assert rules[0]["required"] == [1] and rules[0]["forbidden"] == [2] and rules[0]["cases"] == 16
    assert rules[1]["required"] == [1, 2] and rules[1]["forbidden"] == []
    assert ranges.to_dict()["class_labels"]["1"]["required"] == [1, 2]
    shape, _, window = _DEMO_GRID
    grid = Grid(shape, _demo_grid_case(0, 0)[0].affine)

    def judge(img, lab, cls):
        return check_volume(Volume(img.array.astype(np.float32), img.affine, modality="CT", units="HU"), grid, qc,
                            ranges, label=lab, window=window, class_label=cls)

    img1, lab1 = _demo_grid_case(7, 1)                      # a real class-1 phantom: passes
    assert (lab1.array == 2).any() and judge(img1, lab1, 1).passed
    no_lesion = Volume(np.where(lab1.array == 2, 1, lab1.array).astype(np.uint8), lab1.affine, modality="SEG")
    res = judge(img1, no_lesion, 1)                         # its lesion labelled as lung
    assert _codes(res) == ["class_label_missing"]
    assert "class 1: label 2 is in 16 of 16 reference cases" in res.reasons[0]
    assert judge(img1, lab1, None).passed                   # no class: not judged
    res = judge(img1, lab1, 0)                              # called class 0 with its lesion
    assert "class_label_unexpected" in _codes(res) and "class_label_missing" not in _codes(res)
    img0, lab0 = _demo_grid_case(7, 0)
    assert judge(img0, lab0, 0).passed and _codes(judge(img0, lab0, 1)) == ["class_label_missing"]
    # held-out real phantoms with their classes: the rule rejects none of them
    n_pass = 0
    for i in range(40):
        img, lab = _demo_grid_case(7, i)
        n_pass += judge(img, lab, i % 2).passed
    assert n_pass >= 38
    # a class with fewer than CLASS_LABEL_MIN_CASES labelled cases, or unlabelled cases, is not judged
    few = learn_ranges(ref[:10], qc, classes=[i % 2 for i in range(10)])
    assert few.class_labels == {}
    unlabelled = [{k: v for k, v in s.items() if not k.startswith("label_")} for s in ref]
    assert learn_ranges(unlabelled, qc, classes=[i % 2 for i in range(32)]).class_labels == {}


def test_the_seam_check_erodes_the_body_in_millimetres_so_real_phantoms_at_5_mm_pass():
    """At the phantoms' native 5 x 5 x 7 mm grid (configs/phantom_64.yaml) the seam check eroded the
    body by two voxels (10 mm), so the layers under a flat chest wall looked like a tiling seam:
    12 of 40 held-out real phantoms failed ``artefact_suspected`` (scores 0.54-0.64). Eroded by
    20 mm (4 voxels here; still 2 at the demo's 10 mm) none does; a planted 8-voxel tiling seam
    still fails. The one-pass erosion equals scipy's iterated one."""
    from scipy import ndimage

    from medsynth.data.phantoms import make_phantom
    from medsynth.qc.checks import _interior, _seam_erosion

    shape, spacing = (64, 64, 48), (5.0, 5.0, 7.0)
    assert _seam_erosion(spacing) == 4 and _seam_erosion((10.0, 10.0, 14.0)) == 2 and _seam_erosion(None) == 2
    scores, planted = [], []
    k = np.indices(shape)[2]
    for i in (1, 3, 6, 7, 10, 19):  # held-out phantoms (seed 7) that failed with the 2-voxel erosion
        img = make_phantom(7 * 100003 + i, shape, spacing, lesion=bool(i % 2))[0]
        a = np.clip(img.array.astype(np.float64), -1000.0, 1000.0)
        m = body_mask(a, img.affine, "CT")
        assert np.array_equal(_interior(m, 4), ndimage.binary_erosion(m, iterations=4))
        assert seam_score(a, m)[0] > QCConfig().artefact_threshold  # the old, voxel-count erosion
        scores.append(artefact_score(a, m, spacing)["score"])
        planted.append(artefact_score(a + 150.0 * (-1.0) ** (k // 8), m, spacing))
    assert max(scores) < QCConfig().artefact_threshold, scores
    assert all(p["kind"] == "tiling_seam" and p["score"] > QCConfig().artefact_threshold for p in planted), planted
