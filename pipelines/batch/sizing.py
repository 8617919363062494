"""How a run is laid out on the Ray it got: where scoring and writing run, each pool's size and threads.

The rules below are decided once, after Ray starts, into a frozen `JobPlan` that the job's stages read; nothing
writes a runtime choice back into the user's spec. Measurements behind each rule: docs/benchmarks.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from promptmill.pipelines.spec import JobSpec, Resources, ScoringSpec
from promptmill.pipelines.storage import filesystem


def scoring_on(spec: JobSpec) -> bool:
    return spec.scoring.enabled and bool(spec.scoring.clip or spec.scoring.judge)


def scoring_in_pool(spec: JobSpec, cpus: float) -> bool:
    """Whether scores come from a pool of their own (else each generator actor scores what it draws).
    `scoring.pool` decides when set; unset, a pool of its own when it fits beside the generators and
    reading/writing on a cluster of `cpus` CPUs, since generation and scoring then overlap; else in the generator
    actors, so the default spec still runs on a 2-CPU head. With GPU generators too: the geometry check is CPU work
    that would hold the GPU's turn. Measured: docs/benchmarks.md, "Sizing rules"."""
    if not scoring_on(spec):
        return False
    if spec.scoring.pool is not None:
        return spec.scoring.pool
    return cpus >= pool_cpus(spec) + 1  # undecided counts as a pool (the larger need); + 1 for reading and writing


def pools(spec: JobSpec, in_pool: bool | None = None) -> list[Resources]:
    """Every actor pool's resources: each model's, plus the scoring pool when there is one (`in_pool` None:
    undecided, counted as a pool where `scoring.pool` does not say otherwise)."""
    scored = scoring_on(spec) and (spec.scoring.pool is not False if in_pool is None else in_pool)
    return [m.resources for m in spec.models] + ([spec.scoring.resources] if scored else [])


def pool_cpus(spec: JobSpec, in_pool: bool | None = None) -> float:
    """CPUs the actor pools hold at their minimum size."""
    return sum(r.actors * r.num_cpus for r in pools(spec, in_pool))


