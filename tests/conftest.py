"""Shared fixtures: one real local Ray per test session, started only when a test needs it."""

import logging
import os
from pathlib import Path

import pytest
import torch

# Engines built inside the test process run tiny ops for which intra-op threads only add synchronisation; on
# a busy 2-core machine (Ray workers beside us) spinning OpenMP threads made them over 10x slower.
torch.set_num_threads(1)


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
