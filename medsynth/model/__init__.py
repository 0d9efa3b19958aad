"""The engine: networks from config, two-stage training, checkpoints and the model card, sampling.

Modules: :mod:`networks` (MONAI networks and schedulers from the config), :mod:`train` (stage 1
autoencoder, stage 2 latent diffusion), :mod:`checkpoint` (run directory, model card, checks
before sampling), :mod:`sample` (denoising loop, tiled decode, ``medsynth generate``),
:mod:`ema`, :mod:`perceptual` (optional local-weights perceptual loss).
"""
