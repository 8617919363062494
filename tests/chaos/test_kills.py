"""Processes die mid-job on S3: a generator actor killed three times (Ray restarts it; its batches are redone),
the driver killed with its embedded Ray and the same command run again. Their local-disk siblings run in the
default suite (tests/test_job.py: test_killed_driver_then_resume_is_exactly_once, test_killed_generator_actor_...).
"""

from __future__ import annotations

import time

import pytest
from conftest import kill_session
from faults import (
    exactly_once,
    generator_actors,
    images_written,
    measured,
    run,
    store_fixture,  # noqa: F401 - registers the `store` fixture here
    wait_for_images,
    write_job,
)

pytestmark = pytest.mark.chaos


def test_a_generator_actor_killed_three_times_loses_and_duplicates_nothing(store, tmp_path):
    n = 1500
    path, env = write_job(store, tmp_path, n, batch_size=4)
    t0 = time.time()
    proc = run(path, env)
    killed = []
    for _ in range(3):
        wait_for_images(store, proc, images_written(store) + 40)
        actors = generator_actors(proc.pid)
        assert actors, "no generator actor to kill"
        actors[0].kill()
        killed.append(actors[0].pid)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    exactly_once(store, n)
    measured("generator actor killed x3", images=n, job_s=round(time.time() - t0), killed=len(set(killed)))


def test_the_driver_killed_mid_job_then_the_same_command_is_exactly_once(store, tmp_path):
    n = 1000
    path, env = write_job(store, tmp_path, n, batch_size=8)
    proc = run(path, env)
    wait_for_images(store, proc, 200)
    kill_session(proc.pid)
    proc.wait()
    before = images_written(store)
    assert before < n and not store.fs().exists("chaos/out/_SUCCESS")
    t0 = time.time()
    rerun = run(path, env)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    exactly_once(store, n)
    measured("driver killed, same command again", images=n, written_before_kill=before,
             rerun_s=round(time.time() - t0))
