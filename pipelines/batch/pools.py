"""Ray Data actor pools, built one way for every stage that hosts a model (generate, score, promptmill score):
sizes from the run's plan (`sizing.pool_size`), restarts and retries bounded."""

from __future__ import annotations

import inspect

import ray.data
from promptmill.pipelines.batch.sizing import PoolSize
from ray.data import ActorPoolStrategy

# Ray restarts pool actors and retries their tasks without limit by default: a batch that OOM-kills its actor
# every time hung the job. Past these, the job fails with one line (JobFailed) and a rerun resumes.
MAX_ACTOR_RESTARTS = 3
MAX_TASK_RETRIES = 3


def map_in_pool(ds: ray.data.Dataset, stage: type, kwargs: dict, size: PoolSize) -> ray.data.Dataset:
    """`stage(**kwargs)` in each actor of a pool of `size`, called on batches of `size.batch_size` rows. Ray Data
    runs one call per actor at a time unless told it may run several side by side (`size.calls`, in threads:
    `sizing.concurrent_calls`, generator pools)."""
    many, remote = concurrent_calls(size.calls)
    # restarts and retries go as map_batches kwargs, the way Ray 2.60 reads them (actor_pool_map_operator; it
    # warns that ray_remote_args are deprecated, but no named parameter carries these yet)
    return ds.map_batches(stage, fn_constructor_kwargs=kwargs,
                          compute=ActorPoolStrategy(min_size=size.min_actors, max_size=size.max_actors, **many),
                          num_gpus=size.num_gpus, num_cpus=size.num_cpus, batch_size=size.batch_size,
                          max_restarts=MAX_ACTOR_RESTARTS, max_task_retries=MAX_TASK_RETRIES, **remote)


def concurrent_calls(calls: int) -> tuple[dict, dict]:
    """(ActorPoolStrategy kwargs, map_batches kwargs) for `calls` side by side in one actor. Ray 2.59 named it
    `max_concurrent_calls_per_actor`; before, the actor's own `max_concurrency` said it (both public)."""
    if calls <= 1:
        return {}, {}
    if "max_concurrent_calls_per_actor" in inspect.signature(ActorPoolStrategy.__init__).parameters:
        return {"max_concurrent_calls_per_actor": calls, "enable_true_multi_threading": True}, {}
    return {"enable_true_multi_threading": True}, {"max_concurrency": calls}
