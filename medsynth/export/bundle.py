"""A trained run as a MONAI bundle (``medsynth export-bundle RUN --out DIR``).

Layout of ``DIR`` (the MONAI bundle specification's, with NV-Generate-CTMR's weight layouts)::

    configs/metadata.json     MONAI bundle metadata: versions, task, the model card's input contract,
                              intended use, network data format, initial weights and their licences
    configs/inference.json    ``python -m monai.bundle run --config_file configs/inference.json
                              --meta_file configs/metadata.json`` samples NIfTI volumes (needs medsynth)
    configs/medsynth.yaml     the run's resolved config (networks, grid, intensity map, sampling)
    configs/model_card.json   the run's model card
    models/autoencoder.pt     plain state dict (as NV-Generate ships ``autoencoder_v1.pt``)
    models/diffusion_unet.pt  {"unet_state_dict", "scale_factor", "num_train_timesteps"} (NV-Generate's
                              layout); the weights ``medsynth generate`` samples with (EMA by default)
    models/controlnet.pt      {"controlnet_state_dict", "labels"} when the run has a ControlNet
    docs/README.md            what it is, how to run it, licences, intended use

``inference.json`` calls :func:`sample_bundle` through a ``_target_`` (no ``$`` expressions): it
rebuilds medsynth's sampler from these files, so sample *i* for seed *s* is the volume
``medsynth generate RUN --seed s`` writes for index *i* (same networks, weights, scale factor and
intensity map).  The folder is built under a temporary name beside ``DIR`` and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from medsynth import __version__
from medsynth.errors import CheckpointError, ExportError
from medsynth.jobs import sha256_file, write_json, write_text

log = logging.getLogger("medsynth.export.bundle")

BUNDLE_VERSION = "0.1.0"
META_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
               "meta_schema_generator_20220718.json")
FILES = {"autoencoder": "models/autoencoder.pt", "unet": "models/diffusion_unet.pt",
         "controlnet": "models/controlnet.pt"}


@dataclass
class BundleResult:
    """The bundle folder and the files written into it (relative paths)."""

    out_dir: Path
    files: list[str]

    def summary(self) -> str:
        return (f"wrote MONAI bundle {self.out_dir} ({len(self.files)} files); sample with:\n"
                f"  cd {self.out_dir} && python -m monai.bundle run --config_file configs/inference.json "
                "--meta_file configs/metadata.json")


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def export_bundle(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                  use_ema: Optional[bool] = None) -> BundleResult:
    """Write the MONAI bundle of a finished run (checked by :func:`~medsynth.model.checkpoint.load_run`).

    ``use_ema`` picks the UNet weights (default: the run's ``sampling.use_ema``, as ``medsynth
    generate`` does).  Raises :class:`ExportError` when ``out_dir`` exists and is not empty
    (without ``overwrite``) and :class:`CheckpointError` for an unusable run.
    """
    from medsynth.config import config_to_dict, dump_yaml
    from medsynth.jobs import RunPaths
    from medsynth.model.checkpoint import load_checkpoint, load_run

    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out}: already exists and is not empty",
                          hint="pass `overwrite=True` or another `out_dir`")
    run = load_run(run_dir)
    cfg = run.cfg
    if cfg.model.low_noise_expert is not None:
        raise CheckpointError(f"{run.root}: has a low-noise expert (model.low_noise_expert); a MONAI bundle holds "
                              f"one diffusion UNet, so it would sample differently from the run",
                              hint="export a run without model.low_noise_expert, or share the run folder itself")
    if cfg.model.lesion_inpainter is not None or RunPaths(run.root).checkpoint("lesion").is_file():
        raise CheckpointError(f"{run.root}: has a lesion inpainter (model.lesion_inpainter, RUN/lesion/); a MONAI "
                              f"bundle holds one diffusion UNet, so its samples would have no painted lesions",
                              hint="export a run without model.lesion_inpainter, or share the run folder itself")
    ema = cfg.sampling.use_ema if use_ema is None else use_ema
    if ema and run.ema_state is None:
        raise CheckpointError(f"{run.root}: the diffusion checkpoint has no EMA weights", hint="pass `use_ema=False`")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("configs", "models", "docs"):
        (tmp / sub).mkdir(parents=True)
    try:
        torch.save(run.autoencoder_state, tmp / FILES["autoencoder"])
        torch.save({"unet_state_dict": run.ema_state if ema else run.unet_state,
                    "scale_factor": torch.tensor(run.scale_factor, dtype=torch.float64),
                    "num_train_timesteps": cfg.training.diffusion.num_train_timesteps,
                    "use_ema": bool(ema)}, tmp / FILES["unet"])
        cn_path = RunPaths(run.root).checkpoint("controlnet")
        if cn_path.is_file():
            cn = load_checkpoint(cn_path, "controlnet")
            if cn.get("diffusion_sha256") == run.diffusion_sha256:
                torch.save({"controlnet_state_dict": cn["model"], "labels": cn.get("labels"),
                            "conditioning_scale": cn.get("conditioning_scale", 1.0)}, tmp / FILES["controlnet"])
            else:
                log.warning("%s: trained on another diffusion model; not exported", cn_path)
        write_text(tmp / "configs" / "medsynth.yaml", dump_yaml(shareable_config(cfg)))
        write_json(tmp / "configs" / "model_card.json", run.card)
        models = {name: sha256_file(tmp / rel) for name, rel in FILES.items() if (tmp / rel).is_file()}
        meta = bundle_metadata(run.card, config_to_dict(cfg), models, bool(ema))
        write_json(tmp / "configs" / "metadata.json", meta)
        write_json(tmp / "configs" / "inference.json", inference_config(cfg))
        write_text(tmp / "docs" / "README.md", bundle_readme(run.card, meta, sorted(models)))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("export-bundle: %s -> %s", run.root, out)
    return BundleResult(out, files)


def shareable_config(cfg: Any) -> Any:
    """The run's config without the local paths of the machine it was trained on: the manifest and
    cache folder dropped, weight files (initial, perceptual, QC features) reduced to their file names."""
    import dataclasses

    def name(p: Optional[str]) -> Optional[str]:
        return None if p is None else Path(p).name

    m, t = cfg.model, cfg.training
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, manifest=None, cache_dir=None,
                                 cache="none" if cfg.data.cache == "disk" else cfg.data.cache),
        model=dataclasses.replace(m, autoencoder=dataclasses.replace(m.autoencoder, init=name(m.autoencoder.init)),
                                  unet=dataclasses.replace(m.unet, init=name(m.unet.init))),
        training=dataclasses.replace(
            t, autoencoder=dataclasses.replace(t.autoencoder, perceptual_weights=name(t.autoencoder.perceptual_weights)),
            controlnet=dataclasses.replace(t.controlnet, init=name(t.controlnet.init))),
        qc=dataclasses.replace(cfg.qc, feature_checkpoint=name(cfg.qc.feature_checkpoint)))


def bundle_metadata(card: dict[str, Any], cfg: dict[str, Any], models: dict[str, str], ema: bool) -> dict[str, Any]:
    """``configs/metadata.json``: the MONAI bundle metadata fields, filled from the model card."""
    from medsynth.model.checkpoint import weights_licenses
    from medsynth.versions import package_versions

    v = package_versions(("torch", "monai", "numpy", "nibabel", "PyYAML"))
    ic = card["input_contract"]
    lat = card["latent"]
    licenses = weights_licenses(card)
    classes = card.get("classes") or {}
    return {
        "schema": META_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by medsynth {__version__} from run '{card.get('name')}'"},
        "monai_version": v["monai"],
        "pytorch_version": (v["torch"] or "").split("+")[0],
        "numpy_version": v["numpy"],
        "required_packages_version": {"nibabel": v["nibabel"], "pyyaml": v["PyYAML"]},
        # inference.json calls medsynth's sampler: it must be installed to run the bundle
        "optional_packages_version": {"medsynth": __version__},
        "name": f"medsynth {card.get('name')}",
        "task": f"unconditional{' class-conditional' if classes.get('num_classes') else ''} synthesis of 3D "
                f"{ic['modality']} volumes (latent diffusion)",
        "description": card.get("description"),
        "authors": "trained with medsynth by the run's owner",
        "copyright": "the run's owner; initial weights keep their own licences (see 'licenses')",
        "data_source": f"local training data of the run (manifest '{(card.get('training_data') or {}).get('manifest_name')}')",
        "data_type": "nifti",
        "intended_use": card.get("intended_use"),
        "image_classes": f"{ic['modality']} volume in {ic['units']}, 1 channel",
        "label_classes": (card.get("labels") or {}).get("values"),
        "pred_classes": classes.get("names"),
        "eval_metrics": card.get("metrics"),
        "references": ["medsynth model card: configs/model_card.json",
                       "MONAI generative models (AutoencoderKL, DiffusionModelUNet, MAISI networks)"],
        "network_data_format": {
            "inputs": {"latent_noise": {
                "type": "noise", "format": "gaussian", "num_channels": lat["shape"][0],
                "spatial_shape": lat["shape"][1:], "dtype": "float32", "value_range": [],
                "is_patch_data": False, "channel_def": {}}},
            "outputs": {"pred": {
                "type": "image", "format": "hounsfield" if ic["modality"] == "CT" else "magnitude",
                "modality": ic["modality"], "num_channels": 1, "spatial_shape": ic["shape"], "dtype": "float32",
                "value_range": ic["value_range"], "is_patch_data": False, "channel_def": {"0": "image"}}},
        },
        "input_contract": ic,
        "licenses": licenses,
        "medsynth": {
            "version": __version__, "run": card.get("name"), "config_hash": card.get("config_hash"),
            "source_checkpoints": card.get("checkpoints"), "model_files_sha256": models, "unet_weights": "ema" if ema
            else "raw", "scale_factor": lat["scale_factor"], "classes": classes,
            "initial_weights": card.get("initial_weights") or {}, "sampling_defaults": cfg.get("sampling"),
        },
    }


def inference_config(cfg: Any) -> dict[str, Any]:
    """``configs/inference.json``: plain values and one ``_target_``; every key can be overridden on the
    command line (``--num_samples 8 --seed 3 --output_dir out``)."""
    keys = ("bundle_root", "output_dir", "num_samples", "start", "seed", "class_label", "steps", "guidance",
            "device")
    return {
        "bundle_root": ".",
        "output_dir": "samples",
        "num_samples": 4,
        "start": 0,
        "seed": 0,
        "class_label": None,
        "steps": None,
        "guidance": None,
        "device": "auto",
        "run": {"_target_": "medsynth.export.bundle.sample_bundle", **{k: f"@{k}" for k in keys}},
    }


def bundle_readme(card: dict[str, Any], meta: dict[str, Any], models: list[str]) -> str:
    """``docs/README.md`` of the bundle."""
    ic = card["input_contract"]
    lic = meta["licenses"]
    lic_lines = "\n".join(f"- {x['component']}: {x['license']} (initial weights `{x['file']}`, sha256 "
                          f"`{x['sha256']}`)" for x in lic) or "- no third-party initial weights (trained from scratch)"
    k = (card.get("classes") or {}).get("num_classes")
    return f"""# medsynth {card.get('name')}: synthetic {ic['modality']} volumes (MONAI bundle)

