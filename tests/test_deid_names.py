"""De-identification finds a file's own identifiers wherever the Basic Profile keeps values.

A corpus built here with pydicom (and highdicom for the enhanced CT and the SEG) hides the
patient's and staff's names, the site's name and the patient ID in every class of kept value:

* names in other scripts: 'Müller^Zoë' (UTF-8, accents), '山田^太郎=やまだ^たろう' (ideographic and
  phonetic groups), '佐藤^花子' and 'Łukasz^Øster' (letters NFKD keeps whole);
* code sequences: a surname inside a kept item's CodeMeaning (accents stripped, in another case,
  transliterated 'MUELLER', ideographic), a CodeValue holding a name, a private coding scheme
  designator '99MYHOSPITAL' that spells the InstitutionName, its Coding Scheme Identification item;
* overlays: Overlay Description (60xx,0022) and Overlay Label (60xx,1500) with names;
* file meta: Source AE Title, Private Information, Implementation Version Name;
* an enhanced multi-frame CT (code items inside the functional groups) and a SEG (segment label
  and segmented property code) that reference the CT series.

Every output byte is searched for every identifier in every encoding, and everything that already
worked must still work: UID mappings, references, pixel data, enhanced CT geometry, SEG.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from medsynth.privacy.deid import anonymise
from medsynth.privacy.deid_profile import is_curve_or_overlay, load_profile
from medsynth.privacy.idmatch import NormalisedIds, normalise
from medsynth.privacy.phi_scan import iter_files, scan_phi

ROOT = "1.2.826.0.1.3680043.9.7777.17."
ZOE = {"name": "Müller^Zoë", "pid": "PID-4471-ZM", "birth": "19750812", "inst": "My Hospital",
       "referring": "佐藤^花子", "operator": "Łukasz^Øster"}
YAMADA = {"name": "山田^太郎=やまだ^たろう", "pid": "JP-99812", "birth": "19660304", "inst": "東京中央病院",
          "referring": "Yamamoto^Hanako", "operator": "Kato^Ken"}
# What must appear nowhere in the output, as text in any case and in any encoding.
LEAKS = ["Müller", "Muller", "Mueller", "Zoë", "Zoe", "My Hospital", "MyHospital", "PID-4471-ZM", "19750812",
         "佐藤", "花子", "Łukasz", "Lukasz", "Øster", "Oster", "山田", "太郎", "やまだ", "たろう", "JP-99812",
         "19660304", "東京中央病院", "Yamamoto", "Hanako", "Kato", "MYHOSP"]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    it = Dataset()
    it.CodeValue, it.CodingSchemeDesignator, it.CodeMeaning = value, scheme, meaning
    return it


def _ct_slice(p: dict, uids: dict, k: int, n: int, codes: dict[str, list[Dataset]]) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, f"{uids['series']}.{k + 1}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240311"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = "A" + p["pid"][-5:]
    ds.Modality, ds.Manufacturer = "CT", "ACME Medical"
    ds.InstitutionName = p["inst"]
    ds.ReferringPhysicianName = p["referring"]
    ds.OperatorsName = p["operator"]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = p["name"], p["pid"], p["birth"], "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = "S1", 1, k + 1, 1
    ds.PatientPosition, ds.PositionReferenceIndicator = "HFS", ""
    ds.ConvolutionKernel = "B30f"
    ds.FilterType = normalise(p["name"].split("^")[0]).upper()  # a kept value spelling the name, no accents
    ds.KVP, ds.SliceThickness = "120", "2.5"
    ds.ImagePositionPatient = [-4.0, -4.0, 2.5 * k]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    ds.PixelData = (np.arange(64, dtype="<i2").reshape(8, 8) * (k + 1) - 1000).tobytes()
    for kw, items in codes.items():
        setattr(ds, kw, Sequence([Dataset(it) for it in items]))
    if k > 0:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CTImageStorage, f"{uids['series']}.{k}"
        ds.ReferencedImageSequence = Sequence([ref])
    return ds


def _overlays(ds: Dataset) -> None:
    """Two overlay planes whose description and labels name the patient (60xx,0022), (60xx,1500)."""
    for group, label in ((0x6000, "ZOE"), (0x6002, "山田")):
        ds.add_new((group, 0x0010), "US", 8)
        ds.add_new((group, 0x0011), "US", 8)
        ds.add_new((group, 0x0022), "LO", "Müller annotations")
        ds.add_new((group, 0x0040), "CS", "G")
        ds.add_new((group, 0x0050), "SS", [1, 1])
        ds.add_new((group, 0x0100), "US", 1)
        ds.add_new((group, 0x0102), "US", 0)
        ds.add_new((group, 0x1500), "LO", label)
        ds.add_new((group, 0x3000), "OW", b"\xff" * 8)


def _save(ds: Dataset, path: Path, meta_extra: bool = False) -> Path:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    if meta_extra:  # file meta that names the site and the patient
        fm.SourceApplicationEntityTitle = "MYHOSP_PACS"
        fm.ImplementationVersionName = "MYHOSP_1"
        fm.PrivateInformationCreatorUID = ROOT + "99"
        fm.PrivateInformation = "Mueller Zoe PID-4471-ZM".encode()
    ds.file_meta = fm
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_corpus(root: Path) -> dict:
    """Patient Müller: a 4-slice CT series (overlays, file meta), its enhanced CT and a SEG;
    patient 山田: a 3-slice CT series.  Returns the datasets written, by role."""
    import highdicom as hd
    from highdicom.legacy import LegacyConvertedEnhancedCTImage
    from pydicom.sr.codedict import codes as dcm_codes

    zoe_codes = {
        "AnatomicRegionSequence": [_code("T-D3000", "SRT", "Chest"),
                                   _code("MH-77", "99MYHOSPITAL", "Chest, per MUELLER protocol")],
        "ProcedureCodeSequence": [_code("P-1", "99MYHOSPITAL", "CT ZOE MULLER follow-up"),
                                  _code("R-1", "99MYHOSPITAL", "Reviewed by 佐藤")],
        # not copied into the SEG, whose header has no operator: the pass compares a file with its own
        "PerformedProtocolCodeSequence": [_code("ZOE1", "L", "müller"), _code("OP-1", "99MYHOSPITAL", "Oster's protocol")],
    }
    scheme = Dataset()
    scheme.CodingSchemeDesignator = "99MYHOSPITAL"
    scheme.CodingSchemeName = "My Hospital local codes"
    scheme.CodingSchemeResponsibleOrganization = "My Hospital"
    uids = {"study": ROOT + "1", "series": ROOT + "1.1", "frame": ROOT + "1.0"}
    series = []
    for k in range(4):
        ds = _ct_slice(ZOE, uids, k, 4, zoe_codes)
        ds.CodingSchemeIdentificationSequence = Sequence([Dataset(scheme)])
        if k == 0:
            _overlays(ds)
        _save(ds, root / "zoe" / "ct" / f"{k}.dcm", meta_extra=k == 0)
        series.append(pydicom.dcmread(root / "zoe" / "ct" / f"{k}.dcm"))

    enh = LegacyConvertedEnhancedCTImage(series, series_instance_uid=ROOT + "1.3", series_number=3,
                                         sop_instance_uid=ROOT + "1.3.1", instance_number=1)
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = Sequence([_code("MH-78", "99MYHOSPITAL", "Zoë's chest")])
    anatomy.FrameLaterality = "U"
    enh.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = Sequence([anatomy])
    (root / "zoe" / "enhanced").mkdir(parents=True)
    enh.save_as(root / "zoe" / "enhanced" / "mf.dcm")

    mask = np.zeros((4, 8, 8), dtype=bool)
    mask[1:3, 2:6, 2:6] = True
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Zoë Müller lesion",
        segmented_property_category=dcm_codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=hd.sr.CodedConcept("MH-9", "99MYHOSPITAL", "Müller lesion type"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(series, mask, hd.seg.SegmentationTypeValues.BINARY, [segment],
                              series_instance_uid=ROOT + "1.2", series_number=2, sop_instance_uid=ROOT + "1.2.1",
                              instance_number=1, manufacturer="ACME", manufacturer_model_name="seg",
                              software_versions="1", device_serial_number="SN-1")
    (root / "zoe" / "seg").mkdir(parents=True)
    seg.save_as(root / "zoe" / "seg" / "seg.dcm")

    yamada_codes = {
        "AnatomicRegionSequence": [_code("T-A0100", "SRT", "Brain")],
        "ProcedureCodeSequence": [_code("JP-1", "99TCH", "山田様 頭部CT"), _code("JP-2", "99TCH", "やまだ たろう 検査")],
    }
    uids_y = {"study": ROOT + "2", "series": ROOT + "2.1", "frame": ROOT + "2.0"}
    for k in range(3):
        _save(_ct_slice(YAMADA, uids_y, k, 3, yamada_codes), root / "yamada" / f"{k}.dcm")
    return {"series": series, "enhanced": enh, "seg": seg, "mask": mask}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("names")
    made = make_corpus(base / "in")
    key = base / "k"
    key.write_bytes(hashlib.sha256(b"names corpus").digest())
    before = {f: f.read_bytes() for f in iter_files(base / "in")}
    rep = anonymise(base / "in", base / "out", key)
    files = iter_files(base / "in")
    out = {}
    for r in rep.records:
        if r["status"] == "processed":
            out[files[r["index"]].relative_to(base / "in").as_posix()] = pydicom.dcmread(base / "out" / r["output"])
    return {"base": base, "report": rep, "made": made, "out": out, "key": key, "before": before}


def _encodings(needle: str) -> list[bytes]:
    forms = {needle, needle.upper(), needle.lower()}
    out = []
    for f in forms:
        for enc in ("utf-8", "latin-1", "iso2022_jp", "utf-16-le"):
            try:
                out.append(f.encode(enc))
            except UnicodeEncodeError:
                pass
    return out


def test_every_input_is_processed_and_inputs_are_unchanged(corpus):
    rep = corpus["report"]
    assert (rep.processed, rep.quarantined, rep.failed) == (9, 0, 0)
    assert {f: f.read_bytes() for f in iter_files(corpus["base"] / "in")} == corpus["before"]


def test_no_identifier_in_any_script_survives_in_any_byte(corpus):
    leaks = []
    for f in iter_files(corpus["base"] / "out"):
        raw = f.read_bytes()
        rel = f.relative_to(corpus["base"] / "out").as_posix().encode()
        for needle in LEAKS:
            if any(form in raw or form in rel for form in _encodings(needle)):
                leaks.append((f.name, needle))
    assert leaks == []
    assert scan_phi(corpus["base"] / "out", corpus["base"] / "in") == []


def test_code_items_stay_valid_with_identifiers_removed(corpus):
    ct = corpus["out"]["zoe/ct/0.dcm"]
    region = ct.AnatomicRegionSequence
    assert (region[0].CodeValue, region[0].CodingSchemeDesignator, region[0].CodeMeaning) == ("T-D3000", "SRT",
                                                                                              "Chest")
    private = region[1].CodingSchemeDesignator
    assert private.startswith("99MS") and private != "99MYHOSPITAL" and region[1].CodeValue == "MH-77"
    assert region[1].CodeMeaning == "Chest, per protocol"
    proc = ct.ProcedureCodeSequence
    assert [it.CodeMeaning for it in proc] == ["CT follow-up", "Reviewed by"]
    assert {it.CodingSchemeDesignator for it in proc} == {private}  # one scheme, one keyed pseudonym
    perf = ct.PerformedProtocolCodeSequence
    assert perf[0].CodeValue.startswith("MS") and perf[0].CodeMeaning == "ANONYMOUS"
    assert perf[0].CodingSchemeDesignator == "L" and perf[1].CodeMeaning == "'s protocol"
    scheme = ct.CodingSchemeIdentificationSequence[0]
    assert scheme.CodingSchemeDesignator == private
    assert "CodingSchemeName" not in scheme and "CodingSchemeResponsibleOrganization" not in scheme
    assert "FilterType" not in ct and ct.ConvolutionKernel == "B30f"  # a plain kept value goes whole
    # the same private scheme maps alike in every file (and in the SEG and the enhanced CT)
    schemes = {str(e.value) for d in corpus["out"].values() for e in d.iterall()
               if e.keyword == "CodingSchemeDesignator" and str(e.value).startswith("99")}
    assert len(schemes) == 2 and "99MYHOSPITAL" not in schemes and "99TCH" not in schemes
    for d in corpus["out"].values():
        for elem in d.iterall():
            if elem.VR == "SQ":
                for item in elem.value:
                    if "CodeValue" in item:
                        assert item.CodingSchemeDesignator and item.CodeMeaning, elem.keyword


def test_ideographic_and_phonetic_groups_are_matched_on_their_own(corpus):
    ct = corpus["out"]["yamada/0.dcm"]
    assert [it.CodeMeaning for it in ct.ProcedureCodeSequence] == ["様 頭部CT", "検査"]
    assert ct.AnatomicRegionSequence[0].CodeMeaning == "Brain"
    assert ct.PatientName == ct.PatientID and str(ct.PatientID).startswith("MS-")


def test_overlays_go_whole_descriptions_and_labels_included(corpus):
    ct = corpus["out"]["zoe/ct/0.dcm"]
    assert not [e for e in ct if 0x6000 <= e.tag.group <= 0x601E]
    actions = next(r for r in corpus["report"].records if r.get("output") and "(6000,xxxx)" in r["actions"])
    assert actions["actions"]["(6002,xxxx)"] == "X"
    assert is_curve_or_overlay(0x60000022) and is_curve_or_overlay(0x601E1500) and is_curve_or_overlay(0x50003000)
    assert not is_curve_or_overlay(0x60010010) and not is_curve_or_overlay(0x60200022)  # private; not a 60xx plane
    assert load_profile().lookup(0x60024000).basic == "X"  # Overlay Comments: the profile's row behind the rule


def test_file_meta_is_rebuilt_without_the_inputs_values(corpus):
    meta = corpus["out"]["zoe/ct/0.dcm"].file_meta
    assert {e.keyword for e in meta} == {"FileMetaInformationGroupLength", "FileMetaInformationVersion", "MediaStorageSOPClassUID",
                                         "MediaStorageSOPInstanceUID", "TransferSyntaxUID",
                                         "ImplementationClassUID", "ImplementationVersionName"}
    assert meta.ImplementationVersionName.startswith("MEDSYNTH")


def test_uids_references_pixels_enhanced_ct_and_seg_still_agree(corpus):
    import highdicom as hd

    from medsynth.dicom_series import read_series

    out, made = corpus["out"], corpus["made"]
    cts = [out[f"zoe/ct/{k}.dcm"] for k in range(4)]
    sops = [str(d.SOPInstanceUID) for d in cts]
    assert all(s.startswith("2.25.") for s in sops) and len(set(sops)) == 4
    assert len({str(d.SeriesInstanceUID) for d in cts}) == 1
    for k in range(1, 4):
        assert cts[k].ReferencedImageSequence[0].ReferencedSOPInstanceUID == sops[k - 1]
    for d, src in zip(cts, made["series"]):
        assert d.PixelData == src.PixelData
    # enhanced CT: same voxels and geometry as the single-frame series, code item cleaned
    enh = out["zoe/enhanced/mf.dcm"]
    assert enh.NumberOfFrames == 4 and len(enh.PerFrameFunctionalGroupsSequence) == 4
    anatomy = enh.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0].AnatomicRegionSequence[0]
    assert anatomy.CodeMeaning == "'s chest" and anatomy.CodingSchemeDesignator.startswith("99MS")
    outdir = corpus["base"] / "out"
    single = read_series([outdir / r["output"] for r in corpus["report"].records
                          if r.get("output") and str(out_path_sop(outdir / r["output"])) in sops])
    multi = read_series([outdir / r["output"] for r in corpus["report"].records
                         if r.get("output") and out_path_sop(outdir / r["output"]) == str(enh.SOPInstanceUID)])
    assert np.array_equal(single.array, multi.array) and np.allclose(single.affine, multi.affine, atol=1e-6)
    assert str(enh.StudyInstanceUID) == str(cts[0].StudyInstanceUID)
    # SEG: readable by highdicom, references the mapped CT instances, same mask, label cleaned
    seg_ds = out["zoe/seg/seg.dcm"]
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert seg_ds.SegmentSequence[0].SegmentLabel == "lesion"
    assert seg_ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator.startswith("99MS")
    ref = seg_ds.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == cts[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in ref.ReferencedInstanceSequence} == set(sops)
    assert str(seg_ds.FrameOfReferenceUID) == str(cts[0].FrameOfReferenceUID)
    vol = seg.get_volume(combine_segments=True)
    assert int(np.count_nonzero(vol.array)) == int(made["mask"].sum())


def out_path_sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_retain_institution_keeps_the_site_but_not_the_names(corpus, tmp_path):
    rep = anonymise(corpus["base"] / "in", tmp_path / "o", corpus["key"], options=["retain-institution-id"])
    assert rep.processed == 9
    files = iter_files(corpus["base"] / "in")
    rec = next(r for r in rep.records if files[r["index"]].name == "0.dcm" and files[r["index"]].parent.name == "ct")
    ct = pydicom.dcmread(tmp_path / "o" / rec["output"])
    assert ct.InstitutionName == "My Hospital"
    assert ct.AnatomicRegionSequence[1].CodingSchemeDesignator == "99MYHOSPITAL"
    assert ct.AnatomicRegionSequence[1].CodeMeaning == "Chest, per protocol"
    raw = (tmp_path / "o" / rec["output"]).read_bytes()
    assert "Müller".encode() not in raw and b"MUELLER" not in raw and "佐藤".encode() not in raw


@pytest.mark.parametrize("text,hit", [
    ("Chest, per MUELLER protocol", True), ("zoe muller", True), ("ZOË", True), ("Zoetrope", False),
    ("Mullerian duct", True), ("99MYHOSPITAL", True), ("MY-HOSPITAL-CODES", True), ("Hospital", False),
    ("山田様", True), ("山", False), ("やまだ たろう", True), ("ﾀﾛｳ", False), ("Yamada", False),
])
def test_normalised_matching_rules(text, hit):
    ids = NormalisedIds()
    ids.add_person_name("Müller^Zoë")
    ids.add_person_name("山田^太郎=やまだ^たろう")
    ids.add("My Hospital")
    assert ids.found_in(text) is hit
