"""Shared fixtures: one real local Ray per test session, started only when a test needs it."""

import logging
import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # the instances and frontends of every e2e deployment share this local cluster; CPUs are logical here
    ray.init(num_cpus=max(8, os.cpu_count() or 1), namespace="tidal-tests", include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
