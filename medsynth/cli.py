"""Command-line interface: parse arguments, load the config, call one stage, map errors to exit codes.

Each verb is registered by a ``_add_<verb>`` function below and runs a ``_run_<verb>`` function
that only translates arguments into a call of a stage function.  A :class:`MedsynthError` becomes
one clear message on stderr and its exit code; other exceptions print a one-line summary and exit
70, unless ``--debug`` is given, in which case the traceback is shown.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from medsynth import __version__
from medsynth.errors import PARAM, MedsynthError
from medsynth.registry import SCHEDULERS
from medsynth.runtime import is_rank_zero, passive_openmp_waits

log = logging.getLogger("medsynth.cli")

EPILOG_HELP = "Run 'medsynth VERB --help' for a verb's options and an example."


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and raw-text help so examples keep their layout."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        self.exit(2, f"medsynth: error: {message}\n")


def _common(p: argparse.ArgumentParser, top: bool = False) -> None:
    # Sub-parsers use SUPPRESS so that "medsynth --debug VERB" is not reset by the verb's defaults.
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    g = p.add_argument_group("global options")
    g.add_argument("-v", "--verbose", action="count", default=d(0), help="more log output (-vv for debug)")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False), help="only warnings and errors")
    g.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks and debug logs")
    g.add_argument("--no-progress", action="store_true", default=d(False), help="disable progress bars")


def _verb(sub, name: str, help: str, example: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}")
    _common(p)
    p.set_defaults(func=func, verb_parser=p)
    return p


# --------------------------------------------------------------------------------------------
# library errors name Python parameters; a CLI user reads the verb's flags
# --------------------------------------------------------------------------------------------

# The one hand-written part of the table: Python parameters (or ``name=value``) whose flag has another
# argparse dest.  Every other parameter is found by its dest in the verb's own parser.
PARAM_DESTS = {"run_dir": "run", "out_dir": "out", "cfg": "config", "limit": "n", "n_cases": "cases",
               "use_ema=False": "no_ema", "formats": "format"}


def _flag_of(action: argparse.Action) -> str:
    """``--steps`` (the long form where there is one), or the metavar of a positional argument."""
    if not action.option_strings:
        return action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def _as_flag(match: re.Match, actions: dict[str, list[argparse.Action]]) -> str:
    """One `name` or `name=value` of a library message as the command line spells it (else unchanged)."""
    name, value = match[1], match[2]
    whole = f"{name}={value}"
    if whole in PARAM_DESTS:
        found = actions.get(PARAM_DESTS[whole], [])
        return _flag_of(found[0]) if found else match[0]
    found = actions.get(PARAM_DESTS.get(name, name)) or actions.get(name, [])
    if not found:
        return match[0]
    if value is None:
        return _flag_of(found[0])
    if found[0].nargs == 0:  # a switch: the one of its flags that sets this value, e.g. `resume=True`
        switch = [a for a in found if str(a.const) == value]
        return _flag_of(switch[0]) if switch else match[0]
    plain = value.strip("'\"")  # `scheduler='ddim'` -> --scheduler ddim
    return f"{_flag_of(found[0])} {plain}"


def cli_message(exc: MedsynthError, parser: argparse.ArgumentParser) -> str:
    """``exc`` as the CLI prints it: each `parameter` of the message and hint as the flag of ``parser``."""
    actions: dict[str, list[argparse.Action]] = {}
    for a in parser._actions:
        if a.dest not in ("help", argparse.SUPPRESS):
            actions.setdefault(a.dest, []).append(a)

    def flags(text: str) -> str:
        return PARAM.sub(lambda m: _as_flag(m, actions), text)

    return flags(exc.message) if exc.hint is None else f"{flags(exc.message)}\n  fix: {flags(exc.hint)}"


# --------------------------------------------------------------------------------------------
# env
# --------------------------------------------------------------------------------------------


def _add_env(sub) -> None:
    _verb(sub, "env", "print versions of medsynth, Python, torch, MONAI, imaging libraries and devices",
          "medsynth env", _run_env)


def _run_env(args: argparse.Namespace) -> int:
    import importlib.metadata as md
    import platform

    print(f"medsynth   {__version__}")
    print(f"python     {platform.python_version()} ({platform.platform()})")
    for dist in ("torch", "monai", "numpy", "scipy", "nibabel", "SimpleITK", "pydicom", "highdicom", "pynetdicom", "pyyaml"):
        try:
            v = md.version(dist)
        except md.PackageNotFoundError:
            v = "not installed"
        print(f"{dist:<10} {v}")
    import os

    try:
        import torch

        print(f"cpu        {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                prop = torch.cuda.get_device_properties(i)
                print(f"cuda:{i}     {prop.name}, {prop.total_memory / 2**30:.1f} GiB, "
                      f"capability {prop.major}.{prop.minor}, CUDA {torch.version.cuda}")
        else:
            print("cuda       not available")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            print("mps        available")
    except Exception as exc:  # pragma: no cover - env must never crash
        print(f"torch      import failed: {type(exc).__name__}: {exc}")
    return 0


# --------------------------------------------------------------------------------------------
# config check
# --------------------------------------------------------------------------------------------


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="validate configuration files", description="Validate configuration files.")
    csub = p.add_subparsers(dest="config_cmd", metavar="ACTION", parser_class=_Parser)
    csub.required = True
    c = _verb(csub, "check", "validate a YAML config and print the resolved config",
              "medsynth config check configs/demo.yaml", _run_config_check)
    c.add_argument("config", type=Path, help="YAML config file")


def _run_config_check(args: argparse.Namespace) -> int:
    from medsynth.config import dump_yaml, load_config

    cfg = load_config(args.config)
    print(f"# {args.config}: OK (resolved config below)")
    print(dump_yaml(cfg), end="")
    return 0


# --------------------------------------------------------------------------------------------
# data phantoms
# --------------------------------------------------------------------------------------------


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="built-in data", description="Built-in data generators.")
    dsub = p.add_subparsers(dest="data_cmd", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    c = _verb(dsub, "phantoms", "write deterministic 3D chest-CT phantoms (NIfTI + manifest.json)",
              "medsynth data phantoms --n 20 --out phantoms/ --seed 0", _run_data_phantoms)
    c.add_argument("--n", type=int, required=True, help="number of phantoms (classes alternate 0/1)")
    c.add_argument("--out", type=Path, required=True, help="output folder (manifest at OUT/manifest.json)")
    c.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    c.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48), metavar=("X", "Y", "Z"),
                   help="grid size in voxels (default 64 64 48)")
    c.add_argument("--spacing", type=float, nargs=3, default=(5.0, 5.0, 7.0), metavar=("SX", "SY", "SZ"),
                   help="voxel size in mm (default 5 5 7)")


def _run_data_phantoms(args: argparse.Namespace) -> int:
    from medsynth.data.phantoms import write_phantoms

    path = write_phantoms(args.out, args.n, args.seed, tuple(args.shape), tuple(args.spacing))
    print(f"wrote {args.n} phantoms; manifest: {path}")
    return 0


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def _add_export(sub) -> None:
    p = _verb(sub, "export",
              "export QC-passed samples as NIfTI (nnU-Net layout), DICOM series and dataset files",
              "medsynth export runs/demo/samples --out exports/demo --format nifti,dicom,seg", _run_export)
    p.add_argument("samples", type=Path, metavar="SAMPLES_DIR", help="folder written by 'medsynth generate'")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to create (built beside it, then renamed)")
    p.add_argument("--format", dest="formats", default=None,
                   help="comma-separated: nifti, dicom, seg (default: the config's export.formats, "
                        "else nifti,dicom)")
    p.add_argument("--uid-root", default=None,
                   help="DICOM UID root (default 2.25: UUID-derived UIDs); UIDs are deterministic per sample")
    p.add_argument("--force", action="store_true", help="also export samples without a passing QC verdict")
    p.add_argument("--reference", type=Path, default=None, metavar="MANIFEST",
                   help="training-data manifest: run the PHI scan against it before publishing")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--name", default=None, help="dataset name in dataset.json/manifest (default: --out folder name)")
    p.add_argument("--config", type=Path, default=None, help="YAML config whose 'export' section gives defaults")
    p.add_argument("--run", type=Path, default=None, metavar="RUN",
                   help="run folder the samples came from: dataset.json and the manifest carry the licences "
                        "of its initial weights (model card)")


def _run_export(args: argparse.Namespace) -> int:
    from medsynth.errors import ExportError
    from medsynth.export import DEFAULT_FORMATS, export_samples

    formats, uid_root = args.formats, args.uid_root
    if args.config is not None:
        from medsynth.config import load_config

        cfg = load_config(args.config)
        formats = formats if formats is not None else list(cfg.export.formats)
        uid_root = uid_root if uid_root is not None else cfg.export.uid_root
    result = export_samples(args.samples, args.out, formats=formats if formats is not None else DEFAULT_FORMATS,
                            uid_root=uid_root, force=args.force, reference=args.reference,
                            overwrite=args.overwrite, name=args.name, run=args.run)
    print(result.summary())
    return 0 if result.ok else ExportError.exit_code


def _add_export_bundle(sub) -> None:
    p = _verb(sub, "export-bundle",
              "write a trained run as a MONAI bundle (configs/, models/, docs/) that "
              "'python -m monai.bundle run' samples from",
              "medsynth export-bundle runs/ct --out bundles/ct && cd bundles/ct && python -m monai.bundle run "
              "--config_file configs/inference.json --meta_file configs/metadata.json", _run_export_bundle)
    p.add_argument("run", type=Path, metavar="RUN", help="run folder of 'medsynth train'")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create (built beside it, then renamed)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--no-ema", action="store_true", help="export the raw UNet weights instead of the EMA weights")


def _run_export_bundle(args: argparse.Namespace) -> int:
    from medsynth.export.bundle import export_bundle

    res = export_bundle(args.run, args.out, overwrite=args.overwrite, use_ema=False if args.no_ema else None)
    print(res.summary())
    return 0


# --------------------------------------------------------------------------------------------
# manifest build / verify
# --------------------------------------------------------------------------------------------


def _add_manifest(sub) -> None:
    p = sub.add_parser("manifest", help="build and verify data manifests",
                       description="Build a data manifest from a folder of scans, or verify one.")
    msub = p.add_subparsers(dest="manifest_cmd", metavar="ACTION", parser_class=_Parser)
    msub.required = True
    b = _verb(msub, "build",
              "scan a folder for volume files (NIfTI, NRRD, MetaImage) and DICOM series and write a manifest "
              "per modality (no PHI copied)",
              "medsynth manifest build scans/ -o data_manifests/chest.json --labels masks/ --classes classes.csv",
              _run_manifest_build)
    b.add_argument("src", type=Path, metavar="SRC",
                   help="folder scanned recursively (.nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd files, DICOM files)")
    b.add_argument("-o", "--out", type=Path, required=True, metavar="OUT.json",
                   help="manifest file to write; a folder holding CT and MR gives OUT-CT.json and OUT-MR.json")
    b.add_argument("--labels", type=Path, default=None, metavar="DIR",
                   help="folder of label maps, matched to images by identical file name "
                        "(DICOM series: <series folder name>.nii.gz, .nrrd, ...)")
    b.add_argument("--classes", type=Path, default=None, metavar="CSV",
                   help="CSV with columns id,class: id is a case id, image file name or path relative to SRC")
    b.add_argument("--modality", choices=("CT", "MR"), default=None,
                   help="keep only the cases of this modality (DICOM: Modality tag; volume files: CT when the "
                        "values are Hounsfield units) and write one manifest")
    b.add_argument("--name", default=None, help="dataset name (default: SRC folder name)")
    v = _verb(msub, "verify",
              "open every case of a manifest and report all problems, one line each (exit 3 if any)",
              "medsynth manifest verify data_manifests/chest.json", _run_manifest_verify)
    v.add_argument("manifest", type=Path, metavar="MANIFEST",
                   help="medsynth manifest or Decathlon/nnU-Net dataset.json")


def _run_manifest_build(args: argparse.Namespace) -> int:
    from medsynth.manifest import build_manifest, save_build, source_counts

    report = build_manifest(args.src, labels=args.labels, classes=args.classes, modality=args.modality,
                            name=args.name)
    for note in report.notes:
        log.warning("%s", note)
    for m, path in zip(report.manifests, save_build(report, args.out)):
        print(f"wrote {path}: {len(m.cases)} case(s) ({source_counts(m)}), modality {m.modality}, "
              f"{sum(c.label is not None for c in m.cases)} with label; {len(report.notes)} note(s)")
    return 0


def _run_manifest_verify(args: argparse.Namespace) -> int:
    from medsynth.errors import ManifestError
    from medsynth.manifest import load_manifest, verify_manifest

    manifest = load_manifest(args.manifest)
    problems = verify_manifest(manifest)
    for p in problems:
        print(p)
    n = len(manifest.cases)
    if problems:
        bad = len({p.case for p in problems})
        print(f"{manifest.path}: {len(problems)} problem(s) in {bad} of {n} case(s)")
        return ManifestError.exit_code
    print(f"{manifest.path}: OK, {n} case(s) verified, no problems")
    return 0


# --------------------------------------------------------------------------------------------
# anonymise / phi-scan (de-identification)
# --------------------------------------------------------------------------------------------


def _add_anonymise(sub) -> None:
    from medsynth.privacy.deid_profile import OPTIONS

    p = _verb(sub, "anonymise",
              "de-identify DICOM folders and NIfTI, NRRD and MetaImage files "
              "(DICOM PS3.15 Annex E Basic Profile + options)",
              "medsynth anonymise scans/ deid/ --key-file ~/medsynth.key "
              "--options retain-long-modified-dates,clean-descriptors", _run_anonymise)
    p.add_argument("input", type=Path,
                   help="DICOM folder (files with or without extension), NIfTI/NRRD/MetaImage file, or a mix")
    p.add_argument("output", type=Path, help="output folder (outside the input; names come from keyed UIDs)")
    p.add_argument("--key-file", type=Path, required=True,
                   help="secret key file (>= 16 random bytes; make one: head -c 32 /dev/urandom > KEY)")
    p.add_argument("--options", action="append", default=[], metavar="OPT[,OPT]",
                   help="profile options, comma-separated or repeated: " + ", ".join(OPTIONS))
    p.add_argument("--allow-burned-in", action="store_true",
                   help="also write files flagged or likely to carry burned-in text (after checking their pixels)")
    p.add_argument("--audit", type=Path, default=None, help="audit log JSONL (default OUTPUT/deid_audit.jsonl)")


def _run_anonymise(args: argparse.Namespace) -> int:
    from medsynth.privacy.deid import anonymise

    opts = [o for chunk in args.options for o in chunk.split(",") if o.strip()]
    rep = anonymise(args.input, args.output, args.key_file, options=opts, allow_burned_in=args.allow_burned_in,
                    audit=args.audit)
    print(f"anonymise: {rep.processed} processed, {rep.quarantined} quarantined, {rep.failed} failed "
          f"(of {rep.total} files); output {args.output}; audit {rep.audit}")
    return 1 if rep.failed else 0


def _add_phi_scan(sub) -> None:
    p = _verb(sub, "phi-scan", "scan outputs for identifiers taken from the reference inputs (exit 6 on any hit)",
              "medsynth phi-scan deid/ --reference scans/", _run_phi_scan)
    p.add_argument("directory", type=Path, help="folder to scan (every file, name and value in it)")
    p.add_argument("--reference", type=Path, default=None,
                   help="manifest JSON or DICOM folder the outputs came from (without: structural checks only)")


def _run_phi_scan(args: argparse.Namespace) -> int:
    from medsynth.errors import PrivacyError
    from medsynth.privacy.phi_scan import collect_identifiers, scan_phi, summarise_hits

    ref = collect_identifiers(args.reference) if args.reference is not None else None
    hits = scan_phi(args.directory, ref)
    for h in hits:
        print(h)
    if hits:
        raise PrivacyError(f"phi-scan: {summarise_hits(hits)} in {args.directory}",
                           hint="do not share this folder; re-run anonymise, or repair or remove the files listed")
    what = f"{len(ref)} identifiers from {ref.sources} reference headers" if ref is not None else "structural checks"
    print(f"phi-scan: no identifiers found in {args.directory} ({what})")
    return 0


# --------------------------------------------------------------------------------------------
# evaluate utility / split
# --------------------------------------------------------------------------------------------


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate synthetic data against real data",
                       description="Evaluate what synthetic data is worth against held-out real data.")
    esub = p.add_subparsers(dest="evaluate_cmd", metavar="ACTION", parser_class=_Parser)
    esub.required = True
    u = _verb(esub, "utility",
              "train on synthetic, test on real: the same small MONAI model on real / synthetic / both "
              "(and a reduced real set), scored on a held-out real test manifest",
              "medsynth evaluate utility runs/demo --manifest split/train.json --test-manifest split/test.json "
              "--out eval/ --reduced-fraction 0.25", _run_evaluate_utility)
    u.add_argument("run", type=Path, metavar="RUN_DIR", help="run folder of 'medsynth train' (its grid and generator)")
    u.add_argument("--manifest", type=Path, required=True, metavar="TRAIN_MANIFEST",
                   help="real training cases (the generator must have been trained on these, not on test cases)")
    u.add_argument("--test-manifest", type=Path, required=True, metavar="TEST_MANIFEST",
                   help="held-out real cases, used only for scoring (refused if they overlap the training data)")
    u.add_argument("--out", type=Path, required=True, help="folder for utility.json, utility.html (and synthetic/)")
    u.add_argument("--task", choices=("classify", "segment"), default="classify",
                   help="classify: class labels, AUC + accuracy (default); segment: label maps, Dice")
    u.add_argument("--n-synthetic", type=int, default=16, metavar="N",
                   help="QC-passed synthetic samples per class (default 16)")
    u.add_argument("--repeats", type=int, default=3, metavar="R", help="trainings per arm with different seeds (default 3)")
    u.add_argument("--seed", type=int, default=0, help="base seed of generation, weights, batches, bootstrap (default 0)")
    u.add_argument("--reduced-fraction", type=float, default=None, metavar="F",
                   help="also train on this fraction of the real set, with and without synthetic (e.g. 0.25)")
    u.add_argument("--arms", default=None,
                   help="comma-separated subset of: real, synthetic, real+synthetic, reduced, reduced+synthetic")
    u.add_argument("--samples", type=Path, default=None, metavar="SAMPLES_DIR",
                   help="use these generated + QC'd samples instead of generating into OUT/synthetic")
    u.add_argument("--include-qc-failed", action="store_true",
                   help="also train on synthetic samples that failed QC or have no verdict (recorded in the "
                        "report; default: QC-passed samples only)")
    u.add_argument("--steps", type=int, default=1500, help="optimiser steps per training, the same for every arm (default 1500)")
    u.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    u.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    u.add_argument("--shift", type=int, default=None, metavar="N",
                   help="random circular shift of up to N voxels per axis, every arm alike (default 3 for "
                        "--task classify, 0 for segment)")
    u.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the test set (default 2000)")
    u.add_argument("--sampling-steps", type=int, default=None, help="denoising steps when generating (default: the run's)")
    u.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the run's)")
    u.add_argument("--seg-labels", default=None, metavar="L[,L]",
                   help="segment: label values scored by Dice (default: every foreground label)")
    u.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default auto)")
    u.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")
    s = _verb(esub, "split", "split a manifest into train.json and test.json by case (stratified by class, no leakage)",
              "medsynth evaluate split data_manifests/chest.json --test-fraction 0.3 --out split/", _run_evaluate_split)
    s.add_argument("manifest", type=Path, metavar="MANIFEST", help="manifest to split")
    s.add_argument("--out", type=Path, required=True, help="folder for train.json and test.json")
    s.add_argument("--test-fraction", type=float, default=0.3, help="fraction of cases held out (default 0.3)")
    s.add_argument("--seed", type=int, default=0, help="split seed (default 0)")


def _run_evaluate_utility(args: argparse.Namespace) -> int:
    from medsynth.errors import ConfigError
    from medsynth.evaluate.classifier import Budget
    from medsynth.evaluate.utility import UtilityOptions, evaluate_utility

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    try:
        seg_labels = [int(v) for v in args.seg_labels.split(",") if v.strip()] if args.seg_labels else None
    except ValueError:
        raise ConfigError(f"--seg-labels: need comma-separated integers, got {args.seg_labels!r}") from None
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    opts = UtilityOptions(task=args.task, n_synthetic=args.n_synthetic, repeats=args.repeats, seed=args.seed,
                          reduced_fraction=args.reduced_fraction, arms=arms,
                          budget=Budget(steps=args.steps, batch_size=args.batch_size, lr=args.lr, shift=args.shift),
                          bootstrap=args.bootstrap, device=args.device, samples=args.samples,
                          sampling_steps=args.sampling_steps, guidance=args.guidance, seg_labels=seg_labels,
                          include_qc_failed=args.include_qc_failed)
    result = evaluate_utility(args.run, args.manifest, args.test_manifest, args.out, opts)
    print(result.table())
    print(f"wrote {result.json_path} and {result.html_path}")
    return 0


def _run_evaluate_split(args: argparse.Namespace) -> int:
    from medsynth.evaluate.split import split_manifest
    from medsynth.manifest import load_manifest

    train, test = split_manifest(args.manifest, args.out, args.test_fraction, args.seed)
    print(f"wrote {train} ({len(load_manifest(train).cases)} cases) and {test} "
          f"({len(load_manifest(test).cases)} cases)")
    return 0


# --------------------------------------------------------------------------------------------
# qc
# --------------------------------------------------------------------------------------------


def _add_qc(sub) -> None:
    p = _verb(sub, "qc",
              "quality gate + memorisation screen: per-sample verdicts, quarantine of failures, "
              "qc.json and a self-contained report.html",
              "medsynth qc runs/demo/samples --reference phantoms/manifest.json --out runs/demo/qc "
              "--run runs/demo", _run_qc)
    p.add_argument("samples", type=Path, metavar="SAMPLES_DIR", help="folder written by 'medsynth generate'")
    p.add_argument("--reference", type=Path, required=True, metavar="MANIFEST",
                   help="manifest of the real cases the model was trained on")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for qc.json and report.html")
    p.add_argument("--holdout", type=Path, default=None, metavar="MANIFEST",
                   help="real cases the model did NOT train on, to calibrate the memorisation threshold "
                        "(default: hold out a deterministic fraction of --reference)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--run", type=Path, default=None, metavar="RUN_DIR",
                   help="model run directory: its config.yaml gives the grid, HU window and qc/privacy settings")
    g.add_argument("--config", type=Path, default=None, metavar="CONFIG",
                   help="YAML config giving the grid and qc/privacy settings (default: grid from the samples' "
                        "sidecars, default settings)")
    p.add_argument("--no-quarantine", action="store_true",
                   help="write verdicts but leave failing samples in place")


def _run_qc(args: argparse.Namespace) -> int:
    from medsynth.qc.gate import load_qc_config, run_qc

    cfg, source = load_qc_config(args.config, args.run)
    out = run_qc(args.samples, args.reference, args.out, cfg, holdout=args.holdout,
                 quarantine=not args.no_quarantine, grid_source=source)
    mem = out.summary["memorisation"]
    print(f"{out.n_samples} samples: {out.n_passed} passed, {out.n_failed} failed"
          + (f" ({len(out.quarantined)} moved to {args.samples / 'quarantine'})" if out.quarantined else ""))
    print(f"memorisation: {mem['n_flagged']} of {mem['n_screened']} flagged possible_copy "
          f"(threshold 1-NCC {mem['calibration']['image_threshold']:.4g}, {mem['calibration']['mode']})")
    les = out.summary.get("lesion_memorisation") or {}
    if les.get("applied"):
        thr = les["calibration"]["threshold"]
        print(f"lesion memorisation: {les['n_flagged']} of {les['n_samples_with_lesions']} samples with a lesion "
              f"flagged ({les['n_lesions_screened']} lesions; threshold 1-NCC "
              + (f"{thr:.4g}" if thr is not None else "none: too few held-out lesions, lesion samples fail")
              + f" from {les['calibration']['n_heldout_lesions']} held-out lesions)")
    print(f"report: {out.report_html}")
    print(f"verdicts: {out.qc_json}")
    return 0


# --------------------------------------------------------------------------------------------
# expand
# --------------------------------------------------------------------------------------------


def _add_expand(sub) -> None:
    p = _verb(sub, "expand", "dataset expansion: generate -> QC + memorisation gate -> PHI scan -> export, "
              "sharded and resumable; then a combined real + synthetic manifest",
              "medsynth expand run/ --manifest data/manifest.json --out expanded/ --per-class 50 --shard 0/4\n"
              "  medsynth expand --merge expanded/", _run_expand)
    p.add_argument("run", type=Path, nargs="?", help="run directory of 'medsynth train'")
    p.add_argument("--manifest", type=Path, help="manifest of the real training cases (QC reference, PHI reference)")
    p.add_argument("--out", type=Path, help="job folder (created; rerun the same command to resume)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--n", type=int, help="number of synthetic cases (classes round-robin)")
    g.add_argument("--per-class", type=int, help="synthetic cases per class (class-conditional models)")
    g.add_argument("--factor", type=float, help="K synthetic cases per real case of each class")
    p.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    p.add_argument("--shard", help="run only shard i of n (e.g. 0/4); then 'expand --merge DIR'")
    p.add_argument("--merge", type=Path, metavar="DIR", help="join the finished shards of job folder DIR")
    p.add_argument("--format", default="nifti", help="export formats, comma-separated: nifti,dicom,seg (default nifti)")
    p.add_argument("--max-tries", type=int, default=5, help="samples tried per slot before giving up (default 5)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's config)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's config)")
    p.add_argument("--batch-size", type=int, help="sampling batch size (does not change results)")
    p.add_argument("--holdout", type=Path, help="manifest of real cases the model did not train on (QC calibration)")
    p.add_argument("--uid-root", help="DICOM UID root for the export (default 2.25.)")
    p.add_argument("--device", help="cpu or cuda (default: the run's config)")


def _run_expand(args: argparse.Namespace) -> int:
    from medsynth.errors import JobError
    from medsynth.expand import expand, merge

    if args.merge is not None:
        if args.run is not None or args.out is not None:
            raise JobError("--merge DIR takes no RUN_DIR or --out")
        res = merge(args.merge)
        print(f"merged: {res.n_synthetic} synthetic + {res.n_real} real cases -> {res.dataset_dir}")
        print(f"  combined manifest: {res.dataset_dir / 'combined_manifest.json'}")
        return 0 if not res.summary.get("exhausted_slots") else 1
    if args.run is None or args.manifest is None or args.out is None:
        raise JobError("expand needs RUN_DIR, --manifest and --out (or --merge DIR)")
    res = expand(args.run, args.manifest, args.out, n=args.n, per_class=args.per_class, factor=args.factor,
                 seed=args.seed, shard=args.shard, formats=args.format.split(","), max_tries=args.max_tries,
                 steps=args.steps, guidance=args.guidance, batch_size=args.batch_size, holdout=args.holdout,
                 uid_root=args.uid_root, device=args.device)
    for sr in res.shards:
        print(f"shard {sr.shard[0]}/{sr.shard[1]}: {len(sr.accepted)} slots filled, {sr.generated} generated, "
              f"{sr.rejected} rejected by QC, {len(sr.exhausted)} slots out of tries")
    if not res.merged:
        print(f"shard done; when every shard has finished run: medsynth expand --merge {args.out}")
        return 0 if not res.shards[0].exhausted else 1
    print(f"expanded: {res.n_synthetic} synthetic + {res.n_real} real cases -> {res.dataset_dir}")
    print(f"  combined manifest: {res.dataset_dir / 'combined_manifest.json'}")
    return 0 if not res.summary.get("exhausted_slots") else 1


# --------------------------------------------------------------------------------------------
# audit, release, send
# --------------------------------------------------------------------------------------------


def _add_audit(sub) -> None:
    p = _verb(sub, "audit",
              "membership inference: can an attacker tell the run's training cases from unseen real cases? "
              "(denoising-loss and nearest-synthetic-sample attacks, AUC with a bootstrap CI)",
              "medsynth audit runs/demo --manifest data/manifest.json --holdout holdout/manifest.json --out audit/",
              _run_audit)
    p.add_argument("run", type=Path, metavar="RUN", help="run folder of 'medsynth train'")
    p.add_argument("--manifest", type=Path, required=True, metavar="TRAIN",
                   help="the manifest the run was trained on (its training split are the members)")
    p.add_argument("--holdout", type=Path, required=True, metavar="HOLDOUT",
                   help="real cases the model never saw (the non-members); cases that are training files are dropped")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="write DIR/audit.json (no case ids in it)")
    p.add_argument("--samples", type=Path, default=None, metavar="SAMPLES_DIR",
                   help="synthetic samples for the nearest-sample attack (default: generate --n-synthetic in memory)")
    p.add_argument("--n-synthetic", type=int, default=16, metavar="N", help="samples to generate (default 16)")
    p.add_argument("--draws", type=int, default=4, help="noise draws per timestep of the loss attack (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of noise draws, samples and bootstrap (default 0)")
    p.add_argument("--control", action="store_true",
                   help="also audit the same model with noise-only weights (should give AUC about 0.5)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's training.device")


def _run_audit(args: argparse.Namespace) -> int:
    passive_openmp_waits()
    from medsynth.privacy.audit import AuditSettings, run_audit

    st = AuditSettings(draws=args.draws, seed=args.seed, n_synthetic=args.n_synthetic)
    res = run_audit(args.run, args.manifest, args.holdout, out=args.out, samples=args.samples, settings=st,
                    device=args.device, control=args.control)
    print(res.table())
    if res.path is not None:
        print(f"wrote {res.path}")
    return 0


def _add_release(sub) -> None:
    p = _verb(sub, "release",
              "make an export into a release a privacy officer can sign: data card, privacy audit (memorisation, "
              "membership inference, PHI scan), SHA256SUMS and a DICOMDIR",
              "medsynth release exports/demo --run runs/demo --manifest data/manifest.json "
              "--holdout holdout/manifest.json --qc qc/ --licence CC-BY-4.0 --out releases/demo", _run_release)
    p.add_argument("export", type=Path, metavar="EXPORT_DIR", help="folder written by 'medsynth export'")
    p.add_argument("--run", type=Path, required=True, metavar="RUN", help="run folder the samples were generated by")
    p.add_argument("--manifest", type=Path, required=True, metavar="TRAIN", help="the manifest the run was trained on")
    p.add_argument("--holdout", type=Path, default=None, metavar="HOLDOUT",
                   help="real cases the model never saw: calibrate the memorisation screen and run the membership "
                        "audit (without it the audit is not run and the card says so)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="release folder (built beside it, then renamed)")
    p.add_argument("--force", action="store_true",
                   help="also release samples without a passing QC verdict (the data card says so)")
    p.add_argument("--qc", type=Path, default=None, metavar="QC_JSON",
                   help="qc.json of 'medsynth qc' (or its folder): pass rate and reasons over all generated samples")
    p.add_argument("--utility", type=Path, default=None, metavar="UTILITY_JSON",
                   help="utility.json of 'medsynth evaluate utility': its table goes into the card")
    p.add_argument("--licence", default=None, help="licence of the released data, e.g. CC-BY-4.0")
    p.add_argument("--name", default=None, help="release name in the card (default: the --out folder name)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's training.device")


def _run_release(args: argparse.Namespace) -> int:
    passive_openmp_waits()
    from medsynth.export.release import release_export

    res = release_export(args.export, args.run, args.manifest, args.out, holdout=args.holdout, force=args.force,
                         qc=args.qc, utility=args.utility, licence=args.licence, name=args.name, device=args.device)
    print(res.summary())
    return 0


def _add_send(sub) -> None:
    p = _verb(sub, "send", "send every DICOM file under a folder to a PACS (DICOM C-STORE)",
              "medsynth send releases/demo --host pacs.example.org --port 104 --called-aet PACS --calling-aet MEDSYNTH",
              _run_send)
    p.add_argument("directory", type=Path, metavar="DIR", help="release or export folder (DICOM found by content)")
    p.add_argument("--host", required=True, help="PACS host name or address")
    p.add_argument("--port", type=int, required=True, help="PACS DICOM port")
    p.add_argument("--called-aet", required=True, metavar="AET", help="the PACS's AE title")
    p.add_argument("--calling-aet", default="MEDSYNTH", metavar="AET", help="our AE title (default MEDSYNTH)")
    p.add_argument("--retries", type=int, default=2,
                   help="retries of a refused connection, aborted association or failed C-STORE (default 2)")
    p.add_argument("--timeout", type=float, default=30.0, help="network and DIMSE timeout in seconds (default 30)")


def _run_send(args: argparse.Namespace) -> int:
    from medsynth.export.send import send_dicom

    res = send_dicom(args.directory, args.host, args.port, args.called_aet, args.calling_aet, retries=args.retries,
                     timeout=args.timeout)
    print(res.summary())
    return 0 if res.ok else 1


# --------------------------------------------------------------------------------------------
# train, generate, demo
# --------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = _verb(sub, "train", "train the autoencoder and/or the latent diffusion model into a run folder",
              "medsynth train configs/demo.yaml --run runs/demo --manifest phantoms/manifest.json", _run_train)
    p.add_argument("config", type=Path, help="YAML config file")
    p.add_argument("--run", "--run-dir", dest="run", type=Path, required=True,
                   help="run folder (config, checkpoints, metrics, model card); under torchrun spell it "
                        "--run-dir (torchrun's own parser takes --run for an abbreviation of --run-path)")
    p.add_argument("--stage", choices=("autoencoder", "diffusion", "all", "controlnet", "lesion"), default="all",
                   help="stage to train (default all: autoencoder, then diffusion, then the config's lesion "
                        "inpainter; controlnet: the mask-conditioned ControlNet on a finished run, trained on the "
                        "manifest's label maps; lesion: the config's model.lesion_inpainter on a finished run)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoints")
    p.add_argument("--manifest", type=Path, help="data manifest (overrides data.manifest of the config)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides training.device")
    p.add_argument("--max-steps", type=int, help="stop each stage after N optimizer steps (checkpointed; "
                   "continue with --resume)")


def _run_train(args: argparse.Namespace) -> int:
    passive_openmp_waits()
    from medsynth.config import load_config
    from medsynth.model.train import train

    over = {"data": {"manifest": str(args.manifest.resolve())}} if args.manifest else None
    cfg = load_config(args.config, overrides=over)
    if args.stage == "controlnet":
        from medsynth.model.controlnet import train_controlnet

        s = train_controlnet(cfg, args.run, resume=args.resume, device=args.device)
        print(f"controlnet: {s['steps']} steps in {s['seconds']:.0f} s, last loss {s['val']['loss']:.4g}, "
              f"labels {s['labels']}")
        print(f"run: {args.run} (controlnet: {args.run / 'controlnet' / 'last.pt'})")
        return 0
    res = train(cfg, args.run, stage=args.stage, resume=args.resume, device=args.device,
                max_steps=getattr(args, "max_steps", None))
    if not is_rank_zero():
        return 0  # under torchrun only rank 0 reports
    for s in res.summaries:
        val = " ".join(f"{k} {v:.4g}" for k, v in (s.get("val") or {}).items())
        print(f"{s['stage']}: {s['steps']} steps in {s['seconds']:.0f} s" + (f", val {val}" if val else ""))
    print(f"run: {res.run_dir}" + (f" (model card: {res.run_dir / 'model_card.json'})"
                                   if (res.run_dir / "model_card.json").is_file() else ""))
    return 0


def _add_generate(sub) -> None:
    p = _verb(sub, "generate", "sample synthetic volumes (NIfTI in physical units + JSON sidecars) from a trained run",
              "medsynth generate runs/demo -n 8 --out samples/ --seed 0 --class 1", _run_generate)
    p.add_argument("run", type=Path, help="run folder of 'medsynth train'")
    p.add_argument("-n", type=int, help="number of samples: indices START..START+N-1 (with --masks: at most N masks)")
    p.add_argument("--out", type=Path, required=True, help="samples folder (existing samples are kept: resume)")
    p.add_argument("--start", type=int, default=0, help="first sample index (default 0)")
    p.add_argument("--seed", type=int, default=0, help="global seed; sample i depends only on (seed, i)")
    p.add_argument("--class", dest="class_label", type=int,
                   help="class of every sample (default: classes in turn, index mod n_classes)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the run's sampling.steps)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: sampling.guidance_scale)")
    p.add_argument("--scheduler", choices=tuple(SCHEDULERS), help="default: sampling.scheduler")
    p.add_argument("--eta", type=float, help="stochasticity: DDIM's eta, or the rectified flow's share of fresh "
                   "noise per step, 0..1 (default: sampling.eta)")
    p.add_argument("--batch-size", type=int, help="samples per batch (does not change the results)")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw weights instead of the EMA weights")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's training.device")
    p.add_argument("--low-noise-run", type=Path, metavar="RUN2",
                   help="a second run on the same latent (a copy of RUN's autoencoder) that denoises the times "
                        "below --handover: two experts, e.g. a gated-skip UNet for the fine texture")
    p.add_argument("--handover", type=float, default=0.5,
                   help="with --low-noise-run: the fraction of the noise schedule below which it takes over "
                        "(default 0.5)")
    p.add_argument("--masks", type=Path, help="data manifest (its cases' labels) or folder of NIfTI masks: one image "
                   "per mask, following it (needs 'medsynth train ... --stage controlnet'); the mask is the label")
    p.add_argument("--memory-gb", type=float, metavar="G",
                   help="GPU memory of the card in GB (e.g. 16, 24, 40, 80): decode tiles chosen by medsynth's memory "
                        "model (medsynth/model/memory.py) instead of sampling.tiling, batch size 1")


def _run_generate(args: argparse.Namespace) -> int:
    passive_openmp_waits()
    from medsynth.errors import ConfigError
    from medsynth.model.sample import generate

    if args.low_noise_run is not None and (args.masks is not None or args.memory_gb is not None):
        raise ConfigError("--low-noise-run does not combine with --masks or --memory-gb yet",
                          hint="drop one of them")
    if args.masks is not None:
        from medsynth.model.controlnet import generate_from_masks

        if args.memory_gb is not None:
            raise ConfigError("--memory-gb does not apply to --masks sampling yet",
                              hint="drop --memory-gb; mask-conditioned sampling decodes with the run's sampling.tiling")

        if (args.n is not None and args.n < 1) or args.start < 0:
            raise ConfigError("-n must be >= 1 and --start >= 0")
        r = generate_from_masks(args.run, args.masks, args.out, seed=args.seed, start=args.start,
                                class_label=args.class_label, steps=args.steps, guidance=args.guidance,
                                scheduler=args.scheduler, use_ema=False if args.no_ema else None,
                                device=args.device, limit=args.n)
        print(f"wrote {len(r.written)} mask-conditioned samples to {r.out_dir}"
              + (f" ({len(r.skipped)} already there, kept)" if r.skipped else "")
              + (f"; {len(r.failed)} mask(s) failed, see {r.out_dir / 'masks_failed.json'}" if r.failed else ""))
        return 1 if r.failed else 0
    if args.n is None or args.n < 1 or args.start < 0:
        raise ConfigError("-n must be >= 1 and --start >= 0")
    sampler = None
    if args.memory_gb is not None:
        from medsynth.model.memory import apply_memory_budget
        from medsynth.model.sample import Sampler

        if args.memory_gb <= 0:
            raise ConfigError(f"--memory-gb must be > 0, got {args.memory_gb}")
        sampler = Sampler.from_run(args.run, device=args.device, use_ema=False if args.no_ema else None)
        est = apply_memory_budget(sampler, args.memory_gb)
        log.info("--memory-gb %g: decode tiles of %s latent voxels, estimated peak %.1f GiB", args.memory_gb,
                 " x ".join(map(str, est.latent_tile)), est.peak)
    res = generate(args.run, args.out, range(args.start, args.start + args.n), seed=args.seed,
                   class_label=args.class_label, steps=args.steps, guidance=args.guidance,
                   batch_size=args.batch_size, scheduler=args.scheduler, eta=args.eta,
                   use_ema=False if args.no_ema else None, device=args.device, sampler=sampler,
                   low_noise_run=args.low_noise_run, handover=args.handover)
    print(f"wrote {len(res.written)} samples to {res.out_dir}"
          + (f" ({len(res.skipped)} already there, kept)" if res.skipped else ""))
    return 0


def _add_demo(sub) -> None:
    p = _verb(sub, "demo", "write CT phantoms, train the built-in generator on them (CPU, minutes), sample, compare with "
              "the real phantoms", "medsynth demo --out medsynth-demo", _run_demo)
    p.add_argument("--out", type=Path, default=Path("medsynth-demo"), help="demo folder (default ./medsynth-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms and of sampling (default 0)")
    p.add_argument("--cases", type=int, default=128, help="number of phantoms to train on (default 128)")
    p.add_argument("--per-class", type=int, default=4, help="samples per class (default 4)")
    p.add_argument("--config", type=Path, help="another demo config (default: the built-in demo.yaml)")
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--labels", dest="labels", action="store_const", const=True, default=None,
                     help="learn image and label map together (data.use_labels; the built-in demo's default): "
                          "every sample comes with <id>_label.nii.gz (0 background, 1 lung, 2 lesion)")
    lab.add_argument("--no-labels", dest="labels", action="store_const", const=False,
                     help="image only (data.use_labels: false)")


def _run_demo(args: argparse.Namespace) -> int:
    passive_openmp_waits()
    from medsynth.demo import format_summary, run_demo

    res = run_demo(args.out, seed=args.seed, n_cases=args.cases, per_class=args.per_class, config_path=args.config,
                   labels=args.labels)
    print(format_summary(res))
    return 0


# --------------------------------------------------------------------------------------------
# parser and entry point
# --------------------------------------------------------------------------------------------

# Each stage adds its verb registrar to this list.
REGISTRARS: list[Callable] = [_add_env, _add_config, _add_data, _add_export, _add_export_bundle, _add_manifest,
                             _add_anonymise, _add_phi_scan, _add_evaluate, _add_qc, _add_expand,
                             _add_train, _add_generate, _add_demo, _add_audit, _add_release, _add_send]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medsynth",
        description="Synthetic 3D medical images with a latent diffusion model: train, generate, "
        "quality-check, de-identify, export.",
        epilog=EPILOG_HELP,
    )
    parser.add_argument("--version", action="version", version=f"medsynth {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for reg in REGISTRARS:
        reg(sub)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    from medsynth.progress import set_progress

    level = logging.INFO
    if getattr(args, "quiet", False):
        level = logging.WARNING
    if getattr(args, "verbose", 0) >= 2 or getattr(args, "debug", False):
        level = logging.DEBUG
    if not is_rank_zero():
        level = max(level, logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if level > logging.DEBUG else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("medsynth")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # third-party notices (medsynth.notices, logged at DEBUG) are shown from -v on
    logging.getLogger("medsynth.notices").setLevel(
        logging.DEBUG if getattr(args, "verbose", 0) >= 1 or getattr(args, "debug", False) else logging.NOTSET)
    if getattr(args, "no_progress", False):
        set_progress(False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    # MONAI announces optional GPU codecs on import; not actionable for users.
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except MedsynthError as exc:
        if debug:
            raise
        print(f"medsynth: error: {cli_message(exc, getattr(args, 'verb_parser', parser))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("medsynth: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(
            f"medsynth: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            "  rerun with --debug for the traceback and report it with the output of 'medsynth env'",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
