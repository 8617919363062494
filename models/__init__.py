"""Pure-torch models behind one seam: `load_generator(url).generate(prompts, seeds, **sampling)`.

Names resolve lazily (PEP 562): `models.families` must stay importable without torch (the spec and the CLI use it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "promptmill.models.errors",
    "load_checkpoint": "promptmill.models.checkpoint", "save_checkpoint": "promptmill.models.checkpoint",
    "Generator": "promptmill.models.generator", "load_generator": "promptmill.models.generator",
    "check_checkpoint": "promptmill.models.generator",
    "generator_class": "promptmill.models.families", "installed_families": "promptmill.models.families",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'promptmill.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
