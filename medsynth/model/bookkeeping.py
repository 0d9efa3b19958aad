"""What every training loop does besides the step: the metrics log, checks that a resumed stage
was made with the same config, the common checkpoint fields, :class:`StepBook` (which logs,
validates, saves and reports after each optimizer step), a stage's resumable state and its
initial weights."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

from medsynth.config import Config, config_hash, config_to_dict
from medsynth.errors import CheckpointError
from medsynth.jobs import RunPaths, write_text
from medsynth.model.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, versions
from medsynth.model.distributed import is_main
from medsynth.model.init_weights import InitWeights, config_init

log = logging.getLogger("medsynth.model.train")

#: ``callback(stage, step)`` after every optimizer step (tests use it to interrupt a run).
StepCallback = Callable[[str, int], None]


class MetricsLog:
    """Append-only JSONL of training records; on resume, records after the checkpoint are dropped
    so the log reads as if the run had never been interrupted."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if int(rec.get("step", 0)) <= resume_step:
                    keep.append(line)
        write_text(path, "".join(k + "\n" for k in keep))

    def write(self, rec: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


# Keys that may change between an interrupted run and its resumption (budget, bookkeeping, paths).
RESUMABLE = {"name", "data.manifest", "data.cache", "data.cache_dir", "data.num_workers", "training.device",
              "training.checkpoint_every", "training.autoencoder.steps", "training.autoencoder.val_every",
              "training.autoencoder.log_every", "training.diffusion.steps", "training.diffusion.val_every",
              "training.diffusion.log_every",
              # how the low-noise expert is scheduled (beside or after stage 2), not what it learns; runs
              # stored before the key existed lack it
              "model.low_noise_expert.side_by_side",
              # initial weights only seed a fresh stage (their sha256 is in the checkpoint): they may move
              "model.autoencoder.init", "model.unet.init", "training.controlnet.init",
              # the lesion inpainter's budget and how it paints, not what it learns
              "model.lesion_inpainter.steps", "model.lesion_inpainter.log_every",
              "model.lesion_inpainter.sample_steps", "model.lesion_inpainter.sample_eta"}

# Keys of a stage trained after (and from) the others: compared only when a check names them, so a
# lesion inpainter can be added to (or dropped from) a run whose stages are trained.
SEPARATE = ("model.lesion_inpainter",)


# What each stage's weights depend on: a resumed stage (or stage 2 on top of stage 1) must agree.
AE_KEYS = ("data", "model.autoencoder", "training.seed", "training.precision", "training.autoencoder")
DIFFUSION_KEYS = ("data", "model", "training.seed", "training.precision", "training.scheduler",
                   "training.diffusion")
LESION_KEYS = ("data", "model.lesion_inpainter", "training.seed", "training.precision")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: d}


def config_differences(stored: dict[str, Any], current: Config, sections: tuple[str, ...]) -> list[str]:
    """Keys under ``sections`` (key prefixes) whose values differ between a stored config and ``current``,
    ignoring the keys that may legitimately change on resume.  A key the stored config lacks (it was
    written before the key existed) counts as its default, which keeps the behaviour of the version
    that wrote it."""
    a, b = {**_flatten(config_to_dict(Config())), **_flatten(stored)}, _flatten(config_to_dict(current))
    def named(k: str) -> bool:
        if not any(k == s or k.startswith(s + ".") for s in sections):
            return False
        sep = [p for p in SEPARATE if k == p or k.startswith(p + ".")]
        return not sep or any(s == p or s.startswith(p + ".") for p in sep for s in sections)

    keys = sorted(k for k in set(a) | set(b) if named(k) and k not in RESUMABLE)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def check_compatible(ck: dict[str, Any], cfg: Config, path: Path, sections: tuple[str, ...]) -> None:
    diffs = config_differences(ck["config"], cfg, sections)
    if diffs:
        raise CheckpointError(f"{path}: was trained with a different config ({'; '.join(diffs[:6])}"
                              f"{' ...' if len(diffs) > 6 else ''})",
                              hint="use the run's own config (RUN/config.yaml) or start a new `run_dir` folder")


