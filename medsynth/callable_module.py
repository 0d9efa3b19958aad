"""A module that is also a function, so the Python API can keep the package's module paths.

``medsynth.qc``, ``medsynth.export`` and ``medsynth.expand`` are both a stage's modules
(``medsynth.qc.gate``, ``medsynth.export.bundle``, ...) and, at the package top, that stage's
function (``medsynth.qc(samples, reference, out)``).  Binding a function to those names would
break every dotted path through them (``import medsynth.qc.gate``, ``pydoc.locate``, which
MONAI bundles use); a module whose class has ``__call__`` keeps both.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable


class CallableModule(types.ModuleType):
    """A module that, called, calls its stage function (:func:`make_callable`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["__stage_function__"](*args, **kwargs)


def make_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Make the (imported) module ``module_name`` callable as ``function``."""
    module = sys.modules[module_name]
    module.__stage_function__ = function
    module.__class__ = CallableModule
