"""Initial weights from local files (issue 18): NV-Generate / MAISI layouts, MONAI bundle folders,
medsynth runs; a frozen pretrained autoencoder (``training.autoencoder.steps: 0``); fine-tuning and
using a pretrained UNet; ControlNet on a pretrained UNet; one clear message per mismatch.

Every network here is a real MONAI / MAISI network with random weights and tiny channel counts,
saved in the layouts NVIDIA's NV-Generate-CTMR scripts read (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medsynth.config import ConfigError, config_from_dict
from medsynth.errors import CheckpointError
from medsynth.jobs import sha256_file
from medsynth.model.checkpoint import RunPaths, load_checkpoint
from medsynth.model.init_weights import load_into, read_init
from medsynth.model.networks import build_autoencoder, build_unet, seeded_init
from medsynth.model.train import train
from tests.helpers import merge, tiny_config

CT_LICENSE = "NVIDIA Open Model License"


def maisi_config(manifest, ae_init=None, unet_init=None, **sections) -> dict:
    """Tiny MAISI-architecture networks as NV-Generate's rectified-flow CT models are built:
    AutoencoderKlMaisi on [0, 1], DiffusionModelUNetMaisi with spacing input, residual up/down blocks
    and a modality table fed one fixed code (4 rows here, 128 in NV-Generate; code 1 = CT)."""
    model = {"autoencoder": {"kind": "maisi", "input_range": [0.0, 1.0]},
             "unet": {"kind": "maisi", "spacing_input": True, "resblock_updown": True, "num_class_embeds": None,
                      "fixed_class_embeds": 4, "fixed_class": 1}}
    if ae_init:
        model["autoencoder"].update(init=str(ae_init), init_license=CT_LICENSE)
    if unet_init:
        model["unet"].update(init=str(unet_init), init_license=CT_LICENSE)
    raw = tiny_config(manifest, model=model, training={"scheduler": "rflow", "autoencoder": {"steps": 0}},
                      sampling={"scheduler": "rflow", "steps": 2, "guidance_scale": 1.0})
    return merge(raw, sections)


def save_nv_generate(cfg, folder: Path, scale_factor: float = 0.75) -> tuple[Path, Path]:
    """Randomly initialised networks of ``cfg`` saved as NV-Generate-CTMR saves them: the autoencoder
    as a plain state dict, the UNet as {"unet_state_dict", "scale_factor", "epoch", "loss", ...}."""
    folder.mkdir(parents=True, exist_ok=True)
    with seeded_init(123):
        ae, unet = build_autoencoder(cfg), build_unet(cfg)
    ae_path, unet_path = folder / "autoencoder_v1.pt", folder / "diff_unet_3d_rflow-ct.pt"
    torch.save(ae.state_dict(), ae_path)
    torch.save({"epoch": 7, "loss": torch.tensor(0.1), "num_train_timesteps": 1000,
                "scale_factor": torch.tensor(scale_factor), "unet_state_dict": unet.state_dict()}, unet_path)
    return ae_path, unet_path


@pytest.fixture(scope="module")
def nv_files(tmp_path_factory):
    cfg = config_from_dict(maisi_config(None, training={"scheduler": "rflow", "autoencoder": {"steps": 4}}))
    return save_nv_generate(cfg, tmp_path_factory.mktemp("nv_generate") / "models")


# --------------------------------------------------------------------------------------------
# the "must show": frozen pretrained autoencoder + a few diffusion steps from NV-Generate files
# --------------------------------------------------------------------------------------------


def test_nv_generate_files_frozen_autoencoder_and_fine_tuned_unet(phantoms, nv_files, tmp_path):
    ae_path, unet_path = nv_files
    raw = maisi_config(phantoms, ae_path, unet_path)
    raw["training"]["diffusion"].update(steps=3, lr=1e-4, warmup_steps=2)
    res = train(config_from_dict(raw), tmp_path / "run")
    assert [(s["stage"], s["steps"]) for s in res.summaries] == [("autoencoder", 0), ("diffusion", 3)]

    paths = RunPaths(tmp_path / "run")
    ae_ck = load_checkpoint(paths.checkpoint("autoencoder"), "autoencoder")
    original = torch.load(ae_path, weights_only=True)
    assert ae_ck["step"] == ae_ck["steps"] == 0
    assert set(ae_ck["model"]) == set(original)
    assert all(torch.equal(ae_ck["model"][k], original[k]) for k in original)  # frozen: unchanged

    diff_ck = load_checkpoint(paths.checkpoint("diffusion"), "diffusion")
    start = torch.load(unet_path, weights_only=True)["unet_state_dict"]
    changed = [k for k in start if not torch.equal(diff_ck["model"][k], start[k])]
    assert changed, "the UNet was fine-tuned, so some weights moved"
    assert diff_ck["scale_factor"] == pytest.approx(0.75) and diff_ck["scale_factor_source"] == "model.unet.init"

    card = json.loads(paths.card.read_text())
    inits = card["initial_weights"]
    assert inits["autoencoder"]["sha256"] == sha256_file(ae_path) and inits["autoencoder"]["frozen"] is True
    assert inits["autoencoder"]["layout"] == "plain state_dict"
    assert inits["unet"]["sha256"] == sha256_file(unet_path) and inits["unet"]["fine_tuned_steps"] == 3
    assert inits["unet"]["layout"] == "'unet_state_dict' of a checkpoint dict"
    assert {inits[k]["license"] for k in inits} == {CT_LICENSE}
    assert card["latent"]["scale_factor"] == pytest.approx(0.75)

    # every sample's sidecar carries what it inherits from the initial weights
    from medsynth.model.sample import generate
    from medsynth.samples import list_samples

    generate(tmp_path / "run", tmp_path / "s", range(1), seed=0)
    (sample,) = list_samples(tmp_path / "s")
    lic = sample.sidecar["weights_licenses"]
    assert {x["component"] for x in lic} == {"autoencoder", "unet"} and {x["license"] for x in lic} == {CT_LICENSE}


def test_pretrained_unet_used_as_is_then_controlnet_on_it(phantoms, nv_files, tmp_path):
    """Both networks used as they are (steps 0), then a ControlNet (MAISI's) trained on the frozen UNet;
    a second ControlNet starts from the first one's weights saved as NV-Generate saves ControlNets."""
    from medsynth.model.controlnet import train_controlnet

    ae_path, unet_path = nv_files
    raw = maisi_config(phantoms, ae_path, unet_path)
    raw["training"]["diffusion"]["steps"] = 0
    raw["training"]["controlnet"] = {"steps": 2, "batch_size": 2, "log_every": 1}
    cfg = config_from_dict(raw)
    train(cfg, tmp_path / "run")
    diff_ck = load_checkpoint(RunPaths(tmp_path / "run").checkpoint("diffusion"), "diffusion")
    start = torch.load(unet_path, weights_only=True)["unet_state_dict"]
    assert diff_ck["step"] == diff_ck["steps"] == 0
    assert all(torch.equal(diff_ck["ema"]["model"][k], start[k]) for k in start)  # sampled as it came
    assert diff_ck["val_metrics"]["loss"] > 0

    s = train_controlnet(cfg, tmp_path / "run")
    assert s["steps"] == 2
    first = load_checkpoint(RunPaths(tmp_path / "run").checkpoint("controlnet"), "controlnet")["model"]
    cn_file = tmp_path / "controlnet_3d_rflow-ct.pt"
    torch.save({"controlnet_state_dict": first, "epoch": 2}, cn_file)

    train(cfg, tmp_path / "run2")
    raw["training"]["controlnet"].update(init=str(cn_file), init_license=CT_LICENSE, lr=1e-12)
    train_controlnet(config_from_dict(raw), tmp_path / "run2")
    second = load_checkpoint(RunPaths(tmp_path / "run2").checkpoint("controlnet"), "controlnet")
    assert second["init"]["sha256"] == sha256_file(cn_file)
    assert all(torch.allclose(second["model"][k].float(), first[k].float(), atol=1e-6) for k in first)
    card = json.loads((tmp_path / "run2" / "model_card.json").read_text())
    assert card["initial_weights"]["controlnet"]["license"] == CT_LICENSE


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_nets():
    cfg = config_from_dict(tiny_config(None))
    with seeded_init(5):
        return cfg, build_autoencoder(cfg), build_unet(cfg)


def _equal(net, state) -> bool:
    return all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "module_prefix", "bundle", "autoencoder_in_unet_key"])
