"""Third-party notices that are not the user's to act on: kept out of the terminal, shown at DEBUG.

MONAI builds every optional DICOM reader when a ``LoadImage`` transform is made, and its
nvImageCodec reader logs "nvImageCodec is not available; skipping pydicom decoder plugin
registration." on each one (twice per ``medsynth qc``: image and label chains).  Nothing in
medsynth uses that GPU decoder, so the line is noise on stderr.  nibabel likewise logs the header
fields it repairs in a damaged NIfTI file, one line each, without saying which file.

:data:`NOTICES` lists such notices as (logger name, message start).  :func:`install` puts a filter
on each of those loggers that drops the record there and logs it again on ``medsynth.notices`` at
DEBUG, so ``medsynth -vv`` / ``--debug`` still shows it (prefixed with the library's logger).
The matching Python warning MONAI raises right after is ignored (:data:`WARNINGS`).  Anything
else the library logs or warns is left alone.  Installing twice is harmless.
"""

from __future__ import annotations

import logging

#: (logger, message prefix) of notices that are silenced; add a row to silence another one.
NOTICES: tuple[tuple[str, str], ...] = (
    ("monai.data.nvimgcodec_pydicom_plugin", "nvImageCodec is not available"),
    # nibabel reports each header field it repairs while reading ("qform_code 129 not valid;
    # setting to 0"), without naming the file; medsynth's own messages name it where it matters
    ("nibabel.global", ""),
)

#: Python warnings with the same cause (message start); ignored, as the CLI always did.
WARNINGS: tuple[str, ...] = (
    "NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register",
)

log = logging.getLogger("medsynth.notices")


class _Demote(logging.Filter):
    """Drop matching records from their own logger and re-log them on ``medsynth.notices`` at DEBUG."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefixes):
            return True
        log.debug("%s: %s", record.name, message)
        return False


def install() -> None:
    """Install the filters for :data:`NOTICES` and :data:`WARNINGS` (idempotent)."""
    import re
    import warnings

    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), append=True)
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix in NOTICES:
        by_logger[name] = by_logger.get(name, ()) + (prefix,)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Demote) for f in logger.filters):
            logger.addFilter(_Demote(prefixes))


install()
