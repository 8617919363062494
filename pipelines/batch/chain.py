"""Stages composed in one pool actor, so no stage knows what follows it.

`ActorChain` builds its stages in the actor and passes each batch through them in order. Those `on_device` (draw,
score) run in turn on the actor's one device thread: one OpenMP team (`threads.py`) and one CUDA stream. The rest
(`after`: encode and write) run on the calling thread, so with `resources.concurrent_calls` > 1 one call is
written while the next one draws, instead of the GPU waiting for it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


class ActorChain:
    def __init__(self, on_device: list[tuple[type, dict[str, Any]]], after: list[Callable[[Batch], Batch]] = ()) -> None:
        self.on_device = [stage(**kwargs) for stage, kwargs in on_device]  # built here: the models load in the actor
        self.after = list(after)
        self.device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptmill-device")

    def __call__(self, batch: Batch) -> Batch:
        batch = self.device_thread.submit(_through, self.on_device, batch).result()
        return _through(self.after, batch)


class GenerateStageActor(ActorChain):
    """A generator pool's actor: `GenerateStage` first (Ray Data names the operator and the actor process after it)."""


class ScoreStageActor(ActorChain):
    """A scoring pool's actor: `ScoreStage` first."""


def _through(stages: list[Callable[[Batch], Batch]], batch: Batch) -> Batch:
    for stage in stages:
        try:
            batch = stage(batch)
        except Exception as e:
            e.add_note(f"in {type(stage).__name__}")  # which stage failed, in the error Ray reports
            raise
    return batch
