"""Exception classes.  Every user-facing failure is a :class:`MedsynthError` subclass.

A message says what was expected, what came, and how to fix it; the CLI prints it as one
line and exits with ``exit_code``.  Messages must never contain patient data (names, IDs,
dates, UIDs): name files by their path and cases by their manifest id only.

Library messages name the Python parameter, never a command-line flag, and write it in
backticks, alone or with the value that caused or fixes the problem: "`steps` must be between 1
and 20", "`class_label=2`: this model knows classes 0..1", hint "pass `use_ema=False`".  The CLI
rewrites each backticked name into its flag when it prints the error ("--steps", "--class 2",
"--no-ema").  A config key (sampling.steps) is not a parameter and is written plainly.
"""

from __future__ import annotations

import re

PARAM = re.compile(r"`([A-Za-z_]\w*)(?:=([^`]*))?`")
"""A parameter in a message, `name` or `name=value`: group 1 the name, group 2 the value (or None)."""


class MedsynthError(Exception):
    """Base class for errors that are the user's to fix (bad input, bad config, ...)."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, param: str | None = None):
        self.message = message
        self.hint = hint
        #: the Python parameter at fault: given, else the first one the message names
        self.param = param if param is not None else next((m[1] for m in PARAM.finditer(message)), None)
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class ConfigError(MedsynthError):
    """A configuration file or value is invalid; the message names the YAML key path."""

    exit_code = 2


class ManifestError(MedsynthError):
    """A data manifest is malformed or its cases fail verification."""

    exit_code = 3


class VolumeError(MedsynthError):
    """An image array or affine is not a valid 3D volume."""

    exit_code = 3


class ImageReadError(MedsynthError):
    """A NIfTI file or DICOM series could not be read as one regular 3D volume."""

    exit_code = 3


class CheckpointError(MedsynthError):
    """A run directory or checkpoint is missing, incomplete or incompatible."""

    exit_code = 4


class ExportError(MedsynthError):
    """Export refused or failed (not a medsynth sample, no passing QC verdict, ...)."""

    exit_code = 5


class PrivacyError(MedsynthError):
    """De-identification failed or a PHI scan found identifiers."""

    exit_code = 6


class QCError(MedsynthError):
    """Quality control could not run (missing reference, bad samples folder, ...)."""

    exit_code = 7


class JobError(MedsynthError):
    """A job folder is inconsistent (different arguments on resume, bad shard spec, ...)."""

    exit_code = 8