{card.get('description')}

**Intended use: {card.get('intended_use')}.**

## Run it

```bash
pip install "medsynth=={__version__}"   # inference.json calls medsynth's sampler
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --num_samples 8 --seed 3 --output_dir my_samples{' --class_label 1' if k else ''}
```

Run inside this folder (`bundle_root` is `.`; pass `--bundle_root DIR` otherwise). Samples go to
`samples/` (a relative `output_dir` is taken inside the bundle): `synth-<run>-<index>.nii.gz`,
float32 in {ic['units']} on a {' x '.join(map(str, ic['shape']))} grid of
{' x '.join(map(str, ic['spacing']))} mm ({ic['orientation']}), the run's affine, with a JSON sidecar
(seed, class, steps, checkpoint hashes). Sample *i* depends only on (seed, *i*) and equals what
`medsynth generate RUN --seed S` writes for index *i*.

## Files

| file | content |
|---|---|
| `configs/metadata.json` | versions, task, input contract, intended use, licences |
| `configs/inference.json` | the sampling entry point (overridable keys: num_samples, start, seed, class_label, steps, guidance, device, output_dir) |
| `configs/medsynth.yaml`, `configs/model_card.json` | the run's config and model card |
{chr(10).join(f'| `{FILES[m]}` | {_FILE_DOC[m]} |' for m in models)}

