"""The object store goes away mid-job (a moto server stopped and started again on the same port, its buckets kept):
a short outage is ridden through without a rerun, one longer than the retry budget ends in exit 3 with one line,
and the same command then finishes. Throttling (every Nth request 503 SlowDown) costs retries, not the job.

The 10 s outage runs in the default suite; the over-budget case, the 60 s outage and throttling are marked `chaos`
(`make chaos`).
"""

from __future__ import annotations

import time

import pytest
from faults import (
    Store,
    Throttle,
    exactly_once,
    measured,
    run,
    store_fixture,  # noqa: F401 - registers the `store` fixture here
    wait_for_images,
    write_job,
)


def _ride_through(store: Store, tmp_path, n: int, after: int, seconds: float) -> None:
    path, env = write_job(store, tmp_path, n)
    t0 = time.time()
    proc = run(path, env)
    wait_for_images(store, proc, after)
    store.stop()
    time.sleep(seconds)
    store.start()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "retry" in err  # the workers said so while they waited
    exactly_once(store, n)
    measured(f"store down {seconds:.0f} s", images=n, job_s=round(time.time() - t0), retries_logged=err.count("retry "))


def test_a_10_second_outage_mid_job_is_ridden_through(store, tmp_path):
    _ride_through(store, tmp_path, 250, 50, 10)


@pytest.mark.chaos
def test_a_60_second_outage_mid_job_is_ridden_through(store, tmp_path):
    _ride_through(store, tmp_path, 1000, 150, 60)


@pytest.mark.chaos  # 83 s; the 10 s outage keeps the retries in the default suite
def test_an_outage_past_the_budget_is_one_line_exit_3_then_the_same_command_finishes(store, tmp_path):
    path, env = write_job(store, tmp_path, 250, retry={"attempts": 3, "max_wait_s": 5})
    proc = run(path, env)
    wait_for_images(store, proc, 50)
    store.stop()
    _, err = proc.communicate(timeout=300)
    store.start()
    assert proc.returncode == 3, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith("promptmill: error:")]
    assert len(line) == 1 and "storage: " in line[0] and "failed after" in line[0] and "attempts over" in line[0], err
    assert "Traceback" not in err.split(line[0])[1]  # the traceback only with --verbose
    rerun = run(path, env)
    _, err2 = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, err2[-3000:]
    exactly_once(store, 250)
    measured("outage past a 3-attempt budget", exit=proc.returncode, line=line[0][:160])


@pytest.mark.chaos
def test_throttling_every_fifth_request_costs_retries_not_the_job(store, tmp_path):
    proxy = Throttle(store.port, every=5)
    try:
        path, env = write_job(store, tmp_path, 200, endpoint=proxy.url)
        t0 = time.time()
        proc = run(path, env)
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
    finally:
        proxy.stop()
    assert proxy.throttled >= 20, (proxy.requests, proxy.throttled)  # the job's own traffic went through it
    exactly_once(store, 200)
    measured("every 5th request 503 SlowDown", images=200, job_s=round(time.time() - t0), requests=proxy.requests,
             throttled=proxy.throttled)