def test_autoencoder_layouts(tmp_path, tiny_nets, layout):
    cfg, ae, _ = tiny_nets
    sd = ae.state_dict()
    path = tmp_path / "ae.pt"
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()},
           "autoencoder_in_unet_key": {"unet_state_dict": sd}, "bundle": sd}[layout]
    if layout == "bundle":  # a MONAI bundle folder: configs/ + models/
        (tmp_path / "bundle" / "models").mkdir(parents=True)
        (tmp_path / "bundle" / "configs").mkdir()
        path = tmp_path / "bundle" / "models" / "autoencoder.pt"
    torch.save(obj, path)
    init = read_init(tmp_path / "bundle" if layout == "bundle" else path, "autoencoder", "CC-BY-4.0")
    with seeded_init(99):
        fresh = build_autoencoder(cfg)
    assert not _equal(fresh, sd)
    load_into(fresh, init)
    assert _equal(fresh, sd)
    assert init.sha256 == sha256_file(path) and init.provenance()["license"] == "CC-BY-4.0"


def test_unet_from_monai_bundle_model_pt_and_from_a_medsynth_run(tmp_path, tiny_nets, phantoms):
    _, _, unet = tiny_nets
    (tmp_path / "b" / "models").mkdir(parents=True)
    torch.save(unet.state_dict(), tmp_path / "b" / "models" / "model.pt")
    init = read_init(tmp_path / "b", "unet")
    assert init.path.name == "model.pt" and init.scale_factor is None and _equal(unet, init.state)

    train(config_from_dict(tiny_config(phantoms, training={"autoencoder": {"steps": 2},
                                                             "diffusion": {"steps": 2}})), tmp_path / "run")
    ck = load_checkpoint(tmp_path / "run" / "diffusion" / "last.pt", "diffusion")
    init = read_init(tmp_path / "run", "unet")
    assert init.layout == "EMA weights of a medsynth diffusion checkpoint"
    assert all(torch.equal(init.state[k], v) for k, v in ck["ema"]["model"].items())
    assert init.scale_factor == pytest.approx(ck["scale_factor"])
    assert read_init(tmp_path / "run", "autoencoder").path == tmp_path / "run" / "autoencoder" / "last.pt"


