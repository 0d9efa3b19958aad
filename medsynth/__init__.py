"""medsynth: synthetic 3D medical images from a latent diffusion model.

Stages (each a plain function called by the CLI): load -> train -> generate -> qc/privacy ->
anonymise -> export.  The one currency between stages is :class:`medsynth.volume.Volume`.
"""

__version__ = "0.1.0"

from medsynth.errors import MedsynthError  # noqa: E402

__all__ = ["__version__", "MedsynthError"]
