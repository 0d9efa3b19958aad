"""PHI scan: identifiers from reference DICOM headers, found in DICOM values (sequences, private tags,
file meta), NIfTI headers and extensions, JSON sidecars, text files and file names; reports mask values."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from medsynth.errors import PrivacyError
from medsynth.privacy.phi_scan import Identifiers, collect_identifiers, mask, scan_phi

NAME, PID, BIRTH, ACC, INST = "Vandermeulen^Griet", "HX-4410978", "19570822", "A99120457", "Oosterpark Medisch Centrum"
STUDY_UID = "1.2.826.0.1.3680043.9.5555.1.1"


def _ds(name=NAME, pid=PID, study=STUDY_UID, sop="1.2.826.0.1.3680043.9.5555.1.1.1.1") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, BIRTH
    ds.AccessionNumber, ds.InstitutionName, ds.Manufacturer = ACC, INST, "Vendorix"
    ds.Modality = "MR"
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = fm
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def ref(tmp_path) -> Path:
    _save(_ds(), tmp_path / "ref" / "series" / "a")
    return tmp_path / "ref"


def test_identifiers_are_collected_by_kind(ref):
    ids = collect_identifiers(ref)
    assert ids.sources == 1
    assert ids.tokens["VANDERMEULEN"] == "person name" and ids.tokens["GRIET"] == "person name"
    assert ids.phrases["HX-4410978"] == "patient ID" and ids.tokens["A99120457"] == "accession number"
    assert ids.dates["19570822"] == "birth date" and ids.phrases[INST.upper()] == "institution"
    assert STUDY_UID in ids.uids and MRImageStorage not in ids.uids  # class UIDs are not identifiers


def test_matching_rules():
    ids = Identifiers()
    ids.add_name(NAME)
    ids.add_id(PID, "patient ID")
    ids.add_id("20481234", "patient ID")
    ids.add_id("204", "patient ID")  # too short to search: would match every number
    ids.add_date(BIRTH)
    ids.add_uid(STUDY_UID)
    kinds = lambda text: sorted(k for k, _ in ids.find(text))
    assert kinds("griet vandermeulen") == ["person name", "person name"]
    assert kinds("Grietje") == []  # whole tokens only
    assert kinds("ref hx-4410978.") == ["patient ID"]
    assert kinds("0.20481234 mm") == [] and kinds("id 20481234") == ["patient ID"]
    assert kinds("slice 204") == []
    for spelling in ("19570822", "1957-08-22", "22.08.1957", "08/22/1957"):
        assert kinds(f"born {spelling}") == ["birth date"], spelling
    assert kinds(STUDY_UID) == ["original UID"]
    assert kinds(STUDY_UID + ".7") == [] and kinds("9." + STUDY_UID) == []  # a longer UID is another UID
    assert mask("Vandermeulen") == "V***(len 12)"


def test_finds_identifiers_everywhere(tmp_path, ref):
    out = tmp_path / "out"
    # DICOM: a name in a nested sequence, a UID in a private tag, an ID in file meta, text in UN bytes
    ds = _ds(name="SYNTH^ONE", pid="MS-AAAA", study="2.25.1", sop="2.25.2")
    ds.AccessionNumber, ds.InstitutionName, ds.PatientBirthDate = "", "", ""
    item = Dataset()
    item.PersonName = "Griet"
    ds.ContentSequence = Sequence([item])
    blk = ds.private_block(0x0041, "SOME VENDOR", create=True)
    blk.add_new(0x01, "UI", STUDY_UID)
    blk.add_new(0x02, "UN", f"xx {ACC} yy".encode())
    _save(ds, out / "dicom" / "x.dcm")
    ds.file_meta.SourceApplicationEntityTitle = "A99120457"
    ds.save_as(out / "dicom" / "y.dcm", enforce_file_format=True)
    # NIfTI header and extension
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.diag([1.0, 1, 1, 1]))
    img.header["descrip"] = b"born 1957-08-22"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"Oosterpark Medisch Centrum"))
    nib.save(img, str(out / "vol.nii.gz"))
    # JSON sidecar, text file, file name
    (out / "vol.json").write_text(json.dumps({"meta": {"AccessionNumber": ACC, "list": ["x", PID]}}))
    (out / "notes.txt").write_text("nothing here\n")
    (out / "Vandermeulen.txt").write_text("clean\n")
    hits = scan_phi(out, ref)
    where = {(h.path, h.location.split(" ")[0] if h.path.endswith(".dcm") else h.location, h.kind) for h in hits}
    assert ("dicom/x.dcm", "(0040,A730)[0]>(0040,A123)", "person name") in where
    assert ("dicom/x.dcm", "(0041,1001)", "original UID") in where
    assert ("dicom/x.dcm", "(0041,1002)", "accession number") in where
    assert ("dicom/y.dcm", "meta:(0002,0016)", "accession number") in where
    assert ("vol.nii.gz", "nifti:descrip", "birth date") in where
    assert ("vol.nii.gz", "nifti:extension[0]", "institution") in where
    assert ("vol.json", "$.meta.AccessionNumber", "accession number") in where
    assert ("vol.json", "$.meta.list[1]", "patient ID") in where
    assert any(h.location == "file name" and h.kind == "person name" for h in hits)
    assert not any(h.path == "notes.txt" for h in hits)
    # the report masks what it found, the file name included
    report = "\n".join(str(h) for h in hits)
    for raw in ("Vandermeulen", "Griet", PID, ACC, BIRTH, STUDY_UID, "Oosterpark"):
        assert raw.upper() not in report.upper(), raw


def test_manifest_reference_with_dicom_series_and_nifti(tmp_path, ref):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.diag([1.0, 1, 1, 1]))
    nib.save(img, str(tmp_path / "case1.nii.gz"))
    man = tmp_path / "manifest.json"
    man.write_text(json.dumps({"cases": [{"id": "c0", "image": "ref/series"}, {"id": "c1", "image": "case1.nii.gz"}]}))
    ids = collect_identifiers(man)
    assert ids.sources == 1 and "VANDERMEULEN" in ids.tokens
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.json").write_text(json.dumps({"PatientID": PID}))
    assert [h.kind for h in scan_phi(tmp_path / "out", man)] == ["patient ID"]


def test_structural_checks_without_reference(tmp_path):
    ds = _ds()
    ds.BurnedInAnnotation = "YES"
    blk = ds.private_block(0x0041, "SOME VENDOR", create=True)
    blk.add_new(0x01, "LO", "x")
    _save(ds, tmp_path / "o" / "a.dcm")
    kinds = {h.kind for h in scan_phi(tmp_path / "o")}
    assert kinds == {"not marked de-identified", "burned-in annotation", "private attribute"}


def test_bad_reference_and_missing_folder(tmp_path):
    with pytest.raises(PrivacyError, match="reference not found"):
        collect_identifiers(tmp_path / "nope")
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    with pytest.raises(PrivacyError, match="not readable JSON"):
        collect_identifiers(bad)
    with pytest.raises(PrivacyError, match="folder to scan not found"):
        scan_phi(tmp_path / "missing", None)


# ------------------------------------------------------------------------------------------------
# fail closed: what cannot be searched is reported by name, and the verdict is "not clean"
# ------------------------------------------------------------------------------------------------


def _break_vr(path: Path, tag: tuple[int, int], vr: bytes = b"\x55\x0c") -> Path:
    """Overwrite the VR of explicit-VR element ``tag`` with ``vr`` (the issue's '0x55 0x0c')."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<HH", *tag), 132)
    data[at + 4:at + 6] = vr
    path.write_bytes(bytes(data))
    return path


def test_unknown_vr_in_a_reference_file_fails_closed_not_internal_error(tmp_path, ref, run_cli):
    """The issue: 'internal error: NotImplementedError: Unknown Value Representation '0x55 0x0c' in
    tag (0020,000D)'.  Now the reference file is named, the scan goes on and exits 6."""
    _break_vr(ref / "series" / "a", (0x0020, 0x000D))
    out = tmp_path / "out"
    out.mkdir()
    (out / "clean.txt").write_text("nothing here\n")
    code, stdout, err = run_cli("phi-scan", out, "--reference", ref)
    assert code == 6, err
    assert "internal error" not in err and "Traceback" not in err
    line = next(ln for ln in stdout.splitlines() if ln.startswith("reference series/a: "))
    assert "not scanned (not read: unknown value representation at (0020,000D)" in line and "repair" in line
    assert STUDY_UID not in stdout + err
    # the rest of that file's identifiers are still searched for
    (out / "leak.json").write_text(json.dumps({"id": PID}))
    code, stdout, _ = run_cli("phi-scan", out, "--reference", ref)
    assert code == 6 and "leak.json: $.id: patient ID H***(len 10)" in stdout


def test_damage_where_no_identifier_is_read_does_not_block_the_reference(tmp_path):
    ds = _ds()
    blk = ds.private_block(0x0041, "SOME VENDOR", create=True)
    blk.add_new(0x10, "LO", "vendor data")
    ds.SliceThickness = "1.5"
    path = _save(ds, tmp_path / "ref" / "a")
    _break_vr(path, (0x0041, 0x1010))   # private: never a source of identifiers
    _break_vr(path, (0x0018, 0x0050))   # Slice Thickness: a number
    ids = collect_identifiers(tmp_path / "ref")
    assert ids.unreadable == [] and ids.sources == 1 and "VANDERMEULEN" in ids.tokens
    (tmp_path / "out").mkdir()
    assert scan_phi(tmp_path / "out", ids) == []


def test_outputs_that_cannot_be_searched_are_not_scanned(tmp_path, ref, run_cli):
    out = tmp_path / "out"
    clean = _ds(name="SYNTH^ONE", pid="MS-AAAA", study="2.25.1", sop="2.25.2")
    clean.AccessionNumber, clean.InstitutionName, clean.PatientBirthDate = "", "", ""
    good = _save(clean, out / "ok.dcm")
    bad_vr = _save(_ds(sop="1.2.826.0.1.3680043.9.5555.1.1.1.2"), out / "bad_vr.dcm")
    _break_vr(bad_vr, (0x0010, 0x0010))  # Patient's Name, undecodable
    full = good.read_bytes()
    (out / "truncated.dcm").write_bytes(full[:-5])  # pydicom reads this without a word
    (out / "empty.dcm").write_bytes(full[:140])
    (out / "renamed.dcm").write_bytes(b"\x00" * 300)
    (out / "vol.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI file")
    (out / "side.json").write_text('{"PatientID": "HX-44')
    import gzip

    (out / "notes.txt.gz").write_bytes(gzip.compress(PID.encode()))
    (out / "link.txt").symlink_to(tmp_path / "elsewhere.txt")
    (out / "Vandermeulen").mkdir()  # an empty folder's name is searched too
    code, stdout, err = run_cli("phi-scan", out, "--reference", ref)
    assert code == 6 and "Traceback" not in err and "internal error" not in err
    lines = stdout.splitlines()

    def shows(prefix: str, text: str) -> bool:
        return any(ln.startswith(prefix) and text in ln for ln in lines)

    assert shows("bad_vr.dcm: ", "(0010,0010): not scanned (undecodable element: unknown value representation; "
                                 "remove the file or replace it with a readable copy")
    assert shows("bad_vr.dcm: ", "(0010,0010): person name V***(len 12)")  # what its raw bytes show
    assert shows("truncated.dcm: ", "file: not scanned (incompletely parsed DICOM file: file ends inside an element")
    assert shows("empty.dcm: ", "file: not scanned (incompletely parsed DICOM file: no data elements")
    assert shows("renamed.dcm: ", "not scanned (unreadable DICOM file: named as DICOM but not a DICOM data set")
    assert shows("vol.nii.gz: ", "file: not scanned (unreadable NIfTI file")
    assert shows("side.json: ", "file: not scanned (unreadable JSON file: not valid JSON (line 1)")
    assert shows("notes.txt.gz: ", "content: not scanned (gzip archive: its contents are not searched")
    assert shows("link.txt: ", "file: not scanned (symbolic link (not followed)")
    assert shows("V***(len 12): ", "folder name: person name V***(len 12)")
    assert not shows("ok.dcm: ", "")
    for raw in ("Vandermeulen", "Griet", PID):
        assert raw.upper() not in (stdout + err).upper()


def test_missing_dicom_case_of_a_reference_manifest_fails_closed(tmp_path, ref):
    man = tmp_path / "manifest.json"
    man.write_text(json.dumps({"cases": [{"id": "c0", "image": "ref/series"}, {"id": "c1", "image": "gone/series"},
                                         {"id": "c2", "image": "gone/case.nii.gz"}]}))
    ids = collect_identifiers(man)
    assert ids.unreadable == [("gone/series", "not read: listed in the manifest but missing")]
    (tmp_path / "out").mkdir()
    hits = scan_phi(tmp_path / "out", ids)
    assert [str(h).split(": ")[0:3] for h in hits] == [["reference gone/series", "identifiers", "not scanned (not read"]]
    assert hits[0].not_scanned
