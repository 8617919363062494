"""Training: the Ray Train driver, the recipes it runs and the shipped recipes' configs (`configs/<kind>.yaml`).

Light on purpose: the CLI reads `KINDS` from here without importing torch.
"""

KINDS = ("vq", "transformer", "gan", "judge", "clip")
