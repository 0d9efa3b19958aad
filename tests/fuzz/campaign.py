"""A mutation campaign through the CLI: hostile files into every verb that reads them.

:func:`run_campaign` builds seeded corpora (:mod:`tests.fuzz.corpus`) from pydicom's bundled test
files and from medsynth's own outputs (an exported DICOM series, SEG and NIfTI; generate-format
samples), then runs ``manifest build``, ``manifest verify``, ``anonymise``, ``phi-scan``, ``qc`` and
``export`` over them in-process and records every run.  It checks what must hold for any input:

* the exit code is one the README documents, never 70 (internal error), and no traceback is printed;
* verdicts fail closed: a file the PHI scan cannot parse is named as "not scanned" and the scan exits
  6; an unreadable reference file stops the scan (exit 6); export with such a reference publishes
  nothing; QC never passes a sample whose image it could not read.

Used by ``tests/test_fuzz.py`` (a few seconds) and by hand for longer runs::

    python -m tests.fuzz.campaign --n 400 --seed 1 --out fuzz-work
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.fuzz.corpus import (
    mutate,
    mutate_gzip_member,
    pydicom_seed_files,
    write_corpus,
)

#: Exit codes the README documents for medsynth errors (70, internal error, is a bug).
DOCUMENTED_EXIT_CODES = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8})
SHAPE = (12, 10, 6)
SPACING = (1.5, 1.5, 3.0)


@dataclass
class Run:
    """One CLI invocation: its arguments, exit code, output, and what it was expected to show."""

    argv: list[str]
    code: int
    out: str
    err: str
    seconds: float


@dataclass
class CampaignResult:
    runs: list[Run] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    n_files: int = 0
    seconds: float = 0.0

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)


def cli(argv: Sequence[object]) -> Run:
    """Run ``medsynth ARGV`` in-process and capture exit code, stdout and stderr."""
    from medsynth.cli import main

    args = ["--no-progress", *[str(a) for a in argv]]
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return Run(args, code, out.getvalue(), err.getvalue(), time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# seeds from medsynth's own outputs
# ---------------------------------------------------------------------------------------------


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    body = ((i - 5.5) / 5) ** 2 + ((j - 4.5) / 4) ** 2 <= 1
    lung = body & (((i - 3.5) / 1.8) ** 2 + ((j - 4.5) / 2) ** 2 <= 1) & (k > 0) & (k < 5)
    hu = np.full(SHAPE, -1000.0)
    hu[body] = 40.0
    hu[lung] = -820.0
    hu += rng.normal(0, 10, SHAPE)
    return hu.astype(np.float32), lung.astype(np.uint8)


def write_samples(out: Path, indices: Sequence[int], qc: bool | None = True) -> list[str]:
    """Samples in the format of ``medsynth generate`` (image, label, sidecar, QC verdict)."""
    from medsynth.jobs import sha256_file
    from medsynth.samples import write_sample
    from medsynth.volume import Volume, affine_from_spacing

    aff = affine_from_spacing(SPACING, SHAPE, "RAS")
    ids = []
    for n in indices:
        sid = f"synth-fz-{n:05d}"
        hu, lab = _phantom(n)
        write_sample(out, sid, Volume(hu, aff, "CT", "HU"), {"index": n, "seed": n, "class": n % 2,
                                                              "label_values": {"background": 0, "lung": 1}},
                     label=Volume(lab, aff, "SEG", "label"))
        if qc is not None:  # a verdict as 'medsynth qc' writes it: bound to the image's bytes
            (out / f"{sid}.qc.json").write_text(json.dumps({"passed": qc, "reasons": [],
                                                            "image_sha256": sha256_file(out / f"{sid}.nii.gz")}))
        ids.append(sid)
    return ids


def medsynth_seed_files(root: Path) -> tuple[list[Path], Path]:
    """A small export (DICOM series + SEG + NIfTI): medsynth's own files as seeds, and its series folder."""
    from medsynth.export import export_samples

    samples = root / "seed-samples"
    write_samples(samples, [0])
    export_samples(samples, root / "seed-export", formats="nifti,dicom,seg")
    series = next((root / "seed-export" / "dicom").iterdir())
    dicom = sorted(series.glob("*.dcm"))
    seg = sorted((root / "seed-export" / "dicom_seg").glob("*.dcm"))
    nifti = sorted((root / "seed-export").rglob("*.nii.gz"))
    # the first slice, one from the middle and the SEG cover what the writer produces
    return [dicom[0], dicom[len(dicom) // 2], *seg[:1], *nifti[:2]], series


def series_mutants(series: Path, out: Path, n: int, seed: int) -> list[tuple[Path, Path, str]]:
    """``n`` copies of a DICOM series folder, each with one file mutated (read whole by verify/build)."""
    rng = random.Random(seed)
    files = sorted(series.glob("*.dcm"))
    made = []
    for i in range(n):
        folder = out / f"s{i:03d}"
        shutil.copytree(series, folder)
        victim = folder / rng.choice(files).name
        data, op = mutate(victim.read_bytes(), rng)
        victim.write_bytes(data)
        made.append((victim, series / victim.name, op))
    return made


def qc_world(root: Path, rng: random.Random) -> tuple[Path, Path]:
    """A QC reference manifest (phantoms, plus mutated copies of two of them) and a samples folder
    of other phantoms on the same grid: samples that can pass, so a wrong pass would show."""
    from medsynth.data.phantoms import make_phantom, write_phantoms
    from medsynth.samples import write_sample

    grid = {"shape": (16, 16, 16), "spacing": (20.0, 20.0, 20.0)}
    ref = write_phantoms(root / "qc-ref", 6, seed=3, **grid)
    man = json.loads(ref.read_text())
    for i, case in enumerate(man["cases"][:2]):
        src = ref.parent / case["image"]
        data, _ = mutate_gzip_member(src.read_bytes(), rng)
        bad = src.with_name(f"mutant-{i}.nii.gz")
        bad.write_bytes(data)
        man["cases"].append({"id": f"mutant-{i}", "image": str(bad), "modality": "CT"})
    ref.write_text(json.dumps(man))
    qs = root / "qc-samples"
    for i in range(4):
        img, _, cls = make_phantom(4 * 100003 + i, grid["shape"], grid["spacing"], lesion=bool(i % 2))
        write_sample(qs, f"synth-fz-{i:05d}", img.with_array(img.array.astype(np.float32)),
                     {"index": i, "seed": i, "class": cls})
    return ref, qs


# ---------------------------------------------------------------------------------------------
# helpers for the fail-closed checks
# ---------------------------------------------------------------------------------------------


def fully_parses(path: Path) -> bool:
    """True if pydicom reads the file and converts every element (what a complete scan needs)."""
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, defer_size=None)
            for elem in ds.iterall():
                _ = elem.value
            if getattr(ds, "file_meta", None) is not None:
                for elem in ds.file_meta.iterall():
                    _ = elem.value
    except Exception:  # noqa: BLE001 - the oracle: anything pydicom raises means "does not parse"
        return False
    return True


def _mutant_samples(samples: Path, rng: random.Random, n: int) -> dict[str, str]:
    """Break files of ``n`` of the samples in place; returns {sample id: what was broken}."""
    broken = {}
    sides = sorted(p for p in samples.glob("*.json") if not p.name.endswith(".qc.json"))
    for side in rng.sample(sides, min(n, len(sides))):
        sid = side.name[:-len(".json")]
        files = {"image": samples / f"{sid}.nii.gz", "label": samples / f"{sid}_label.nii.gz",
                 "sidecar": side, "verdict": samples / f"{sid}.qc.json"}
        target = rng.choice(sorted(k for k, f in files.items() if f.is_file()))
        path = files[target]
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            new, op = mutate_gzip_member(data, rng)
        else:
            new, op = mutate(data, rng, rng.choice(("flip", "cut", "repeat", "truncate")))
        path.write_bytes(new)
        broken[sid] = f"{target}:{op}"
    return broken


# ---------------------------------------------------------------------------------------------
# the campaign
# ---------------------------------------------------------------------------------------------


def run_campaign(root: Path, n: int = 60, seed: int = 0, qc: bool = True) -> CampaignResult:
    """Build the corpora under ``root`` and run every verb over them (see the module docstring)."""
    t0 = time.perf_counter()
    res = CampaignResult()
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seeds = pydicom_seed_files()
    own, own_series = medsynth_seed_files(root)
    clean_ref = root / "clean-ref"
    clean_ref.mkdir()
    for p in seeds:
        shutil.copy2(p, clean_ref / p.name)

    corpus = root / "corpus"
    made = write_corpus(seeds, corpus / "pydicom", n, seed)
    made += write_corpus([p for p in own if p.suffix == ".dcm"], corpus / "export", max(n // 3, 4), seed + 1)
    made += write_corpus([p for p in own if p.name.endswith(".nii.gz")], corpus / "nifti", max(n // 6, 2),
                         seed + 2, mutator=mutate_gzip_member)
    made += series_mutants(own_series, corpus / "series", max(n // 10, 2), seed + 3)
    res.n_files = len(made)

    def run(*argv: object, allowed: frozenset = DOCUMENTED_EXIT_CODES) -> Run:
        r = cli(argv)
        res.runs.append(r)
        res.check(r.code in allowed and r.code != 70 and "Traceback" not in r.out + r.err,
                  f"medsynth {' '.join(r.argv)} -> exit {r.code}: {(r.err or r.out).strip()[-400:]}")
        return r

    # manifest build / verify (build keeps what it can read; verify must not crash on any case)
    built = root / "built.json"
    b = run("manifest", "build", corpus, "-o", built)
    for m in sorted(root.glob("built*.json")):
        run("manifest", "verify", m)
    res.check(b.code in (0, 3), f"manifest build: exit {b.code}")
    images = sorted({str(p.parent if p.parent.parent.name == "series" else p) for p, _, _ in made})
    cases = [{"id": f"case-{i:03d}", "image": img, "modality": "CT"} for i, img in enumerate(images)]
    every = root / "every-file.json"
    every.write_text(json.dumps({"format": "medsynth-manifest/1", "name": "every", "modality": "CT",
                                 "cases": cases}))
    run("manifest", "verify", every, allowed=frozenset({0, 3}))

    # anonymise: one bad file never sinks the batch
    key = root / "key"
    key.write_bytes(bytes(rng.randrange(256) for _ in range(32)))
    a = run("anonymise", corpus, root / "deid", "--key-file", key, allowed=frozenset({0, 1}))
    res.check("processed" in a.out, f"anonymise printed no summary: {a.out!r}")

    # phi-scan of the corpus against clean references: every unparseable DICOM is named, exit 6
    s = run("phi-scan", corpus, "--reference", clean_ref, allowed=frozenset({6}))
    for path, _, _ in made:
        if path.suffix == ".dcm" and not fully_parses(path):
            rel = path.relative_to(corpus).as_posix()
            res.check(any(line.startswith(f"{rel}: ") and "not scanned" in line for line in s.out.splitlines()),
                      f"phi-scan: unparseable {rel} is not reported as not scanned")
    # phi-scan against the corpus as the reference (the crash in the issue): unreadable reference
    # files make the scan fail closed
    r = run("phi-scan", root / "deid", "--reference", corpus, allowed=frozenset({0, 6}))
    bad_ref = [p for p, _, _ in made if p.suffix == ".dcm" and not fully_parses(p)]
    res.check(not bad_ref or r.code == 6, "phi-scan passed although reference files could not be read")

    # export with a reference whose DICOM series is unreadable: nothing is published
    samples = root / "samples"
    write_samples(samples, [1, 2])
    broken_series = root / "broken-ref" / "series"
    broken_series.mkdir(parents=True)
    for i, (p, _, _) in enumerate(x for x in made if x[0].suffix == ".dcm" and not fully_parses(x[0])):
        shutil.copy2(p, broken_series / f"{i:03d}.dcm")
    if any(broken_series.iterdir()):
        ref_manifest = root / "broken-ref" / "manifest.json"
        ref_manifest.write_text(json.dumps({"format": "medsynth-manifest/1", "name": "ref", "modality": "CT",
                                            "cases": [{"id": "case-000", "image": "series", "modality": "CT"}]}))
        e = run("export", samples, "--out", root / "export-refused", "--format", "nifti,dicom",
                "--reference", ref_manifest, allowed=frozenset({6}))
        res.check(not (root / "export-refused").exists(), "export published although its PHI scan was incomplete")
        res.check("not scanned" in e.err or "not read" in e.err, f"export's refusal does not say why: {e.err!r}")

    # qc and export over samples with broken images, labels, sidecars and verdicts
    if qc:
        ref, qs = qc_world(root, rng)
        broken = _mutant_samples(qs, rng, 3)
        q = run("qc", qs, "--reference", ref, "--out", root / "qc", "--no-quarantine", allowed=frozenset({0, 7}))
        if q.code == 0:
            from medsynth.errors import MedsynthError
            from medsynth.samples import read_sample
            from medsynth.volume import Volume

            res.check("passed" in q.out, f"qc printed no counts: {q.out!r}")
            for sid, what in broken.items():
                verdict = qs / f"{sid}.qc.json"
                if not verdict.is_file():
                    continue
                try:
                    Volume.load_nifti(qs / f"{sid}.nii.gz")
                    readable = True
                except MedsynthError:
                    readable = False
                v = json.loads(verdict.read_text())
                res.check(readable or not v["passed"], f"qc passed {sid} whose image is unreadable ({what})")
                if what.startswith("sidecar"):
                    try:
                        read_sample(qs / f"{sid}.json")
                        usable = True
                    except MedsynthError:
                        usable = False
                    res.check(usable or not v["passed"], f"qc passed {sid} whose sidecar is unreadable ({what})")
        es = root / "export-samples"
        write_samples(es, range(20, 26))
        damaged = _mutant_samples(es, rng, 4)
        x = run("export", es, "--out", root / "export-mutants", "--format", "nifti,dicom,seg",
                allowed=frozenset({0, 5}))
        report = root / "export-mutants" / "export.json"
        exported = set(json.loads(report.read_text())["exported"]) if report.is_file() else set()
        for sid, what in damaged.items():  # a changed image no longer matches its verdict's sha256
            if what.startswith("image"):
                res.check(sid not in exported, f"export published {sid} although its image changed after QC")
        res.check(x.code != 0 or report.is_file(), "export succeeded without writing export.json")
    res.seconds = time.perf_counter() - t0
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=400, help="mutants of pydicom's files per round")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--rounds", type=int, default=1, help="rounds, with seeds seed, seed+1, ...")
    p.add_argument("--out", type=Path, required=True, help="work folder (emptied first)")
    p.add_argument("--no-qc", action="store_true", help="skip the qc/export stage (the slowest)")
    a = p.parse_args(argv)
    total_fail = 0
    for r in range(a.rounds):
        root = a.out / f"round-{a.seed + r}"
        shutil.rmtree(root, ignore_errors=True)
        res = run_campaign(root, a.n, a.seed + r, qc=not a.no_qc)
        print(f"seed {a.seed + r}: {res.n_files} mutants, {len(res.runs)} runs, {len(res.failures)} failure(s), "
              f"{res.seconds:.1f} s")
        for f in res.failures:
            print("  FAIL", f)
        total_fail += len(res.failures)
    return 1 if total_fail else 0


if __name__ == "__main__":
    sys.exit(main())