# --------------------------------------------------------------------------------------------
# one clear message per mismatch (and the CLI prints it in one line, exit 4, no traceback)
# --------------------------------------------------------------------------------------------


def test_missing_keys_message(tmp_path, tiny_nets):
    _, _, unet = tiny_nets
    sd = dict(unet.state_dict())
    gone = sorted(sd)[:7]
    for k in gone:
        del sd[k]
    torch.save({"unet_state_dict": sd, "scale_factor": 1.0}, tmp_path / "u.pt")
    with pytest.raises(CheckpointError, match=r"model\.unet\.init: .*u\.pt does not fit the configured "
                       r"DiffusionModelUNet \(7 key\(s\) missing from the file: .* and 2 more\); the file holds "
                       r"\d+ tensors \('unet_state_dict' of a checkpoint dict; top-level keys "
                       r"\[unet_state_dict, scale_factor\]") as e:
        load_into(unet, read_init(tmp_path / "u.pt", "unet"))
    assert gone[0] in e.value.message and "unexpected" not in e.value.message
    assert "set model.unet to the architecture" in str(e.value)


def test_unexpected_keys_message(tmp_path, tiny_nets):
    _, ae, _ = tiny_nets
    sd = {**ae.state_dict(), "extra.weight": torch.zeros(2), "spacing_layer.0.weight": torch.zeros(4, 3)}
    torch.save(sd, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"model\.autoencoder\.init: .* does not fit the configured AutoencoderKL "
                       r"\(2 key\(s\) unexpected in the file: extra\.weight, spacing_layer\.0\.weight\); "
                       r"the file holds \d+ tensors \(plain state_dict; first "):
        load_into(ae, read_init(tmp_path / "a.pt", "autoencoder"))