def actor_threads(r: Resources, actors: int, local_cores: int | None) -> int:
    """torch threads for an actor of pool `r`, one of `actors` in all the job's pools: Ray gives a num_cpus=1
    actor OMP_NUM_THREADS=1, so a model on a 2-core machine ran at half the bare model's speed. Explicit
    `threads` wins; a job alone on this machine shares its cores among the actors; on a cluster an actor uses
    the CPUs it holds."""
    if r.threads:
        return r.threads
    if local_cores:
        return max(1, local_cores // max(1, actors))
    return max(1, int(r.num_cpus))


# `cpu_actors`: the single-threaded actors' processes and model copies may take this share of the machine's memory;
# a pool actor's own RSS before its model (python, torch, ray.data) is about ACTOR_PROCESS_BYTES
CPU_ACTORS_MEMORY_SHARE = 0.25
ACTOR_PROCESS_BYTES = 600 << 20
SIZES = {"actors", "max_actors", "threads"}  # a spec that sets any of these sizes the pool itself
# images an extra actor must have to pay for its start (imports, model load) beside the first batches; below it a
# job keeps one actor with the cores as threads (docs/benchmarks.md, "Sizing rules")
MIN_ROWS_PER_ACTOR = 1024


def _job_sizes_cpu_pool(r: Resources, local_cores: int | None) -> bool:
    """A CPU pool on this machine alone whose sizes the spec left to the job."""
    return r.num_gpus == 0 and bool(local_cores) and not r.model_fields_set & SIZES


def cpu_actors(r: Resources, actors: int, local_cores: int | None, model_bytes: int | None, memory_bytes: int,
               rows: int | None = None) -> int:
    """How many single-threaded actors a CPU pool that the job sized itself on this machine alone may grow to: one
    per core. Each draws and writes its own batches, so one's encode and write overlap another's drawing, and no op
    waits on a thread team (docs/benchmarks.md, "Sizing rules"). Every such pool may grow to one per core, also
    beside other pools (`actors`: all the job's pools' actors): Ray Data adds actors to the pool whose input backs
    up, so the busier of a generator and a scoring pool gets the cores. 1 (no split) when the spec sizes the pool
    (actors, max_actors or threads), on GPUs, on a cluster, or when the copies would not fit: the pools together
    keep to CPU_ACTORS_MEMORY_SHARE of the memory. `rows`: the images the pool has to draw or score, when known;
    each actor needs MIN_ROWS_PER_ACTOR of them to pay for its start."""
    most = _most_cpu_actors(r, local_cores, rows)
    if model_bytes is None or most == 1:
        return 1
    fit = int(CPU_ACTORS_MEMORY_SHARE * memory_bytes / max(1, actors)) // (model_bytes + ACTOR_PROCESS_BYTES)
    return max(1, min(most, fit))


def _most_cpu_actors(r: Resources, local_cores: int | None, rows: int | None) -> int:
    """`cpu_actors` before memory is counted: one per core for a pool the job sizes on this machine alone, each
    with MIN_ROWS_PER_ACTOR images when the work is known; 1 when there is nothing to split."""
    if not _job_sizes_cpu_pool(r, local_cores):
        return 1
    return max(1, min(local_cores, local_cores if rows is None else rows // MIN_ROWS_PER_ACTOR))


def checkpoint_bytes(*urls: str | None, storage_options: dict) -> int | None:
    """Checkpoints' size on storage (directories' files summed): a bound on one loaded copy's weights; None when
    one cannot be listed. A None url (a scorer turned off) counts nothing."""
    total = 0
    for url in urls:
        if url is None:
            continue
        try:
            fs, path = filesystem(url, storage_options)
            size = int(fs.du(path))
        except (OSError, ValueError):
            return None
        if not size:  # nothing listed: unknown, not empty
            return None
        total += size
    return total


@dataclass(frozen=True)
class PoolSize:
    """What a pool asks Ray Data for: actors from `min_actors` up to `max_actors`, each holding `num_cpus` and
    `num_gpus`, running `threads` torch threads and `calls` batches of `batch_size` rows at once."""

    min_actors: int
    max_actors: int
    num_cpus: float
    threads: int
    num_gpus: float = 0
    batch_size: int = 64
    calls: int = 1


def pool_size(r: Resources, actors: int, local_cores: int | None, checkpoints: tuple[str | None, ...],
              storage_options: dict, rows: int | None = None, calls: int = 1) -> PoolSize:
    """A pool's sizes by the rules above (`actor_threads`, `cpu_actors`); `actors`: all the job's pools' actors;
    `rows`: the images it will draw or score, if known; `checkpoints`: the models each actor loads, sized on storage
    only where a split is possible (a listing per checkpoint, and on S3 a request: not for GPU pools, clusters, a
    one-core machine or a pool with too few rows for two actors)."""
    threads = actor_threads(r, actors, local_cores)
    split = 1
    if _most_cpu_actors(r, local_cores, rows) > 1:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # this machine's
        split = cpu_actors(r, actors, local_cores, checkpoint_bytes(*checkpoints, storage_options=storage_options),
                           memory, rows)
    fixed = {"num_gpus": r.num_gpus, "batch_size": r.batch_size, "calls": calls}
    if split > 1:
        return PoolSize(r.actors, max(r.max_actors, split), r.num_cpus / split, 1, **fixed)
    return PoolSize(r.actors, r.max_actors, r.num_cpus, threads, **fixed)


def scoring_pool_size(scoring: ScoringSpec, actors: int, local_cores: int | None, rows: int | None = None) -> PoolSize:
    """The scoring pool's sizes (the job's and `promptmill score`'s): its models are the CLIP and the judge."""
    return pool_size(scoring.resources, actors, local_cores, (scoring.clip, scoring.judge), scoring.storage_options,
                     rows)


def writes_in_actors(spec: JobSpec) -> bool:
    """`output.write_in` decided: the files layout is written by the last actor stage unless tasks are asked for,
    or, by default, a model runs on GPUs: on CPU the fused write saves the write workers' share of the cores; beside
    a GPU one actor process cannot encode as fast as the GPU draws, and write tasks spread that over the node's
    other cores (docs/benchmarks.md, "Sizing rules")."""
    o = spec.output
    if o.format != "files" or o.write_in == "tasks":
        return False
    return o.write_in == "actors" or not any(m.resources.num_gpus > 0 for m in spec.models)


def concurrent_calls(r: Resources) -> int:
    """Batches a generator actor works on at once (`resources.concurrent_calls`): by default two on a GPU, so one
    is encoded and written (CPU) while the next draws, and one on CPU, where both would share the same cores."""
    return r.concurrent_calls or (2 if r.num_gpus > 0 else 1)


@dataclass(frozen=True)
class JobPlan:
    """The run's layout on its Ray, decided once (`make_plan`) and read by every stage that is built."""

    scoring: Literal["off", "pool", "fused"]  # its own pool, or inside each generator actor
    write_in_actors: bool  # the last actor stage writes (`writes_in_actors`), else write tasks do
    models: dict[str, PoolSize] = field(default_factory=dict)  # each generator pool, by model name
    scorers: PoolSize | None = None  # the scoring pool, when scoring == "pool"


def make_plan(spec: JobSpec, in_pool: bool, local_cores: int | None, todo: dict[str, int] | None = None) -> JobPlan:
    """Every pool's size for this run: `in_pool` as `scoring_in_pool` decided it when Ray started; `todo`: images
    each model has left to draw (pools sized to the work; None = unknown); `local_cores`: this machine's, when the
    job runs alone on it."""
    actors = sum(r.actors for r in pools(spec, in_pool))
    models = {m.name: pool_size(m.resources, actors, local_cores, (m.checkpoint,), m.storage_options,
                                None if todo is None else todo[m.name], concurrent_calls(m.resources))
              for m in spec.models}
    scorers = (scoring_pool_size(spec.scoring, actors, local_cores, None if todo is None else sum(todo.values()))
               if in_pool else None)
    return JobPlan("pool" if in_pool else "fused" if scoring_on(spec) else "off", writes_in_actors(spec), models,
                   scorers)
