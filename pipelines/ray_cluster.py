"""The Ray a job runs on: the cluster RAY_ADDRESS names, or an embedded one sized to the job's pools, stopped at exit
without Ray's own waits."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
from collections.abc import Iterator

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
    with prompt_node_lookup():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    atexit.register(shutdown_embedded_ray)  # before Ray's own hook at exit (atexit: last in, first out)
    log.info("started an embedded Ray with %d logical CPUs", num_cpus)


NODE_POLL_S = 0.05


@contextlib.contextmanager
def prompt_node_lookup() -> Iterator[None]:
    """While an embedded Ray starts, ask the GCS for the new raylet every 50 ms before Ray's own lookup. Ray's
    (`GlobalStateAccessor::GetNode`, C++) sleeps a whole second between tries, and the raylet registers 1-2 s in,
    only once its agents are up: ray.init took 1.0 or 2.0 s in that wait, never less. With the poll first, Ray's
    lookup finds the node on its first try (docs/benchmarks.md, "Sizing rules"). Reaches into Ray's
    `services.get_node` (ray is pinned) for this `with` only; without it, Ray's own."""
    from ray._private import services

    rays = services.get_node
    try:
        from ray._raylet import GcsClient, NodeID
        from ray.core.generated.gcs_pb2 import GcsNodeInfo
        from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest
    except ImportError:
        yield
        return

    def get_node(gcs_address: str, node_id: str, *args, **kwargs):
        with contextlib.suppress(Exception):  # any trouble: Ray's lookup decides, as it would have
            client = GcsClient(address=gcs_address)
            mine = [GetAllNodeInfoRequest.NodeSelector(node_id=NodeID.from_hex(node_id).binary())]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not client.get_all_node_info(
                    timeout=5, node_selectors=mine, state_filter=GcsNodeInfo.GcsNodeState.ALIVE):
                time.sleep(NODE_POLL_S)
        return rays(gcs_address, node_id, *args, **kwargs)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = rays


def shutdown_embedded_ray() -> None:
    """At exit, the embedded Ray stops without the two waits of Ray's own exit hook (which then has nothing left to
    do): its half-second sleep "to print any extra error messages" (the job is over and its result printed; workers'
    logs stay in the session's log folder), and the monitor's second (`stop_autoscaler_monitor`)."""
    if ray.is_initialized():
        stop_autoscaler_monitor()
        ray.shutdown()


def stop_autoscaler_monitor() -> None:
    """Kill the embedded Ray's autoscaler monitor, which has nothing to scale on one machine. Ray's shutdown stops
    the GCS before it, and the monitor's SIGTERM handler then spent its whole second of grace trying to report to
    that GCS before Ray killed it: 1.0 of shutdown's 1.4 s (`benchmarks/startup.py`, exit). Killed first, shutdown
    took 0.4 s. Reaches into Ray's node record (ray is pinned); without one, nothing happens."""
    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    for info in (getattr(node, "all_processes", None) or {}).get(ray_constants.PROCESS_TYPE_MONITOR, []):
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(5)


def local_cores() -> int | None:
    """The cores the job may use when the Ray cluster is this machine alone (embedded, or a one-node local head):
    the machine's, or fewer if the head was started with fewer CPUs; None on a cluster."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address():
        cores = os.cpu_count() or 1
        return max(1, min(cores, int(nodes[0].get("Resources", {}).get("CPU", cores))))
    return None
