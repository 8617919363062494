"""torch threads in a pool actor, set on the thread that runs its batches, not the one that built it.

Ray Data builds a pool actor's stage on the actor's main thread and calls it on another thread. libgomp keeps an
OpenMP thread team per calling thread and counts the threads of every team. A team made while loading (on the
main thread) plus the calling thread's team came to more threads than the actor's cores. libgomp then spins only
~100 times before sleeping between parallel regions, so each of a decode step's thousands of small ops waited on
a futex wake-up. This happens with Ray's own OMP_NUM_THREADS too. `python benchmarks/actor_threads.py` measures
it side by side.
"""

from __future__ import annotations

import threading

import torch


class ActorThreads:
    """Build on one thread (no OpenMP team), run with `n` on whichever thread calls; `n` None leaves torch as is."""

    def __init__(self, n: int | None) -> None:
        self.n, self.thread = n, None
        if n:
            torch.set_num_threads(1)  # the constructing thread: loading makes no team that outlives it

    def on_call(self) -> None:
        if self.n and self.thread != threading.get_ident():
            torch.set_num_threads(self.n)  # libgomp's count is per thread: set it on this one
            self.thread = threading.get_ident()
