"""Coverage-guided fuzzing of medsynth's file readers with atheris (libFuzzer for Python), by hand.

Each target takes one input file's bytes and checks what must hold for any bytes at all:

* ``phi_scan``   :func:`medsynth.privacy.phi_scan.scan_file` as ``x.dcm`` never raises, and a file
                 pydicom cannot parse completely gives a ``not scanned`` hit (the scan fails closed);
* ``reference``  :func:`collect_identifiers` on the file as a reference never raises, and a file
                 it cannot read is listed in ``unreadable`` (so the scan fails closed);
* ``dicom``      :func:`medsynth.dicom_series.scan_dicom` never raises, and :func:`read_series` raises
                 only :class:`~medsynth.errors.ImageReadError` (a named, one-line error);
* ``nifti``      :meth:`Volume.load_nifti` on ``x.nii.gz`` (it checks the header's claimed size
                 first) raises only medsynth errors, in bounded memory and time;
* ``anonymise``  :func:`anonymise` on a folder holding the file never raises and accounts for it.

Run::

    pip install atheris
    python -m tests.fuzz.harness phi_scan -max_total_time=600 fuzz-corpus-phi
    python -m tests.fuzz.harness dicom -runs=200000

The corpus folder (last argument; default ``medsynth-fuzz-<target>`` in the system temp folder) is seeded with
pydicom's bundled test files and medsynth's own export on first use.  A crash is written by
libFuzzer as ``crash-<sha1>`` in the working directory; replay it with
``python -m tests.fuzz.harness TARGET crash-<sha1>``.  Without atheris installed the same targets
run under a plain seeded mutation loop (``--plain SECONDS``), without coverage feedback.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

WORK = Path(tempfile.mkdtemp(prefix="medsynth-harness-"))


def _write(data: bytes, name: str) -> Path:
    folder = WORK / "in"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / name
    path.write_bytes(data)
    return path


def _fully_parses(path: Path) -> bool:
    from tests.fuzz.campaign import fully_parses

    return fully_parses(path)


def target_phi_scan(data: bytes) -> None:
    from medsynth.privacy.phi_scan import Identifiers, quiet_pydicom, scan_file

    path = _write(data, "x.dcm")
    ids = Identifiers()
    ids.add_name("Doe^Jane")
    ids.add_uid("1.2.826.0.1.3680043.9.5555.1")
    with quiet_pydicom():
        hits = scan_file(path, "x.dcm", ids)
    if not _fully_parses(path) and not any(h.not_scanned for h in hits):
        raise AssertionError("an unparseable DICOM file passed the PHI scan without a 'not scanned' hit")


def target_reference(data: bytes) -> None:
    from medsynth.dicom_series import DICOM_MARKER, sniff_dicom
    from medsynth.privacy.phi_scan import collect_identifiers

    path = _write(data, "ref.dcm")
    ids = collect_identifiers(path.parent)
    if sniff_dicom(path) == DICOM_MARKER and ids.sources == 0 and not ids.unreadable:
        raise AssertionError("a DICOM reference file was neither read nor reported unreadable")


def target_dicom(data: bytes) -> None:
    from medsynth.dicom_series import read_series, scan_dicom
    from medsynth.errors import ImageReadError

    path = _write(data, "IM0001")
    scan_dicom(path.parent)
    try:
        read_series([path])
    except ImageReadError:
        pass


def target_nifti(data: bytes) -> None:
    from medsynth.errors import MedsynthError
    from medsynth.volume import Volume

    path = _write(data, "x.nii.gz")
    try:
        Volume.load_nifti(path)  # checks the header's claimed size first (a damaged one claimed 17 GB)
    except MedsynthError:
        pass


def target_anonymise(data: bytes) -> None:
    from medsynth.privacy.deid import anonymise

    path = _write(data, "x.dcm")
    key = WORK / "key"
    if not key.is_file():
        key.write_bytes(os.urandom(32))
    out = WORK / "out"
    shutil.rmtree(out, ignore_errors=True)
    rep = anonymise(path.parent, out, key)
    if rep.processed + rep.quarantined + rep.failed != 1:
        raise AssertionError(f"anonymise accounted for {rep.processed + rep.quarantined + rep.failed} of 1 file")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "phi_scan": target_phi_scan, "reference": target_reference, "dicom": target_dicom,
    "nifti": target_nifti, "anonymise": target_anonymise,
}


def seed_corpus(folder: Path, target: str) -> None:
    """Seed ``folder`` with pydicom's bundled test files and medsynth's own export (once)."""
    from tests.fuzz.campaign import medsynth_seed_files
    from tests.fuzz.corpus import pydicom_seed_files

    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        return
    own, _ = medsynth_seed_files(WORK / "seeds")
    seeds = [p for p in own if p.name.endswith(".nii.gz")] if target == "nifti" else \
        pydicom_seed_files() + [p for p in own if p.suffix == ".dcm"]
    for i, p in enumerate(seeds):
        shutil.copy2(p, folder / f"seed-{i:02d}-{p.name}")


def plain_loop(target: Callable[[bytes], None], corpus: Path, seconds: float, seed: int) -> int:
    """Mutation loop without coverage feedback (when atheris is missing); returns inputs tried."""
    from tests.fuzz.corpus import mutate, mutate_gzip_member

    rng = random.Random(seed)
    seeds = [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()]
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        data = rng.choice(seeds)
        data, _ = (mutate_gzip_member if data[:2] == b"\x1f\x8b" else mutate)(data, rng)
        try:
            target(data)
        except Exception:
            crash = Path(f"crash-plain-{seed}-{n}")
            crash.write_bytes(data)
            print(f"crash after {n} inputs, written to {crash}", file=sys.stderr)
            raise
        n += 1
    return n


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="fuzz one medsynth reader (see the module docstring)")
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("--plain", type=float, default=None, metavar="SECONDS",
                   help="run the plain mutation loop for SECONDS instead of atheris")
    p.add_argument("--seed", type=int, default=0)
    args, rest = p.parse_known_args(argv[1:])  # the rest goes to libFuzzer (-runs=, -max_total_time=, ...)
    import logging

    logging.getLogger("medsynth").setLevel(logging.ERROR)
    files = [a for a in rest if not a.startswith("-")]
    if len(files) == 1 and Path(files[0]).is_file():  # replay one input
        TARGETS[args.target](Path(files[0]).read_bytes())
        print(f"{files[0]}: no failure")
        return 0
    corpus = Path(files[-1]) if files else Path(tempfile.gettempdir()) / f"medsynth-fuzz-{args.target}"
    if args.plain is not None:
        seed_corpus(corpus, args.target)
        n = plain_loop(TARGETS[args.target], corpus, args.plain, args.seed)
        print(f"{args.target}: {n} inputs in {args.plain:.0f} s, no failure")
        return 0
    import atheris

    # instrument before anything imports these, so coverage reaches into pydicom and nibabel
    with atheris.instrument_imports(include=["medsynth", "pydicom", "nibabel"]):
        import nibabel  # noqa: F401  (medsynth imports these lazily: load them here to instrument them)
        import pydicom
        import pydicom.filereader
        import pydicom.values  # noqa: F401

        import medsynth.dicom_series
        import medsynth.privacy.deid
        import medsynth.privacy.phi_scan
        import medsynth.formats
        import medsynth.volume  # noqa: F401
    seed_corpus(corpus, args.target)
    target = TARGETS[args.target]
    atheris.Setup([argv[0], *rest] + ([] if files else [str(corpus)]), target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
