"""Configuration of a Tidal deployment: one frozen pydantic model with a section per part (`engine`,
`migration`, `rebalance`, `pd`), read from a YAML/TOML file and flags.

Environment variables are read here only, with the TIDAL_ prefix: TIDAL_ADDR (the default server address of
the client commands) and TIDAL_TRACE_DIR (where benchmarks find request traces).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from instance.config import EngineConfig
from migration.protocol import MigrationConfig
from orchestrator.policies.autoscale import AutoscaleConfig
from orchestrator.policies.ep_autoscale import EPAutoscaleConfig
from orchestrator.policies.migration import MigrationPolicyConfig
from orchestrator.policies.pd import AdaptiveConfig
from orchestrator.security import CLIENT_KEY_ENV, SecurityConfig, keys_from_env
from rpc import Deadlines

DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8000
TRACE_DIR_ENV = "TIDAL_TRACE_DIR"


def default_addr() -> str:
    return os.environ.get("TIDAL_ADDR", f"127.0.0.1:{DEFAULT_PORT}")


def default_api_key() -> str | None:
    """The key client commands send (`authorization: Bearer …`) unless --api-key is given."""
    return os.environ.get(CLIENT_KEY_ENV) or None


def trace_dir_override() -> str | None:
    """Where request traces live if $TIDAL_TRACE_DIR says (else the benchmarks look beside the repository)."""
    return os.environ.get(TRACE_DIR_ENV)


class RebalanceConfig(MigrationPolicyConfig):
    """The migration policy's settings, and when the reconcile loop runs it."""

    auto: bool = Field(True, description="run the migration policy in the reconcile loop")
    interval_s: float = Field(0.5, gt=0, description="how often the migration policy runs")


class PdConfig(AdaptiveConfig):
    """Prefill/decode roles that adapt to the load (the roles themselves: prefill_instances, decode_instances)."""

    adaptive: bool = Field(False, description="move instances between prefill and decode by which is the "
                                              "bottleneck")


