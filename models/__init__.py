"""Pure-torch models behind one seam: `load_generator(url).generate(prompts, seeds, **sampling)`."""

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.generator import Generator, generator_class, installed_families, load_generator

__all__ = ["CheckpointError", "Generator", "generator_class", "installed_families", "load_checkpoint",
           "load_generator", "save_checkpoint"]
