"""Bring a Tidal deployment up on Ray and take it down: scheduler, instances, frontend.

`tidal serve` and the end-to-end tests both use this, so what the tests exercise is what operators run.
"""

from __future__ import annotations

import logging
import os
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.config import ServeConfig
from orchestrator.frontend import Frontend
from orchestrator.scheduler import GlobalScheduler

log = logging.getLogger(__name__)


class DeploymentError(RuntimeError):
    """The deployment could not start; the message says why and what to change."""


def connect_ray(config: ServeConfig) -> None:
    """Join the cluster at --ray-address, or start an embedded local Ray sized for the instances."""
    if ray.is_initialized():
        return
    if config.ray_address:
        ray.init(address=config.ray_address, namespace=config.namespace, logging_level=logging.WARNING)
        return
    needed = config.instances * config.num_cpus_per_instance
    cpus = max(os.cpu_count() or 1, int(needed + 0.999))
    if needed > (os.cpu_count() or 1):
        log.warning("%d instances x %.1f CPUs oversubscribe this machine's %d cores", config.instances,
                    config.num_cpus_per_instance, os.cpu_count())
    ray.init(num_cpus=cpus, namespace=config.namespace, include_dashboard=False, logging_level=logging.WARNING)


class Deployment:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.scheduler = None
        self.frontend = None
        self.port: int | None = None

    def start(self) -> int:
        """Start everything and wait until the frontend serves. Returns the gRPC port."""
        cfg = self.config
        connect_ray(cfg)
        name = cfg.actor_name("scheduler")
        try:
            ray.get_actor(name, namespace=cfg.namespace)
            raise DeploymentError(f"a deployment named {cfg.deployment!r} is already running in Ray namespace "
                                  f"{cfg.namespace!r}; stop it first or pick another --deployment name")
        except ValueError:
            pass  # no such actor: good
        started = time.monotonic()
        # the control plane runs where `tidal serve` runs: the gRPC port is on this node, and losing a worker
        # node never takes the scheduler or the frontend with it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.scheduler = ray.remote(GlobalScheduler).options(
            name=name, namespace=cfg.namespace, lifetime="detached", max_restarts=-1, num_cpus=0,
            max_concurrency=1000, scheduling_strategy=here).remote(cfg.model_dump())
        try:
            ray.get(self.scheduler.start.remote(), timeout=cfg.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.stop()
            raise DeploymentError(
                f"instances did not start within {cfg.startup_timeout_s:.0f} s; does the cluster have "
                f"{cfg.instances} x {cfg.num_cpus_per_instance} CPUs and {cfg.gpus_per_instance} GPUs free? "
                f"(`ray status` shows what it has)") from None
        except ray.exceptions.RayTaskError as e:
            self.stop()
            raise DeploymentError(f"instances failed to start: {e.cause}") from None
        self.frontend = ray.remote(Frontend).options(
            name=cfg.actor_name("frontend-0"), namespace=cfg.namespace, num_cpus=0,
            max_concurrency=10000, scheduling_strategy=here).remote(cfg.model_dump(), "frontend-0")
        try:
            self.port = ray.get(self.frontend.start.remote(self.scheduler), timeout=cfg.startup_timeout_s)
        except ray.exceptions.RayTaskError as e:
            self.stop()
            raise DeploymentError(f"the gRPC server failed to start: {e.cause}") from None
        while not ray.get(self.frontend.is_serving.remote(), timeout=cfg.call_timeout_s):
            if time.monotonic() - started > cfg.startup_timeout_s:
                self.stop()
                raise DeploymentError("the frontend never saw every instance serving")
            time.sleep(0.05)
        return self.port

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful: the frontend drains (up to the grace period), then everything is killed."""
        if self.frontend is not None:
            try:
                ray.get(self.frontend.shutdown.remote(grace_s), timeout=self.config.grace_period_s + 30)
            except Exception as e:  # noqa: BLE001 - keep stopping the rest
                log.warning("frontend shutdown: %r", e)
            ray.kill(self.frontend, no_restart=True)
            self.frontend = None
        if self.scheduler is not None:
            try:
                ray.get(self.scheduler.shutdown.remote(), timeout=30)
            except Exception as e:  # noqa: BLE001
                log.warning("scheduler shutdown: %r", e)
            ray.kill(self.scheduler, no_restart=True)
            self.scheduler = None
