"""Pure-torch models behind one seam: `load_generator(url).generate(prompts, seeds, **sampling)`.

Names resolve lazily (PEP 562): `models.families` must stay importable without torch (the spec and the CLI use it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "models.errors", "load_checkpoint": "models.checkpoint", "save_checkpoint": "models.checkpoint",
    "Generator": "models.generator", "load_generator": "models.generator", "check_checkpoint": "models.generator",
    "generator_class": "models.families", "installed_families": "models.families",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