def existing_checkpoint(ck_path: Path, stage: str, cfg: Config, resume: bool, keys: tuple[str, ...],
                         done: str) -> Optional[dict[str, Any]]:
    """The stage's checkpoint to resume from (None when there is none); refused without ``resume``
    or when it was made with another config."""
    if not ck_path.is_file():
        return None
    if not resume:
        raise CheckpointError(f"{ck_path}: exists; this run already {done}",
                              hint="pass `resume=True` to continue it, or choose a new `run_dir` folder")
    ck = load_checkpoint(ck_path, stage)
    check_compatible(ck, cfg, ck_path, keys)
    return ck


def base_payload(cfg: Config, stage: str, step: int, steps: int) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "stage": stage, "config": config_to_dict(cfg),
            "config_hash": config_hash(cfg), "step": step, "steps": steps, "versions": versions(),
            "rng": {"scheme": "per-step torch.Generator seeded from (training.seed, stage, step)",
                    "seed": cfg.training.seed}}


def epoch_line(stage: str, step: int, steps: int, per_epoch: int, sums: dict[str, float], count: int,
                val: Optional[dict[str, float]], seconds: float) -> None:
    epoch = math.ceil(step / per_epoch)
    parts = " ".join(f"{k} {v / max(count, 1):.4g}" for k, v in sums.items())
    vtxt = (" | val " + " ".join(f"{k} {v:.4g}" for k, v in val.items())) if val else ""
    log.info("%s epoch %d/%d step %d/%d | %s%s | %.1f s", stage, epoch, math.ceil(steps / per_epoch),
             step, steps, parts, vtxt, seconds)


class StepBook:
    """What both training loops do after an optimizer step: the metrics log every ``log_every``
    steps, validation every ``val_every`` steps, a checkpoint every ``training.checkpoint_every``
    steps and at the last step of this call, the one-line epoch summary, then the callback.
    Rank 0 alone logs, validates and saves; ``val`` holds the latest validation metrics (saved in
    checkpoints)."""

    def __init__(self, stage: str, cfg: Config, t: Any, paths: RunPaths, step: int, per_epoch: int,
                 val: Optional[dict[str, float]], callback: Optional[StepCallback]):
        self.stage, self.t, self.per_epoch, self.callback = stage, t, per_epoch, callback
        self.checkpoint_every = cfg.training.checkpoint_every
        self.main = is_main()
        self.metrics = MetricsLog(paths.metrics(stage), step) if self.main else None
        self.val = val
        self.sums: dict[str, float] = {}
        self.count = 0
        self.t0 = self.t_epoch = time.perf_counter()

    def after_step(self, step: int, end: int, rec: dict[str, float], lr: float,
                   validate: Optional[Callable[[], dict[str, float]]], save: Callable[[], None]) -> None:
        t = self.t
        for k, v in rec.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if self.main:
            if step % t.log_every == 0 or step == t.steps:
                self.metrics.write({"stage": self.stage, "step": step, "lr": lr, **rec,
                                    "time_s": round(time.perf_counter() - self.t0, 3)})
            if validate is not None and (step % t.val_every == 0 or step == t.steps):
                self.val = validate()
                self.metrics.write({"stage": self.stage, "step": step, "val": self.val})
            if step % self.checkpoint_every == 0 or step == end:
                save()
            if step % self.per_epoch == 0 or step == t.steps:
                epoch_line(self.stage, step, t.steps, self.per_epoch, self.sums, self.count, self.val,
                            time.perf_counter() - self.t_epoch)
                self.sums, self.count, self.t_epoch = {}, 0, time.perf_counter()
        if self.callback is not None:
            self.callback(self.stage, step)

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


class Resumable:
    """A stage's training state: ``STATE`` maps each checkpoint entry to the attribute whose
    ``state_dict`` it holds; :meth:`state` and :meth:`load` resume the stage exactly."""

    STATE: dict[str, str] = {}

    def state(self) -> dict[str, Any]:
        return {key: getattr(self, attr).state_dict() for key, attr in self.STATE.items()}

    def load(self, ck: dict[str, Any]) -> None:
        for key, attr in self.STATE.items():
            getattr(self, attr).load_state_dict(ck[key])


def initial_weights_for(cfg: Config, role: str, ck_path: Path, resume: bool) -> Optional[InitWeights]:
    """The config's initial weights for ``role``, read only when the stage starts afresh (a resumed
    stage continues from its checkpoint, which records the file's sha256)."""
    if resume and ck_path.is_file():
        return None
    return config_init(cfg, role)