def test_wrong_shape_message(tmp_path, tiny_nets):
    _, ae, _ = tiny_nets
    other = config_from_dict(tiny_config(None, model={"autoencoder": {"latent_channels": 3}}))
    torch.save(build_autoencoder(other).state_dict(), tmp_path / "a3.pt")
    with pytest.raises(CheckpointError, match=r"does not fit the configured AutoencoderKL \(9 key\(s\) of the wrong "
                       r"shape: encoder\.blocks\.5\.conv\.weight \(file \[3, 8, 3, 3, 3\], network \[2, 8, 3, 3, 3\]\), "
                       r"encoder\.blocks\.5\.conv\.bias \(file \[3\], network \[2\]\), .* and 4 more\)"):
        load_into(ae, read_init(tmp_path / "a3.pt", "autoencoder"))


def test_no_state_dict_and_unreadable_and_missing_file_messages(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "scale_factor": torch.tensor(1.0)}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match=r"model\.unet\.init: .*opt\.pt holds no state dict medsynth knows: a dict "
                       r"with top-level keys \[epoch, optimizer, scale_factor\] and 1 tensor\(s\) at the top level"):
        read_init(tmp_path / "opt.pt", "unet")

    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match=r"model\.autoencoder\.init: .*junk\.pt cannot be read with "
                       r"torch\.load\(weights_only=True\)"):
        read_init(tmp_path / "junk.pt", "autoencoder")

    with pytest.raises(ConfigError, match=r"training\.controlnet\.init: .*nowhere\.pt not found") as e:
        read_init(tmp_path / "nowhere.pt", "controlnet")
    assert "never downloads" in str(e.value)


