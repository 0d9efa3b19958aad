"""medsynth send into a real PACS: Orthanc (Debian package ``orthanc``) started on localhost with a
temporary config and free ports; every instance of a release must arrive in its study and series,
and each SEG's references must resolve to stored images.  Closed ports and rejected associations
give one clear error and a non-zero exit."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet

from medsynth.export.send import SendError
from tests.helpers_release import inputs

AET = "ORTHANC"


def _orthanc_binary() -> str:
    path = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        if os.environ.get("MEDSYNTH_REQUIRE_TOOLS"):
            pytest.fail("Orthanc is not installed (apt-get install -y orthanc)")
        pytest.skip("Orthanc not installed (apt-get install -y orthanc)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str):
    with urllib.request.urlopen(base + path, timeout=10) as r:
        body = r.read()
    return json.loads(body) if r.headers.get_content_type() == "application/json" else body


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A private Orthanc: own config, storage and free ports (the package's service plays no part)."""
    binary = _orthanc_binary()
    root = tmp_path_factory.mktemp("orthanc")
    http, dicom = _free_port(), _free_port()
    config = {"Name": "medsynth-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": http, "DicomPort": dicom, "DicomAet": AET, "AuthenticationEnabled": False,
              "RemoteAccessAllowed": False, "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True,
              "DicomAlwaysAllowEcho": True, "DicomCheckModalityHost": False, "UnknownSopClassAccepted": True,
              "Plugins": [], "HttpServerEnabled": True, "StableAge": 1}
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([binary, f"--logdir={root}", str(root / "orthanc.json")], stdout=log,
                            stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _get(base, "/system")["DicomAet"] == AET:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield {"base": base, "port": dicom}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    from medsynth.export.release import release_export

    built = inputs(tmp_path_factory.getbasetemp() / "release-inputs")
    out = tmp_path_factory.mktemp("pacs") / "release"
    release_export(built["export"], built["run"], built["train"], out, holdout=built["holdout"])
    return out


def test_release_arrives_in_its_studies_and_series_and_seg_references_resolve(orthanc, release, run_cli):
    code, out, err = run_cli("send", release, "--host", "127.0.0.1", "--port", orthanc["port"], "--called-aet", AET,
                             "--calling-aet", "MEDSYNTH_TEST")
    assert code == 0, err
    files = {str(i.SOPInstanceUID): i for i in FileSet(dcmread(release / "DICOMDIR"))}
    assert f"sent {len(files)} of {len(files)} instance(s)" in out and "0 failed" in out

    base = orthanc["base"]
    studies = {s["ID"]: s["MainDicomTags"]["StudyInstanceUID"] for s in _get(base, "/studies?expand")}
    series = {s["ID"]: (s["MainDicomTags"]["SeriesInstanceUID"], studies[s["ParentStudy"]],
                        s["MainDicomTags"].get("Modality")) for s in _get(base, "/series?expand")}
    stored = {i["MainDicomTags"]["SOPInstanceUID"]: (i["ID"], *series[i["ParentSeries"]])
              for i in _get(base, "/instances?expand")}
    assert set(stored) == set(files)
    for sop, rec in files.items():
        _, series_uid, study_uid, modality = stored[sop]
        assert (series_uid, study_uid, modality) == (str(rec.SeriesInstanceUID), str(rec.StudyInstanceUID),
                                                     str(rec.Modality))
    segs = [(sop, v) for sop, v in stored.items() if v[3] == "SEG"]
    assert segs and len(segs) == sum(1 for r in files.values() if r.Modality == "SEG")
    for _, (oid, _, study_uid, _) in segs:
        ds = dcmread(io.BytesIO(_get(base, f"/instances/{oid}/file")))
        assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        for ref_series in ds.ReferencedSeriesSequence:
            refs = [str(r.ReferencedSOPInstanceUID) for r in ref_series.ReferencedInstanceSequence]
            assert refs
            for r in refs:  # every referenced image is stored, in the series and study the SEG names
                assert r in stored, r
                assert stored[r][1] == str(ref_series.SeriesInstanceUID) and stored[r][2] == study_uid
                assert stored[r][3] == "CT"


def test_closed_port_and_rejected_association_are_clear_errors(orthanc, release, run_cli):
    closed = _free_port()
    code, _, err = run_cli("send", release, "--host", "127.0.0.1", "--port", closed, "--called-aet", AET,
                           "--retries", "1")
    assert code == SendError.exit_code and "connection refused" in err and "Traceback" not in err
    assert err.count("\n") <= 3  # one error and its fix, no pynetdicom log lines
    code, _, err = run_cli("send", release, "--host", "127.0.0.1", "--port", orthanc["port"],
                           "--called-aet", "NOT_ORTHANC")
    assert code == SendError.exit_code and "rejected the association" in err
    assert "Called AE title not recognised" in err and "--called-aet" in err and "Traceback" not in err
    code, _, err = run_cli("send", release, "--host", "127.0.0.1", "--port", "70000", "--called-aet", AET)
    assert code == 2 and "--port 70000 is not a TCP port" in err


@pytest.fixture
def store_scp():
    """A pynetdicom storage SCP on a free port whose C-STORE answers come from ``answer(sop_uid)``."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import CTImageStorage

    servers = []

    def start(answer, ct_only: bool = False) -> int:
        ae = AE(ae_title="STORE_SCP")
        if ct_only:
            ae.add_supported_context(CTImageStorage)
        else:
            ae.supported_contexts = AllStoragePresentationContexts
        port = _free_port()
        handlers = [(evt.EVT_C_STORE, lambda e: answer(str(e.request.AffectedSOPInstanceUID)))]
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers))
        return port

    yield start
    for s in servers:
        s.shutdown()


def test_failed_stores_are_retried_and_what_still_fails_is_listed(release, store_scp, run_cli):
    files = sorted(str(i.SOPInstanceUID) for i in FileSet(dcmread(release / "DICOMDIR")))
    seen: dict[str, int] = {}

    def flaky(uid: str) -> int:  # every instance fails once (out of resources), then is stored
        seen[uid] = seen.get(uid, 0) + 1
        return 0x0000 if seen[uid] > 1 else 0xA700

    code, out, err = run_cli("send", release, "--host", "127.0.0.1", "--port", store_scp(flaky),
                             "--called-aet", "STORE_SCP", "--retries", "1")
    assert code == 0, err
    assert f"sent {len(files)} of {len(files)}" in out and set(seen) == set(files)

    def refuse_one(uid: str) -> int:
        return 0xC000 if uid == files[0] else 0x0000

    code, out, err = run_cli("send", release, "--host", "127.0.0.1", "--port", store_scp(refuse_one),
                             "--called-aet", "STORE_SCP", "--retries", "1")
    assert code == 1 and f"sent {len(files) - 1} of {len(files)}" in out and "1 failed" in out
    assert "C-STORE status 0xC000" in out


def test_sop_classes_the_pacs_does_not_accept_are_reported(release, store_scp, run_cli):
    n_seg = sum(1 for i in FileSet(dcmread(release / "DICOMDIR")) if i.Modality == "SEG")
    code, out, _ = run_cli("send", release, "--host", "127.0.0.1", "--port", store_scp(lambda uid: 0, ct_only=True),
                           "--called-aet", "STORE_SCP")
    assert code == 1 and f"{n_seg} failed" in out
    assert "accepted no presentation context for its SOP class" in out