# settings that moved into a section, so an old config file gets a sentence that says where they went
MOVED = {"auto_migrate": "rebalance.auto", "rebalance_interval_s": "rebalance.interval_s",
         "migrate_choose": "rebalance.choose", "source_freeness": "rebalance.source_freeness",
         "target_freeness": "rebalance.target_freeness", "migrate_request_cooldown_s": "rebalance.request_cooldown_s",
         "migrate_waiting_offers": "rebalance.max_waiting_offers", "pd_adaptive": "pd.adaptive",
         "pd_queue_high": "pd.queue_high", "pd_tpot_target_ms": "pd.tpot_target_ms", "pd_cooldown_s": "pd.cooldown_s"}


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    instances: int = Field(2, ge=1, le=256, description="serving instances")
    host: str = Field("0.0.0.0", description="address the gRPC server binds")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    http_port: int = Field(DEFAULT_HTTP_PORT, ge=0, le=65535, description="HTTP port of the OpenAI API and "
                                                                        "/metrics (0 = pick a free one)")
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting a local one")
    namespace: str = Field("tidal", description="Ray namespace of the deployment's actors")
    deployment: str = Field("tidal", pattern=r"^[a-z0-9][a-z0-9-]*$", description="prefix of actor names")
    dispatch_policy: Literal["round-robin", "least-load", "freeness", "prefix-aware"] = Field(
        "freeness", description="prefix-aware: least work before the first token, counting what an instance has "
                                "cached of the prompt (needs engine.prefix_caching)")
    dispatch_top_k: int = Field(1, ge=1, description="least-load / freeness pick at random among the k best "
                                                     "(spreads bursts that several frontends send at once)")
    dispatch_output_weight: float = Field(0.0, ge=0, le=1, description="freeness dispatch counts this share of "
                                          "the remaining max_tokens of an instance's requests as blocks they "
                                          "will grow into (0: off; 1: requests run to max_tokens)")
    dispatch_prefix_weight: float = Field(1.0, ge=0, le=10, description="prefix-aware dispatch: what one cached "
                                          "prompt token is worth against one token of queued prefill (0: ignore "
                                          "the cache)")
    num_cpus_per_instance: float = Field(1.0, ge=0)
    num_gpus_per_instance: float | None = Field(None, ge=0, description="default: 1 on CUDA, 0 on CPU")
    max_queue_per_instance: int = Field(64, ge=1, description="waiting requests before RESOURCE_EXHAUSTED")
    load_interval_s: float = Field(0.05, gt=0, le=1.0, description="how often loads are observed and pushed")
    startup_timeout_s: float = Field(600.0, gt=0)
    call_timeout_s: float = Field(30.0, gt=0, description="deadline of one call to an instance")
    stream_idle_timeout_s: float | None = Field(None, gt=0, description="a stream with no progress (no token, "
                                                "and its instance no longer lists it) for this long ends with "
                                                "UNAVAILABLE; default: 30 s + the longest prompt's prefill")
    grace_period_s: float = Field(10.0, ge=0, description="shutdown: time in-flight requests get to finish")
    request_retries: int = Field(3, ge=0, description="times a request is resumed elsewhere when its instance dies")
    # a crashed instance is seen at once (Ray reports the actor dead); this is for one that hangs. Too short a
    # value fences healthy instances on a saturated machine (seen at 5 s on 2 busy cores).
    instance_timeout_s: float = Field(30.0, gt=0, description="an instance silent this long is declared dead")
    restart_dead_instances: bool = Field(False, description="replace an instance that died with a new one")
    state_store: str | None = Field(None, description="where target state lives: ray (GCS KV, default) or "
                                                      "redis://host:port/db")
    migration: MigrationConfig = Field(default_factory=MigrationConfig)
    rebalance: RebalanceConfig = Field(default_factory=RebalanceConfig)
    drain_timeout_s: float = Field(300.0, gt=0, description="a drain gives up on what is left after this long")
    # prefill/decode disaggregation: the first P instances prefill, the next D decode, any others do both
    prefill_instances: int = Field(0, ge=0, le=256, description="instances that only prefill (hand over after "
                                                                "the first token)")
    decode_instances: int = Field(0, ge=0, le=256, description="instances that take hand-overs and decode")
    pd: PdConfig = Field(default_factory=PdConfig)
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    ep_autoscale: EPAutoscaleConfig = Field(default_factory=EPAutoscaleConfig)

    @model_validator(mode="before")
    @classmethod
    def _instances_from_roles(cls, data):
        """`--prefill-instances 2 --decode-instances 2` alone means 4 instances."""
        if isinstance(data, dict):
            moved = [f"{k} is now {MOVED[k]}" for k in data if k in MOVED]
            if moved:
                raise ValueError("settings moved into sections: " + "; ".join(moved))
        if isinstance(data, dict) and data.get("instances") is None:
            roles = int(data.get("prefill_instances") or 0) + int(data.get("decode_instances") or 0)
            if roles:
                data = {**data, "instances": roles}
        return data

    @model_validator(mode="after")
    def _roles_fit(self) -> "ServeConfig":
        if self.prefill_instances + self.decode_instances > self.instances:
            raise ValueError(f"prefill_instances ({self.prefill_instances}) + decode_instances "
                             f"({self.decode_instances}) exceed instances ({self.instances})")
        return self

    def initial_role(self, index: int) -> str:
        """Role of the index-th instance at start: prefill, decode, or both."""
        if index < self.prefill_instances:
            return "prefill"
        if index < self.prefill_instances + self.decode_instances:
            return "decode"
        return "both"

    @property
    def deadlines(self) -> Deadlines:
        """How long each kind of call between the deployment's processes may take."""
        m = self.migration
        return Deadlines(call_s=self.call_timeout_s, startup_s=self.startup_timeout_s, migration_s=m.deadline_s(),
                         handoff_s=m.deadline_s(handoff=True), drain_work_s=self.drain_timeout_s)

    @property
    def gpus_per_instance(self) -> float:
        if self.num_gpus_per_instance is not None:
            return self.num_gpus_per_instance
        return 1.0 if self.engine.device.startswith("cuda") else 0.0

    def actor_name(self, role: str) -> str:
        return f"{self.deployment}-{role}"


# `tidal serve` flags whose setting lives in a section
FLAG_SECTIONS = {"pd_adaptive": ("pd", "adaptive"),
                 **{f: ("security", f) for f in ("api_key_file", "admin_key_file", "tls_cert", "tls_key",
                                                  "tls_client_ca", "audit_log")}}


class ConfigError(ValueError):
    """A config file or flag a user can fix."""


def load_config(path: str | os.PathLike | None, overrides: dict, env=os.environ) -> ServeConfig:
    """The file's settings (YAML or TOML), then the flags given on the command line on top, then the keys in
    the environment (TIDAL_API_KEYS, TIDAL_ADMIN_KEYS), added to the configured ones."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file {p}")
        text = p.read_text()
        try:
            data = tomllib.loads(text) if p.suffix == ".toml" else (yaml.safe_load(text) or {})
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"--config: {p} is not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {e}")
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {p} must hold a mapping of settings")
    engine = dict(data.pop("engine", None) or {})
    if "backend" in data:                          # `backend: vllm` at the top reads better than under engine:
        engine["backend"] = data.pop("backend")
    for key, value in overrides.items():
        if value is None:
            continue
        if key in EngineConfig.model_fields:
            engine[key] = value
        elif key in FLAG_SECTIONS:
            section, field = FLAG_SECTIONS[key]
            data[section] = {**(data.get(section) or {}), field: value}
        else:
            data[key] = value
    extra_keys = keys_from_env(env)
    if extra_keys:
        security = dict(data.get("security") or {})
        for field, hashes in extra_keys.items():
            security[field] = tuple(security.get(field) or ()) + hashes
        data["security"] = security
    try:
        return ServeConfig(engine=EngineConfig(**engine), **data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None
