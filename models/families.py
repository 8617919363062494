"""Which generator families are installed: ours plus every package's entry point in `promptmill.generators`.

Light on purpose (no torch): the spec validates `models[*].family` with it, and the CLI builds its parser
without importing torch. `models.generator` documents the contract a family's class implements.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

GROUP = "promptmill.generators"
# our own families, also registered in pyproject.toml: found even when running from a checkout that is not
# installed; imported lazily (loading a GAN never imports the transformer)
BUILTIN: dict[str, str] = {"gan": "promptmill.models.gan:GANGenerator",
                           "transformer": "promptmill.models.transformer:TransformerGenerator",
                           "diffusers": "promptmill.models.hf_diffusers:DiffusersGenerator"}  # needs promptmill[diffusers]


def _registry() -> dict[str, str]:
    """family -> "module:Class", ours plus every installed plugin's."""
    return {**BUILTIN, **{ep.name: ep.value for ep in importlib.metadata.entry_points(group=GROUP)}}


def installed_families() -> list[str]:
    return sorted(_registry())


def generator_class(family: str) -> Any:
    target = _registry().get(family)
    if target is None:
        raise ValueError(f"unknown generator family {family!r}; installed: {installed_families()} (a family is a "
                         f"package registering an entry point in the {GROUP!r} group)")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
