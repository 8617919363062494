"""Pure-torch models behind one seam: `load_generator(url).generate(prompts, seeds, **sampling)`."""

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.generator import FAMILIES, Generator, generator_class, load_generator

__all__ = ["FAMILIES", "CheckpointError", "Generator", "generator_class", "load_checkpoint",
           "load_generator", "save_checkpoint"]