The weight files load without medsynth into the MONAI networks of `configs/medsynth.yaml`
(`model` section; `kind: maisi` = `monai.apps.generation.maisi` networks) with
`net.load_state_dict(torch.load(path, weights_only=True))` (the UNet's under `"unet_state_dict"`).

## Licences

{lic_lines}

Synthetic data made with this bundle inherits these licences' terms; `medsynth export` writes them into
the dataset's `dataset.json` and manifest.
"""


_FILE_DOC = {"autoencoder": "autoencoder, plain state dict",
             "unet": "diffusion UNet: `unet_state_dict`, `scale_factor`, `num_train_timesteps`",
             "controlnet": "ControlNet: `controlnet_state_dict`, `labels` (mask-conditioned sampling: "
                           "`medsynth generate RUN --masks`)"}


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        else:
            raise ExportError(f"{out}: already exists and is not empty",
                              hint="pass `overwrite=True` or another `out_dir`")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# sampling from a bundle (the target of configs/inference.json)
# --------------------------------------------------------------------------------------------


def load_bundle_sampler(bundle_root: str | os.PathLike = ".", device: str = "auto") -> Any:
    """medsynth's :class:`~medsynth.model.sample.Sampler` rebuilt from a bundle's files: the config,
    the model card's intensity map and the weight files, loaded strictly."""
    from medsynth.config import config_from_dict, config_hash
    from medsynth.model.checkpoint import run_name, versions
    from medsynth.model.init_weights import load_into, read_init
    from medsynth.model.networks import build_autoencoder, build_unet, resolve_device
    from medsynth.model.sample import Sampler

    root = Path(bundle_root).resolve()
    meta_p, card_p, cfg_p = (root / "configs" / n for n in ("metadata.json", "model_card.json", "medsynth.yaml"))
    for p in (meta_p, card_p, cfg_p, root / FILES["autoencoder"], root / FILES["unet"]):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing; {root} is not a complete medsynth bundle",
                                  hint="export it again with 'medsynth export-bundle RUN --out DIR'")
    import yaml

    card = json.loads(card_p.read_text())
    meta = json.loads(meta_p.read_text())
    ms = meta.get("medsynth") or {}
    expected = ms.get("model_files_sha256") or {}
    for name, rel in FILES.items():
        if name in expected and sha256_file(root / rel) != expected[name]:
            raise CheckpointError(f"{root / rel}: does not match the sha256 in configs/metadata.json",
                                  hint="the bundle was edited or damaged; export it again")
    cfg = config_from_dict(yaml.safe_load(cfg_p.read_text()), source=str(cfg_p))
    ae, unet = build_autoencoder(cfg), build_unet(cfg)
    load_into(ae, read_init(root / FILES["autoencoder"], "autoencoder"))
    load_into(unet, read_init(root / FILES["unet"], "unet"))
    scale = float(card["latent"]["scale_factor"])
    ck = card.get("checkpoints") or {}
    # the provenance of 'medsynth generate RUN' (the config hash of the run's own config, local paths included)
    prov = {"checkpoint_sha256": (ck.get("diffusion") or {}).get("sha256"),
            "autoencoder_sha256": (ck.get("autoencoder") or {}).get("sha256"),
            "config_hash": card.get("config_hash", config_hash(cfg)),
            "use_ema": ms.get("unet_weights") == "ema", "versions": versions(),
            "bundle": {"version": meta.get("version"), "model_files_sha256": expected}}
    return Sampler(cfg, ae, unet, scale, card["input_contract"]["intensity_norm"], resolve_device(device), prov,
                   run_name(cfg))


def sample_bundle(bundle_root: str = ".", output_dir: str = "samples", num_samples: int = 4, start: int = 0,
                  seed: int = 0, class_label: Optional[int] = None, steps: Optional[int] = None,
                  guidance: Optional[float] = None, device: str = "auto") -> list[str]:
    """Sample ``num_samples`` volumes (indices ``start`` ...) from a bundle into ``output_dir`` (relative:
    inside the bundle) in medsynth's samples format; returns the sample ids written or kept."""
    from medsynth.errors import ConfigError
    from medsynth.model.sample import generate

    if int(num_samples) < 1 or int(start) < 0:
        raise ConfigError("num_samples must be >= 1 and start >= 0")
    root = Path(bundle_root).resolve()
    out = Path(output_dir)
    out = out if out.is_absolute() else root / out
    sampler = load_bundle_sampler(root, device)
    res = generate(None, out, range(int(start), int(start) + int(num_samples)), seed=int(seed),
                   class_label=None if class_label is None else int(class_label), steps=steps, guidance=guidance,
                   sampler=sampler)
    log.info("bundle: %d samples written, %d kept, in %s", len(res.written), len(res.skipped), out)
    return res.written + res.skipped
