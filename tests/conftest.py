"""Shared fixtures: one real local Ray per test session, started only when a test needs it."""

import logging
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # test helpers that run as actors (tests.*) must import in Ray's workers, which inherit this environment
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    # the instances and frontends of every e2e deployment share this local cluster; CPUs are logical here
    ray.init(num_cpus=max(8, os.cpu_count() or 1), namespace="tidal-tests", include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
