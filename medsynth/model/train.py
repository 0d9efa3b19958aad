"""Training: stage 1 (autoencoder) and stage 2 (latent diffusion) into a run directory.

This module is the entry point :func:`train`; stage 1 is :mod:`.autoencoder_training`, stage 2
:mod:`.diffusion_training`, and beside them live the data (:mod:`.training_data`), the losses
(:mod:`.objectives`) and the bookkeeping every loop shares (:mod:`.bookkeeping`).  Both loops count optimizer steps.  All randomness of step ``s`` (batch
order, KL sampling noise, diffusion noise and timesteps, label dropout) comes from generators
that are pure functions of ``(training.seed, stage, s)``: a resumed run needs only the weights,
optimizer, LR-scheduler and EMA states of its last checkpoint to continue exactly where the
uninterrupted run would be, and no global random state is ever touched.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from medsynth.config import Config, as_config, dump_yaml
from medsynth.errors import CheckpointError, ConfigError
from medsynth.jobs import RunPaths, write_json, write_text
from medsynth.model.autoencoder_training import train_autoencoder
from medsynth.model.bookkeeping import StepCallback
from medsynth.model.checkpoint import checkpoint_config, load_checkpoint, versions
from medsynth.model.diffusion_training import train_diffusion
from medsynth.model.distributed import barrier, init_from_env, is_main, shutdown
from medsynth.model.fastpath import resolve_training_precision
from medsynth.model.networks import downsample_factor, resolve_device
from medsynth.model.training_data import prepare_data
from medsynth.registry import LATENT_KINDS

log = logging.getLogger("medsynth.model.train")


@dataclass
class TrainResult:
    """What :func:`train` did: the run folder and one summary per stage trained."""

    run_dir: Path
    summaries: list[dict[str, Any]]
    seconds: float


def train(cfg: Config | str | Path | dict[str, Any], run_dir: str | Path, stage: str = "all", resume: bool = False,
          device: Optional[str] = None, callback: Optional[StepCallback] = None,
          max_steps: Optional[int] = None) -> TrainResult:
    """Train ``stage`` ("autoencoder", "diffusion", "lesion" or "all") of ``cfg`` into ``run_dir``.

    With ``model.lesion_inpainter`` the lesion inpainter trains once stage 2 (and its low-noise expert)
    is complete (:mod:`medsynth.model.lesion`); ``stage="lesion"`` trains one onto a finished run.

    ``cfg`` is a :class:`~medsynth.config.Config`, a YAML path or a plain mapping.

    Writes the resolved config, versions, checkpoints, metrics logs and, once stage 2 is done, the
    model card.  An existing stage is refused unless ``resume`` is set; resuming checks that the
    config still matches (only step budgets, logging intervals, device and data paths may change).
    ``callback(stage, step)`` is called after every optimizer step (tests use it to interrupt).
    """
    cfg = as_config(cfg)
    if stage not in ("autoencoder", "diffusion", "lesion", "all"):
        raise ConfigError(f"`stage` must be autoencoder, diffusion, lesion or all, got {stage!r}")
    if stage == "lesion" and cfg.model.lesion_inpainter is None:
        raise ConfigError("`stage` lesion: the config has no model.lesion_inpainter",
                          hint="add a model.lesion_inpainter block to the config (docs/sampling.md)")
    paths = RunPaths(Path(run_dir))
    if resume and not paths.root.is_dir():
        raise CheckpointError(f"{paths.root}: no run to resume", hint="drop `resume=True` to start a new run")
    if stage == "lesion" and not paths.checkpoint("diffusion").is_file():
        raise CheckpointError(f"{paths.checkpoint('diffusion')}: the lesion inpainter paints a trained run's samples",
                              hint="train the run first: `stage='all'`")
    paths.root.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device or cfg.training.device)
    started_dist = init_from_env(dev.type)  # torchrun: one process per device, gloo or nccl
    if started_dist and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"`max_steps` must be >= 1, got {max_steps}")
    precision = {s: training_precision(cfg, s, dev) for s in ("autoencoder", "diffusion")}
    stages = ["autoencoder", "diffusion"] if stage == "all" else [stage]
    if stage == "diffusion" and not paths.checkpoint("autoencoder").is_file():
        raise CheckpointError(f"{paths.checkpoint('autoencoder')}: stage 2 needs a trained autoencoder",
                              hint="train it first: `stage='autoencoder'` (or `stage='all'`)")
    if resume and not any(paths.checkpoint(s).is_file() for s in stages):
        raise CheckpointError(f"{paths.root}: nothing to resume (no checkpoint of {' or '.join(stages)})",
                              hint="drop `resume=True` to start training")
    log.info("training %s of '%s' on %s (%s) into %s", " + ".join(stages), cfg.name, dev,
             ", ".join(f"{s} {precision.get(s, 'auto')}" for s in stages), paths.root)
    data = prepare_data(cfg)
    if cfg.data.use_labels and not cfg.data.labels:
        # the label set found in the data becomes part of the run's config (and of every checkpoint)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=data.info["labels"]))
    if is_main():
        write_text(paths.config, dump_yaml(cfg))
        write_json(paths.versions, versions())
    barrier()
    t0 = time.perf_counter()
    summaries = []
    try:
        for s in stages:
            if s == "lesion":
                continue
            fn = train_autoencoder if s == "autoencoder" else train_diffusion
            beside = None
            if s == "diffusion" and _expert_side_by_side(cfg, dev, started_dist, callback):
                beside = _ExpertBeside(cfg, paths, resume, max_steps)
            try:
                summaries.append(fn(cfg, paths, data, dev, precision[s], resume, callback, max_steps))
            except BaseException:
                if beside is not None:
                    beside.stop()
                raise
            if beside is not None:
                summaries.append(beside.join())
                barrier()
                continue
            barrier()
            if (s == "autoencoder" and LATENT_KINDS[cfg.model.autoencoder.kind].trained
                    and summaries[-1]["steps"] < cfg.training.autoencoder.steps):
                log.info("autoencoder stopped at step %d of %d (--max-steps); continue with --resume",
                         summaries[-1]["steps"], cfg.training.autoencoder.steps)
                break
            if s == "diffusion" and cfg.model.low_noise_expert is not None:
                if summaries[-1]["steps"] < cfg.training.diffusion.steps:
                    log.info("diffusion stopped at step %d of %d (--max-steps); the low-noise expert follows "
                             "with --resume", summaries[-1]["steps"], cfg.training.diffusion.steps)
                    break
                summaries.append(_train_low_noise_expert(cfg, paths, data, dev, resume, callback, max_steps))
                barrier()
        if cfg.model.lesion_inpainter is not None and stage != "autoencoder" and _stage2_complete(cfg, paths):
            from medsynth.model.lesion import train_lesion

            log.info("training the lesion inpainter (model.lesion_inpainter) into %s", paths.root / "lesion")
            summaries.append(train_lesion(cfg, paths, data, dev, resume and paths.checkpoint("lesion").is_file(),
                                          callback, max_steps))
            barrier()
    finally:
        if started_dist:
            shutdown()
    return TrainResult(paths.root, summaries, round(time.perf_counter() - t0, 1))


def _stage2_complete(cfg: Config, paths: RunPaths) -> bool:
    """Whether stage 2 (and the run's low-noise expert) finished: the lesion inpainter trains after them."""
    from medsynth.model.checkpoint import is_complete

    need = [paths.checkpoint("diffusion")]
    if cfg.model.low_noise_expert is not None:
        need.append(paths.low_noise.checkpoint("diffusion"))
    return all(p.is_file() and is_complete(load_checkpoint(p, "diffusion")) for p in need)


def _train_low_noise_expert(cfg: Config, paths: RunPaths, data: Any, dev: torch.device, resume: bool,
                            callback: Optional[StepCallback], max_steps: Optional[int]) -> dict[str, Any]:
    """Stage 2 of ``model.low_noise_expert`` into ``RUN/low_noise/``: a run folder of its own (config,
    versions, a copy of the run's autoencoder, its diffusion checkpoint and model card) trained on the
    run's data and latent; resumed with the run."""
    import shutil

    from medsynth.config import expert_config
    from medsynth.jobs import atomic_path

    ecfg = expert_config(cfg)
    ep = paths.low_noise
    if is_main():
        with atomic_path(ep.checkpoint("autoencoder")) as tmp:
            shutil.copyfile(paths.checkpoint("autoencoder"), tmp)
        write_text(ep.config, dump_yaml(ecfg))
        write_json(ep.versions, versions())
    barrier()
    log.info("training the low-noise expert (times below %g of the schedule) into %s",
             cfg.model.low_noise_expert.handover, ep.root)
    out = train_diffusion(ecfg, ep, data, dev, training_precision(ecfg, "diffusion", dev),
                          resume and ep.checkpoint("diffusion").is_file(), callback, max_steps)
    return {**out, "expert": "low_noise"}


def _expert_side_by_side(cfg: Config, dev: torch.device, distributed: bool, callback: Optional[StepCallback]) -> bool:
    """Whether ``model.low_noise_expert`` trains beside the run's own stage 2 (see
    :class:`medsynth.config.LowNoiseExpertConfig`): on the CPU, with two threads or more, outside
    torchrun and without a per-step callback (which cannot reach another process)."""
    e = cfg.model.low_noise_expert
    if e is None or e.side_by_side is False or dev.type != "cpu" or distributed or callback is not None:
        return False
    if e.side_by_side is True:
        return True
    return torch.get_num_threads() >= 2


class _ExpertBeside:
    """The low-noise expert trained in a second process while this one trains the run's own stage 2,
    the CPU threads split between them; :meth:`join` waits for it and returns its summary or raises
    its error (the same kind, message and fix).  The child dies with this process (Linux), so an
    interrupted run leaves no trainer behind; both checkpoint and resume on their own."""

    def __init__(self, cfg: Config, paths: RunPaths, resume: bool, max_steps: Optional[int]):
        import multiprocessing as mp

        n = torch.get_num_threads()
        self.threads = n
        child_threads = max(1, n // 2)
        torch.set_num_threads(max(1, n - child_threads))
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.proc = ctx.Process(target=_expert_child, name="medsynth-low-noise-expert", daemon=True,
                                args=(cfg, str(paths.root), resume, max_steps, child_threads,
                                      logging.getLogger("medsynth").getEffectiveLevel(), self.queue))
        self.proc.start()
        log.info("training the low-noise expert beside stage 2 (%d + %d threads)", n - child_threads, child_threads)

    def stop(self) -> None:
        """End the expert's process (this process failed or was interrupted); its last checkpoint stays."""
        self.proc.terminate()
        self.proc.join()
        torch.set_num_threads(self.threads)

    def join(self) -> dict[str, Any]:
        import queue

        try:
            while True:
                try:
                    kind, payload = self.queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self.proc.is_alive():
                        kind, payload = "died", self.proc.exitcode
                        break
            self.proc.join()
        except BaseException:
            self.stop()
            raise
        finally:
            torch.set_num_threads(self.threads)
        if kind == "ok":
            return payload
        if kind == "died":
            raise CheckpointError(f"the low-noise expert's training process ended without a result (exit code "
                                  f"{payload})", hint="run `medsynth train` again with `resume=True`; it continues "
                                  "both experts from their last checkpoints")
        import medsynth.errors as errors

        cls, message, hint = payload
        raise getattr(errors, cls, errors.MedsynthError)(message, hint=hint)


def _expert_child(cfg: Config, root: str, resume: bool, max_steps: Optional[int], threads: int, level: int,
                  out: Any) -> None:
    """Entry of the side-by-side expert process (spawned: a fresh interpreter)."""
    import sys

    from medsynth.errors import MedsynthError
    from medsynth.progress import set_progress

    try:  # die with the parent (Linux): an interrupted run leaves no orphan writing checkpoints
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's stop() is then the only way it ends early
        log.debug("the low-noise expert's process cannot follow its parent's death on this system")
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    logging.getLogger("medsynth").setLevel(level)
    set_progress(False)  # one progress bar: the run's own stage 2
    try:
        paths = RunPaths(Path(root))
        out.put(("ok", _train_low_noise_expert(cfg, paths, prepare_data(cfg), torch.device("cpu"), resume, None,
                                               max_steps)))
    except MedsynthError as exc:
        out.put(("error", (type(exc).__name__, exc.message, exc.hint)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it there
        out.put(("error", ("MedsynthError", f"the low-noise expert's training failed: {type(exc).__name__}: {exc}",
                           None)))


def training_precision(cfg: Config, stage: str, device: torch.device) -> str:
    """The precision ``stage`` trains in (:func:`medsynth.model.fastpath.resolve_training_precision`):
    ``training.precision: auto`` decides by the grid the stage's network sees, the image grid for
    the autoencoder, the latent grid for the diffusion UNet and the ControlNet."""
    import math

    f = 1 if stage == "autoencoder" else downsample_factor(cfg)
    voxels = math.prod(s // f for s in cfg.data.shape)
    return resolve_training_precision(cfg.training.precision, device, voxels)


def load_stage_config(run_dir: Path) -> Config:
    """The config stored in a run's latest checkpoint (diffusion, else autoencoder)."""
    paths = RunPaths(Path(run_dir))
    for s in ("diffusion", "autoencoder"):
        if paths.checkpoint(s).is_file():
            return checkpoint_config(load_checkpoint(paths.checkpoint(s), s), paths.checkpoint(s))
    raise CheckpointError(f"{run_dir}: no checkpoint found")
