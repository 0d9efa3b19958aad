"""The losses of both stages: KL, reconstruction (label-balanced for paired models) and soft Dice for
stage 1; one diffusion training batch (noisy latents, timesteps, target, class labels drawn from one
generator) for stage 2 and the ControlNet."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from medsynth.model.networks import is_flow, sample_train_timesteps


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) || N(0, 1)) summed over the latent, averaged over the batch."""
    var = sigma.pow(2)
    return (0.5 * (mu.pow(2) + var - torch.log(var) - 1.0)).flatten(1).sum(1).mean()


def recon_loss(loss: Callable[..., torch.Tensor], recon: torch.Tensor, x: torch.Tensor,
                balance: float = 0.0) -> torch.Tensor:
    """A reconstruction loss (``F.l1_loss``, ``F.mse_loss``); with label channels (paired models)
    the image channel weighs as much as all label channels together, so adding K one-hot channels
    does not dilute the image's share of the loss to 1 / (1 + K).

    ``balance`` (paired only) is the share of each term that is averaged per label value instead
    of per voxel: every label value present in the batch then weighs the same, so the voxels of a
    lesion covering 0.1 % of the volume count as much as the background's, in the image channel
    too (the image is what makes the encoder keep a lesion)."""
    if x.shape[1] == 1:
        return loss(recon, x)
    if balance <= 0:
        return 0.5 * (loss(recon[:, :1], x[:, :1]) + loss(recon[:, 1:], x[:, 1:]))
    per = loss(recon, x, reduction="none")  # [B, 1 + K, ...]
    img, lab = per[:, :1], per[:, 1:]
    img_k, lab_k = [], []
    for k in range(lab.shape[1]):
        m = x[:, 1 + k:2 + k] > 0  # voxels of label value k, [B, 1, ...]
        if bool(m.any()):
            img_k.append(img[m].mean())
            lab_k.append(lab[m.expand_as(lab)].mean())
    img_term = (1 - balance) * img.mean() + balance * torch.stack(img_k).mean()
    lab_term = (1 - balance) * lab.mean() + balance * torch.stack(lab_k).mean()
    return 0.5 * (img_term + lab_term)


def label_dice(recon: torch.Tensor, x: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of the decoded label channels ``recon[:, 1:]`` against the one-hot ``x[:, 1:]``
    (both in [-1, 1], mapped to [0, 1]), per label value over the whole batch, averaged over the
    values.  The squared denominator (V-Net's form) is minimal exactly at the target for any real
    output and never saturates: a softmax across the channels did, once the L1 term had pushed them
    to +-1, and a lesion channel stuck at -1 then got no gradient at all.  A value absent from the
    batch and not predicted costs nothing (``eps``)."""
    prob = (recon[:, 1:] + 1.0) * 0.5
    target = (x[:, 1:] + 1.0) * 0.5
    dims = (0, *range(2, x.dim()))
    inter = (prob * target).sum(dims)
    denom = (prob * prob).sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def diffusion_target(kind: str, scheduler: Any, z0: torch.Tensor, noise: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
    """What stage 2 regresses at ``x_t = add_noise(z0, noise, t)``: the flow's velocity (a clean-latent
    model is judged on it too), or DDPM/DDIM's v, clean latent or noise per ``prediction_type``."""
    if is_flow(kind):
        return z0 - noise
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    return z0 if scheduler.prediction_type == "sample" else noise


def diffusion_batch(kind: str, scheduler: Any, mu: torch.Tensor, sigma: torch.Tensor, classes: torch.Tensor,
                     idx: torch.Tensor, scale: float, g: torch.Generator, drop_prob: float,
                     null_class: Optional[int], timestep_dist: tuple = ("logit-normal", 0.0, 1.0),
                     cond_channels: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(noisy latents, timesteps, target, class labels) of one batch, all drawn from ``g``.  The last
    ``cond_channels`` latent channels stay clean in the noisy latents (``label_condition``: the label
    map as a condition); the draws do not depend on it."""
    z0 = (mu[idx] + sigma[idx] * torch.randn(mu[idx].shape, generator=g)) * scale
    noise = torch.randn(z0.shape, generator=g)
    t = sample_train_timesteps(kind, scheduler, len(idx), g, *timestep_dist)
    x_t = scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
    target = diffusion_target(kind, scheduler, z0, noise, t)
    if cond_channels:
        x_t[:, -cond_channels:] = z0[:, -cond_channels:]
    labels = None
    if null_class is not None:
        labels = classes[idx].clone()
        drop = torch.rand(len(idx), generator=g) < drop_prob
        labels[(labels < 0) | drop] = null_class
    return x_t, t, target, labels
