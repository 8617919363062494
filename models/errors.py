"""Errors a driver catches without importing torch (the job's driver imports torch only while Ray starts)."""


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt; the message names the file."""
