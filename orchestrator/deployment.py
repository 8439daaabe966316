"""Bring a Tidal deployment up on Ray and take it down: scheduler, instances, frontend.

`tidal serve` and the end-to-end tests both use this, so what the tests exercise is what operators run.
"""

from __future__ import annotations

import logging
import os
import time

import ray

from orchestrator.config import ServeConfig
from rpc import RemoteError, Rejected
from rpc.call import node_identity
from rpc.frontend import FrontendClient
from rpc.scheduler import SchedulerClient

log = logging.getLogger(__name__)

FRONTEND = "frontend-0"


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
        self.scheduler: SchedulerClient | None = None
        self.frontend: FrontendClient | None = None
        self.port: int | None = None
        self.http_port: int | None = None

    def start(self) -> int:
        """Start everything and wait until the frontend serves. Returns the gRPC port."""
        cfg = self.config
        connect_ray(cfg)
        name = cfg.actor_name("scheduler")
        if SchedulerClient.find(name, cfg.namespace) is not None:
            raise DeploymentError(f"a deployment named {cfg.deployment!r} is already running in Ray namespace "
                                  f"{cfg.namespace!r}; stop it first or pick another --deployment name")
        started = time.monotonic()
        # the control plane runs where `tidal serve` runs: the gRPC port is on this node, and losing a worker
        # node never takes the scheduler or the frontend with it
        here, _ = node_identity()
        self.scheduler = SchedulerClient.create(cfg.model_dump(), cfg.deadlines, actor_name=name,
                                                namespace=cfg.namespace, node_id=here)
        try:
            self.scheduler.start().result()
        except Rejected as e:
            self.stop()
            raise DeploymentError(f"instances failed to start: {e.cause}") from None
        except RemoteError:
            self.stop()
            raise DeploymentError(
                f"instances did not start within {cfg.startup_timeout_s:.0f} s; does the cluster have "
                f"{cfg.instances} x {cfg.num_cpus_per_instance} CPUs and {cfg.gpus_per_instance} GPUs free? "
                f"(`ray status` shows what it has)") from None
        self.frontend = FrontendClient.create(FRONTEND, cfg.model_dump(), cfg.deadlines,
                                              actor_name=cfg.actor_name(FRONTEND), namespace=cfg.namespace,
                                              node_id=here)
        try:
            self.port = self.frontend.start(self.scheduler).result()
            self.http_port = self.frontend.http_port().result()
        except Rejected as e:
            self.stop()
            raise DeploymentError(f"the frontend failed to start: {e.cause}") from None
        while not self.frontend.is_serving().result():
            if time.monotonic() - started > cfg.startup_timeout_s:
                self.stop()
                raise DeploymentError("the frontend never saw every instance serving")
            time.sleep(0.05)
        return self.port

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful: the frontend drains (up to the grace period), then everything is killed."""
        if self.frontend is not None:
            try:
                self.frontend.shutdown(self.config.grace_period_s if grace_s is None else grace_s).result()
            except Exception as e:  # noqa: BLE001 - keep stopping the rest
                log.warning("frontend shutdown: %s", e)
            self.frontend.kill()
            self.frontend = None
        if self.scheduler is not None:
            try:
                self.scheduler.shutdown().result()
            except Exception as e:  # noqa: BLE001
                log.warning("scheduler shutdown: %s", e)
            self.scheduler.kill()
            self.scheduler = None
