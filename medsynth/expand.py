"""Dataset expansion: generate -> QC and memorisation gate -> PHI scan -> export, sharded and resumable.

The job is a fixed list of *slots* (one per synthetic case wanted), each with a class.  Slot ``j``
tries sample indices ``j, j + S, j + 2S, ...`` (``S`` = number of slots) until one passes QC, so
which sample fills a slot depends only on (run, seed, slot) — never on sharding, batch size or
restarts.  Shard ``i/n`` owns slots ``i, i+n, i+2n, ...``.

Job folder ``OUT``::

    job.json                          arguments and plan (written once; a rerun must match)
    shards/<i>-of-<n>/round-<r>/      candidates of try r (samples format), their QC verdicts,
                                      quarantine/ for rejected ones, qc/ (report)
    shards/<i>-of-<n>/accepted.json   the shard's accepted sample per slot (written when done)
    dataset/                          after merge: the export (imagesTr, labelsTr, dicom/, dataset.json,
                                      datalist.json, manifest.json) + combined_manifest.json and
                                      combined_datalist.json (real + synthetic)
    expand.json                       summary of the merged job

Every file appears atomically; after SIGKILL at any moment, rerunning the same command skips the
finished work and ends with the same voxels and ids as an uninterrupted run.

The module is callable: ``medsynth.expand(run, manifest, out, n=...)`` is :func:`expand`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from medsynth.callable_module import make_callable
from medsynth.errors import JobError, MedsynthError
from medsynth.jobs import create_or_check_record, parse_shard, sample_id, shard_items, write_json

log = logging.getLogger("medsynth.expand")

JOB_FORMAT = "medsynth-expand-job/1"
_JOB_KEYS = ("format", "run", "manifest_sha256", "seed", "slots", "formats", "max_tries", "steps", "guidance",
             "holdout_sha256", "uid_root")


@dataclass
class ShardResult:
    """What one shard did: accepted sample per slot, and slots that ran out of tries."""

    shard: tuple[int, int]
    accepted: dict[int, str] = field(default_factory=dict)
    exhausted: list[int] = field(default_factory=list)
    generated: int = 0
    rejected: int = 0


@dataclass
class ExpandResult:
    out_dir: Path
    shards: list[ShardResult]
    merged: bool
    dataset_dir: Optional[Path] = None
    n_synthetic: int = 0
    n_real: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------


def plan_slots(manifest_cases: Sequence[Any], classes: Optional[list[int]], *, n: Optional[int] = None,
               per_class: Optional[int] = None, factor: Optional[float] = None) -> list[Optional[int]]:
    """The class of every slot, from exactly one of ``n``, ``per_class`` or ``factor``.

    ``n``: N slots, classes round-robin.  ``per_class``: N per class.  ``factor``: K times the real
    cases of each class (K times the whole manifest for an unconditional model).
    """
    given = [x is not None for x in (n, per_class, factor)]
    if sum(given) != 1:
        raise JobError("give exactly one of `n`, `per_class` or `factor`")
    if classes is None:
        if per_class is not None:
            raise JobError("`per_class` needs a class-conditional model; this run is unconditional", hint="use `n`")
        total = n if n is not None else int(round(float(factor) * len(manifest_cases)))  # type: ignore[arg-type]
        if total < 1:
            raise JobError(f"the job asks for {total} synthetic cases; need at least 1")
        return [None] * total
    if n is not None:
        if n < 1:
            raise JobError(f"`n` must be >= 1, got {n}")
        return [classes[j % len(classes)] for j in range(n)]
    if per_class is not None:
        if per_class < 1:
            raise JobError(f"`per_class` must be >= 1, got {per_class}")
        return [c for _ in range(per_class) for c in classes]
    if factor is None or factor <= 0:
        raise JobError(f"`factor` must be > 0, got {factor}")
    counts = {c: sum(1 for case in manifest_cases if case.class_label == c) for c in classes}
    if not any(counts.values()):
        raise JobError("`factor`: no manifest case has a class label the model knows",
                       hint="use `n` or `per_class`, or a manifest with class_label")
    out: list[Optional[int]] = []
    for c in classes:
        out += [c] * int(round(float(factor) * counts[c]))
    if not out:
        raise JobError("`factor` gives 0 synthetic cases; use a larger one")
    return out


def _read_record(path: Path, what: str) -> dict[str, Any]:
    """A job record (job.json, a shard's accepted.json) as a dict; JobError naming it if damaged."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise JobError(f"{path}: {what} is not readable JSON ({type(exc).__name__})",
                       hint="delete it and rerun the same command; finished work is redone from the files") from None
    if not isinstance(rec, dict):
        raise JobError(f"{path}: {what} is not a JSON object",
                       hint="delete it and rerun the same command; finished work is redone from the files")
    return rec


