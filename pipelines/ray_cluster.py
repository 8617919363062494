"""The Ray a job runs on: the cluster RAY_ADDRESS names, or an embedded one sized to the job's pools.

Public Ray APIs only, so any Ray in pyproject's range works (`make test-ray-range` runs the lowest and highest)."""

from __future__ import annotations

import atexit
import importlib
import logging
import os

import ray
from promptmill.pipelines.batch.preflight import PreflightError

log = logging.getLogger(__name__)

EMBEDDED_OVERSUBSCRIPTION = 4  # logical CPUs per core an embedded Ray may promise (actors idle while others work)


def ensure_ray(needed: float) -> None:
    """Join RAY_ADDRESS's cluster, or start an embedded Ray with `needed` logical CPUs (the pools' minimum actors
    plus read/write tasks; fewer and the job waits forever for CPUs). Logical CPUs may exceed cores (actors idle
    while others work), within a bound."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # Ray 2.54's log thread, first to import ray.autoscaler on a joined cluster, hit a circular import there
        # (ImportError: DictCount) and the job died; imported whole first, the package is complete
        importlib.import_module("ray.autoscaler")
        ray.init()  # join the cluster RAY_ADDRESS names
        return
    cores = os.cpu_count() or 1
    allowed = max(EMBEDDED_OVERSUBSCRIPTION * cores, 8)
    if needed > allowed:  # `actors: 400` started 401 torch processes on 2 cores
        raise PreflightError(f"models[*].resources: the actor pools need {needed:g} CPUs (actors x num_cpus, plus 2 for "
                             f"reading and writing); an embedded Ray on this machine ({cores} cores) allows at most "
                             f"{allowed}: lower actors, or run on a cluster (RAY_ADDRESS)")
    num_cpus = max(cores, int(needed + 0.999))
    # address="local": always a fresh embedded Ray; without it ray.init() joins whatever cluster the last
    # `ray start` on this machine recorded in /tmp/ray (a stale record made jobs hang on a dead GCS)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    atexit.register(shutdown_embedded_ray)  # before Ray's own hook at exit (atexit: last in, first out)
    log.info("started an embedded Ray with %d logical CPUs", num_cpus)


def shutdown_embedded_ray() -> None:
    """At exit, the embedded Ray stops through `ray.shutdown` before Ray's own exit hook, which first sleeps half a
    second for late error messages: the job's result is printed and its files committed by then."""
    if ray.is_initialized():
        ray.shutdown()


def local_cores() -> int | None:
    """The cores the job may use when the Ray cluster is this machine alone (embedded, or a one-node local head):
    the machine's, or fewer if the head was started with fewer CPUs; None on a cluster."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address():
        cores = os.cpu_count() or 1
        return max(1, min(cores, int(nodes[0].get("Resources", {}).get("CPU", cores))))
    return None