class TrainingArgs:
    """Stands for the argparse/OmegaConf objects some training scripts pickle beside the weights."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"unet_state_dict": {}, "args": TrainingArgs()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"cannot be read with torch\.load\(weights_only=True\)") as e:
        read_init(tmp_path / "pickled.pt", "unet")
    assert "re-save" in str(e.value)


def test_bundle_folder_ambiguous_or_empty(tmp_path):
    models = tmp_path / "b" / "models"
    models.mkdir(parents=True)
    for name in ("autoencoder_v1.pt", "autoencoder_v2.pt"):
        torch.save({"w": torch.zeros(1)}, models / name)
    with pytest.raises(ConfigError, match=r"MONAI bundle folder and several files fit: autoencoder_v1\.pt, "
                       r"autoencoder_v2\.pt"):
        read_init(tmp_path / "b", "autoencoder")
    with pytest.raises(ConfigError, match=r"no file fits \(models/ holds: autoencoder_v1\.pt, autoencoder_v2\.pt\)"):
        read_init(tmp_path / "b", "controlnet")


def test_cli_mismatch_is_one_message_exit_4(tmp_path, phantoms, run_cli):
    import yaml

    cfg = config_from_dict(tiny_config(None))
    torch.save({"state_dict": build_autoencoder(cfg).state_dict()}, tmp_path / "ae.pt")
    raw = tiny_config(phantoms, model={"autoencoder": {"latent_channels": 3, "init": "ae.pt", "init_license": "MIT"}},
                      training={"autoencoder": {"steps": 0}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    code, _, err = run_cli("train", tmp_path / "c.yaml", "--run", tmp_path / "run")
    assert code == 4
    assert "Traceback" not in err and err.count("medsynth: error:") == 1
    assert "model.autoencoder.init:" in err and "ae.pt does not fit the configured AutoencoderKL" in err
    assert "encoder.blocks.5.conv.weight (file [2, 8, 3, 3, 3], network [3, 8, 3, 3, 3])" in err


def test_config_rules_for_initial_weights():
    with pytest.raises(ConfigError, match=r"model\.unet\.init_license: initial weights need their licence"):
        config_from_dict(tiny_config(None, model={"unet": {"init": "x.pt"}}))
    with pytest.raises(ConfigError, match=r"training\.autoencoder\.steps: 0 uses initial weights as they are and "
                       r"needs model\.autoencoder\.init"):
        config_from_dict(tiny_config(None, training={"autoencoder": {"steps": 0}}))
    with pytest.raises(ConfigError, match=r"training\.diffusion\.steps: 0 .* needs model\.unet\.init"):
        config_from_dict(tiny_config(None, training={"diffusion": {"steps": 0}}))
    with pytest.raises(ConfigError, match=r"model\.unet\.fixed_class: a fixed class makes the model unconditional"):
        config_from_dict(tiny_config(None, model={"unet": {"fixed_class": 1, "fixed_class_embeds": 128}}))
    with pytest.raises(ConfigError, match=r"model\.unet\.spacing_input: only MAISI's UNet"):
        config_from_dict(tiny_config(None, model={"unet": {"spacing_input": True}}))
    with pytest.raises(ConfigError, match=r"model\.autoencoder\.init_lisence: unknown key; did you mean 'init_license'"):
        config_from_dict(tiny_config(None, model={"autoencoder": {"init_lisence": "MIT"}}))


def test_input_range_maps_maisi_space_exactly():
    """A [0, 1] autoencoder sees (x + 1) / 2 and its output comes back to [-1, 1]: same numbers as
    running the plain network on the mapped input."""
    cfg01 = config_from_dict(tiny_config(None, model={"autoencoder": {"kind": "maisi", "input_range": [0, 1]}}))
    cfg = config_from_dict(tiny_config(None, model={"autoencoder": {"kind": "maisi"}}))
    with seeded_init(3):
        ranged = build_autoencoder(cfg01)
    plain = build_autoencoder(cfg)
    plain.load_state_dict(ranged.state_dict())
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        mu, _ = ranged.encode(x)
        mu0, _ = plain.encode((x + 1) / 2)
        assert torch.allclose(mu, mu0, atol=1e-6)
        assert torch.allclose(ranged.decode(mu), plain.decode(mu0) * 2 - 1, atol=1e-5)


def test_fixed_class_and_spacing_feed_maisi_unet_inputs():
    """An unconditional medsynth model on a MAISI UNet: each call gets class 1 and the run's spacing x 100,
    exactly as calling MAISI's network with those inputs."""
    cfg = config_from_dict(maisi_config(None, training={"autoencoder": {"steps": 4}}))
    with seeded_init(4):
        unet = build_unet(cfg)
        with torch.no_grad():  # MONAI zero-initialises the output convolution: give every weight a value
            for p in unet.parameters():
                p.normal_(0.0, 0.05)
    x, t = torch.randn(2, 2, 8, 8, 8), torch.tensor([3, 9])
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi as base

    assert isinstance(unet, base) and type(unet) is not base
    with torch.no_grad():
        ours = unet(x, t)
        theirs = base.forward(unet, x, t, class_labels=torch.tensor([1, 1]),
                              spacing_tensor=torch.tensor([[2000.0, 2000.0, 2000.0]] * 2))
        other = base.forward(unet, x, t, class_labels=torch.tensor([2, 2]),
                             spacing_tensor=torch.tensor([[2000.0, 2000.0, 2000.0]] * 2))
    assert torch.equal(ours, theirs) and not torch.equal(ours, other)
    assert unet.class_embedding.num_embeddings == 4 and "medsynth_spacing" not in unet.state_dict()