def _accepted(rec: dict[str, Any], path: Path) -> tuple[dict[int, str], list[int]]:
    """The slot -> sample sidecar map and exhausted slots of a shard's accepted.json."""
    try:
        accepted = {int(k): str(v) for k, v in rec["accepted"].items()}
        exhausted = [int(x) for x in rec.get("exhausted", [])]
    except (KeyError, AttributeError, TypeError, ValueError):
        raise JobError(f"{path}: not a shard record (needs 'accepted': {{slot: sidecar}} and 'exhausted')",
                       hint="delete it and rerun the shard") from None
    return accepted, exhausted


def candidate_index(slot: int, attempt: int, n_slots: int) -> int:
    """Sample index tried for ``slot`` at ``attempt``: ``slot + attempt * n_slots`` (never reused)."""
    return slot + attempt * n_slots


# ---------------------------------------------------------------------------------------------
# one shard
# ---------------------------------------------------------------------------------------------


def _status(rdir: Path, sid: str) -> str:
    """'rejected' (quarantined), 'accepted' (passing verdict), 'judge' (sample without verdict), 'todo'."""
    if (rdir / "quarantine" / f"{sid}.json").is_file():
        return "rejected"
    side, verdict = rdir / f"{sid}.json", rdir / f"{sid}.qc.json"
    if side.is_file() and verdict.is_file():
        try:
            rec = json.loads(verdict.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return "judge"
        # only a verdict that says passed: true accepts; anything else is judged again
        return "accepted" if isinstance(rec, dict) and rec.get("passed") is True else "judge"
    if side.is_file():
        return "judge"
    return "todo"


def run_shard(run_dir: Path, manifest: Path, out_dir: Path, slots: list[Optional[int]], shard: tuple[int, int],
              seed: int, max_tries: int, *, steps: Optional[int] = None, guidance: Optional[float] = None,
              batch_size: Optional[int] = None, holdout: Optional[Path] = None, device: Optional[str] = None) -> ShardResult:
    """Generate and QC the slots this shard owns, round by round, until each has a passing sample."""
    from medsynth.model.sample import Sampler, generate
    from medsynth.qc.gate import load_qc_config, run_qc

    i, n = shard
    sdir = out_dir / "shards" / f"{i}-of-{n}"
    done_path = sdir / "accepted.json"
    res = ShardResult(shard)
    if done_path.is_file():
        res.accepted, res.exhausted = _accepted(_read_record(done_path, "the shard record"), done_path)
        log.info("shard %d/%d already finished (%d slots)", i, n, len(res.accepted))
        return res
    mine = shard_items(list(range(len(slots))), shard)
    pending = list(mine)
    sampler = None
    cfg, _ = load_qc_config(run_dir=run_dir)
    for attempt in range(max_tries):
        if not pending:
            break
        rdir = sdir / f"round-{attempt}"
        cand = {j: candidate_index(j, attempt, len(slots)) for j in pending}
        status = {}
        run_name = None
        for j, idx in cand.items():
            if run_name is None:
                from medsynth.model.checkpoint import run_name as _rn

                run_name = _rn(cfg)  # type: ignore[arg-type]
            status[j] = _status(rdir, sample_id(run_name, idx))
        todo = [j for j in pending if status[j] == "todo"]
        if todo:
            sampler = sampler or Sampler.from_run(run_dir, device=device)
            by_class: dict[Optional[int], list[int]] = {}
            for j in todo:
                by_class.setdefault(slots[j], []).append(cand[j])
            for cls, idxs in by_class.items():
                r = generate(run_dir, rdir, idxs, seed=seed, class_label=cls, steps=steps, guidance=guidance,
                             batch_size=batch_size, sampler=sampler)
                res.generated += len(r.written)
        if any(status[j] in ("todo", "judge") for j in pending):
            run_qc(rdir, manifest, rdir / "qc", cfg=cfg, holdout=holdout, quarantine=True,
                   grid_source="grid from the run's config")
        still = []
        for j in pending:
            st = _status(rdir, sample_id(run_name, cand[j]))  # type: ignore[arg-type]
            if st == "accepted":
                res.accepted[j] = str(Path(rdir.name) / f"{sample_id(run_name, cand[j])}.json")  # type: ignore[arg-type]
            else:
                res.rejected += 1
                still.append(j)
        pending = still
    res.exhausted = pending
    write_json(done_path, {"shard": [i, n], "accepted": {str(k): v for k, v in sorted(res.accepted.items())},
                           "exhausted": pending, "max_tries": max_tries})
    if pending:
        log.warning("shard %d/%d: %d slot(s) found no passing sample in %d tries", i, n, len(pending), max_tries)
    return res


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """A job folder's record and what its shards accepted."""

    record: dict[str, Any]
    manifest: Path
    n_shards: int
    n_slots: int
    accepted: dict[int, Path] = field(default_factory=dict)   # slot -> the accepted sample's sidecar
    exhausted: list[int] = field(default_factory=list)        # slots that ran out of tries


def _read_job(out_dir: Path) -> _Job:
    """The job record and every shard's accepted samples; JobError while a shard has not finished."""
    job_path = out_dir / "job.json"
    if not job_path.is_file():
        raise JobError(f"{out_dir}: not an expand job folder (no job.json)",
                       hint="pass the folder written by 'medsynth expand ... --out DIR'")
    record = _read_record(job_path, "the job record")
    try:
        job = _Job(record, Path(record["manifest"]), int(record["n_shards"]), len(record["slots"]))
    except (KeyError, TypeError, ValueError):
        raise JobError(f"{job_path}: not an expand job record (needs n_shards, manifest, slots)",
                       hint="rerun 'medsynth expand' with the original arguments into a new `out_dir` folder") from None
    missing = []
    for i in range(job.n_shards):
        sdir = out_dir / "shards" / f"{i}-of-{job.n_shards}"
        rec_path = sdir / "accepted.json"
        if not rec_path.is_file():
            missing.append(f"{i}/{job.n_shards}")
            continue
        shard_accepted, shard_exhausted = _accepted(_read_record(rec_path, "the shard record"), rec_path)
        for k, v in shard_accepted.items():
            job.accepted[k] = sdir / v
        job.exhausted += shard_exhausted
    if missing:
        raise JobError(f"{out_dir}: shard(s) {', '.join(missing)} have not finished",
                       hint="run the missing shards (the same arguments with `shard='i/n'`), then merge again")
    return job


def _gather(job: _Job, stage: Path, out_dir: Path) -> list[int]:
    """Link the accepted samples into ``stage`` (fresh; copies across filesystems); the slots whose
    sample is damaged are left out and returned."""
    from medsynth.samples import read_sample

    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    broken: list[int] = []
    for slot in sorted(job.accepted):
        try:
            s = read_sample(job.accepted[slot])
        except MedsynthError as exc:  # one broken sample is left out, never the whole merge
            log.warning("slot %d: accepted sample left out: %s", slot, exc.message)
            broken.append(slot)
            continue
        for p in (s.image_path, s.label_path, s.qc_path, s.sidecar_path):
            if p is not None and p.is_file():
                _link(p, stage / p.name)
    if job.accepted and len(broken) == len(job.accepted):
        raise JobError(f"{out_dir}: every accepted sample is damaged ({len(broken)}); nothing to export",
                       hint="delete the shards' accepted.json files and rerun to generate and judge them again")
    return broken


def _combined_manifest(job: _Job, dataset: Path) -> tuple[Any, int, int]:
    """Real cases (paths back to the originals) + the exported synthetic cases; (manifest, n real, n synthetic)."""
    from medsynth.manifest import Case, Manifest, load_manifest

    real = load_manifest(job.manifest)
    cases = [Case(c.id, c.image, c.label, c.class_label, c.modality, c.shape, c.spacing, c.sha256,
                  {**c.extra, "synthetic": False}) for c in real.cases]
    n_syn = 0
    syn_manifest = dataset / "manifest.json"
    if syn_manifest.is_file():
        for c in load_manifest(syn_manifest).cases:
            c.extra["synthetic"] = True
            cases.append(c)
            n_syn += 1
    rec = job.record
    combined = Manifest(cases, name=f"{real.name}+synthetic", modality=real.modality,
                        extra={"description": "real training cases plus QC-passed synthetic cases from medsynth expand",
                               "job": {k: rec[k] for k in ("run", "seed", "n_slots") if k in rec}})
    return combined, len(real.cases), n_syn


def merge(out_dir: str | Path, formats: Optional[Sequence[str]] = None) -> ExpandResult:
    """Join the shards of a job folder: export the accepted samples and write the combined manifest.

    Refuses (:class:`JobError`) while a shard has not finished.  Safe to rerun.
    """
    from medsynth.export.dataset import export_samples
    from medsynth.manifest import save_manifest

    out_dir = Path(out_dir)
    job = _read_job(out_dir)
    stage = out_dir / "work" / "accepted"
    broken = _gather(job, stage, out_dir)
    dataset = out_dir / "dataset"
    if job.accepted:
        # the export runs the PHI scan against the training manifest and publishes only if clean
        export_samples(stage, dataset, formats=formats or job.record["formats"], uid_root=job.record.get("uid_root"),
                       reference=job.manifest, overwrite=True, name=job.record.get("name"))
    combined, n_real, n_syn = _combined_manifest(job, dataset)
    dataset.mkdir(parents=True, exist_ok=True)
    save_manifest(combined, dataset / "combined_manifest.json")
    _write_combined_datalist(combined, dataset / "combined_datalist.json")
    summary = {"format": "medsynth-expand/1", "n_real": n_real, "n_synthetic": n_syn,
               "n_slots": job.n_slots, "exhausted_slots": sorted(job.exhausted), "broken_slots": broken,
               "dataset": "dataset", "shards": job.n_shards}
    write_json(out_dir / "expand.json", summary)
    return ExpandResult(out_dir, [], True, dataset, n_syn, n_real, summary)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_combined_datalist(man: Any, path: Path) -> None:
    """A Decathlon-style datalist of real + synthetic cases, paths relative to ``path``'s folder."""
    from medsynth.manifest import relative_path

    items = []
    for c in man.cases:
        if c.image.is_dir() or c.extra.get("series_files"):
            continue  # DICOM series are not valid Decathlon entries; they stay in the manifest
        it: dict[str, Any] = {"image": relative_path(c.image, path.parent), "id": c.id,
                              "synthetic": bool(c.extra.get("synthetic"))}
        if c.label is not None:
            it["label"] = relative_path(c.label, path.parent)
        if c.class_label is not None:
            it["class_label"] = c.class_label
        items.append(it)
    write_json(path, {"name": man.name, "training": items})


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------


def expand(run_dir: str | Path, manifest: str | Path, out_dir: str | Path, *, n: Optional[int] = None,
           per_class: Optional[int] = None, factor: Optional[float] = None, seed: int = 0,
           shard: Optional[str] = None, formats: Sequence[str] = ("nifti",), max_tries: int = 5,
           steps: Optional[int] = None, guidance: Optional[float] = None, batch_size: Optional[int] = None,
           holdout: Optional[str | Path] = None, uid_root: Optional[str] = None,
           device: Optional[str] = None) -> ExpandResult:
    """Run a dataset-expansion job (or one shard of it); without ``shard`` it also merges.

    Everything is checked before any compute: the run directory and model card, the manifest, the
    count arguments, the shard spec, and (on a rerun) that the arguments match the job record.
    """
    from medsynth.export.dataset import parse_formats
    from medsynth.jobs import sha256_file
    from medsynth.manifest import load_manifest
    from medsynth.model.checkpoint import load_run

    run_dir, manifest, out_dir = Path(run_dir), Path(manifest), Path(out_dir)
    sh = parse_shard(shard)
    fmts = parse_formats(list(formats))
    if max_tries < 1:
        raise JobError(f"`max_tries` must be >= 1, got {max_tries}")
    run = load_run(run_dir)
    man = load_manifest(manifest)
    k = run.cfg.model.unet.num_class_embeds
    classes = list(range(k)) if k else None
    slots = plan_slots(man.cases, classes, n=n, per_class=per_class, factor=factor)
    record = {"format": JOB_FORMAT, "run": str(run_dir.resolve()), "run_checkpoint": run.diffusion_sha256,
              "manifest": str(Path(man.path or manifest).resolve()),
              "manifest_sha256": sha256_file(man.path or manifest), "name": f"{run.name}-expanded",
              "seed": int(seed), "slots": slots, "n_slots": len(slots), "n_shards": sh[1], "formats": list(fmts),
              "max_tries": int(max_tries), "steps": steps, "guidance": guidance,
              "holdout": str(Path(holdout).resolve()) if holdout else None,
              "holdout_sha256": sha256_file(holdout) if holdout else None, "uid_root": uid_root}
    keys = _JOB_KEYS + (("n_shards",) if shard is not None else ())
    existing = create_or_check_record(out_dir / "job.json", record, keys)
    if shard is not None and int(existing["n_shards"]) != sh[1]:
        raise JobError(f"{out_dir}: job was split into {existing['n_shards']} shards, not {sh[1]}",
                       hint=f"use `shard='i/{existing['n_shards']}'`")
    if shard is None and int(existing["n_shards"]) != 1:
        raise JobError(f"{out_dir}: this job is sharded ({existing['n_shards']} shards)",
                       hint="run each shard with `shard='i/n'`, then merge them ('medsynth expand --merge DIR')")
    res = run_shard(run_dir, manifest, out_dir, slots, sh, seed, max_tries, steps=steps, guidance=guidance,
                    batch_size=batch_size, holdout=Path(holdout) if holdout else None, device=device)
    if shard is not None:
        return ExpandResult(out_dir, [res], False)
    merged = merge(out_dir)
    merged.shards = [res]
    return merged


make_callable(__name__, expand)
