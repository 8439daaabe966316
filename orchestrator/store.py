"""Control-plane state: the scheduler's target state, kept where a restarted scheduler finds it again.

Intent only — the instances the scheduler created and their actor names, roles, drains, admin operations in
progress — written before acting on it. Observed load is never stored; it is rebuilt from live actors.
Values are JSON-serializable dicts under str keys, one namespace per deployment. `open_store` picks the
backend from `--state-store`: Ray's GCS KV (default) or Redis.
"""

from __future__ import annotations

import abc
import contextlib
import json
import re
import threading
from urllib.parse import urlsplit

import ray
import redis
from ray.experimental import internal_kv
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

_DEPLOYMENT = re.compile(r"^[a-z0-9][a-z0-9-]*$")    # as DeploymentConfig.deployment: no ':' or '/' to collide on


class StoreError(RuntimeError):
    """The store is unreachable or misconfigured; the message says what to check."""


class StateStore(abc.ABC):
    url: str    # what it is, for logs; never holds a password

    @abc.abstractmethod
    def get(self, key: str) -> dict | None: ...

    @abc.abstractmethod
    def put(self, key: str, value: dict) -> None:
        """Store a JSON-serializable dict (dict keys come back as str); TypeError naming the key otherwise."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the key; no error if it is missing."""

    @abc.abstractmethod
    def scan(self, prefix: str = "") -> dict[str, dict]:
        """Every key of this deployment that starts with `prefix`, with its value."""

    def close(self) -> None:
        pass


def _check_deployment(deployment: str) -> str:
    if not _DEPLOYMENT.match(deployment):
        raise ValueError(f"deployment {deployment!r}: use lowercase letters, digits and '-'")
    return deployment


def _encode(key: str, value: dict) -> bytes:
    if not isinstance(value, dict):
        raise TypeError(f"state key {key!r}: the value must be a dict, not {type(value).__name__}")
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"state key {key!r}: the value is not JSON-serializable ({e})") from None


def _decode(raw: bytes | None) -> dict | None:
    return None if raw is None else json.loads(raw)


class RayKVStore(StateStore):
    """Ray's GCS internal KV, namespace `tidal/<deployment>`.

    It lives as long as the Ray cluster's GCS: across scheduler restarts, and across GCS restarts only with
    GCS fault tolerance (an external Redis behind the GCS). The GlobalScheduler is the single writer of its
    deployment's state, so plain puts are enough (a lock serialises this process's writers).
    """

    url = "ray-gcs-kv"

    def __init__(self, deployment: str, check: bool = True):
        self.namespace = f"tidal/{_check_deployment(deployment)}"
        self._lock = threading.Lock()
        if check:
            with self._errors():    # fail at startup, not at the first checkpoint
                pass

    @contextlib.contextmanager
    def _errors(self):
        if not ray.is_initialized() or not internal_kv._internal_kv_initialized():
            raise StoreError("the ray-gcs-kv state store needs Ray: call ray.init() first (or run inside a "
                             "Ray actor), or pass --state-store redis://host:port/db")
        try:
            yield
        except ray.exceptions.RpcError as e:
            raise StoreError(f"cannot reach Ray's GCS for the state store: {e}; is the Ray cluster up?") from e

    def get(self, key):
        with self._errors():
            return _decode(internal_kv._internal_kv_get(key, namespace=self.namespace))

    def _write(self, key: str, data: bytes | None) -> None:
        if data is None:
            internal_kv._internal_kv_del(key, namespace=self.namespace)
        else:
            internal_kv._internal_kv_put(key, data, overwrite=True, namespace=self.namespace)

    def put(self, key, value):
        data = _encode(key, value)
        with self._errors(), self._lock:
            self._write(key, data)

    def delete(self, key):
        with self._errors(), self._lock:
            self._write(key, None)

    def scan(self, prefix=""):
        with self._errors():
            keys = internal_kv._internal_kv_list(prefix, namespace=self.namespace)
            raw = {k.decode(): internal_kv._internal_kv_get(k, namespace=self.namespace) for k in keys}
        return {k: _decode(v) for k, v in sorted(raw.items()) if v is not None}


class RedisStore(StateStore):
    """Redis (redis-py), keys `tidal:<deployment>:<key>`; durable when the server runs with appendonly yes.
    Socket timeouts bound every call, so a dead server gives StoreError, not a hang.
    """

    def __init__(self, url: str, deployment: str, *, timeout_s: float = 3.0, check: bool = True):
        u = urlsplit(url)
        try:
            host, port = u.hostname or "localhost", u.port or 6379
            db = int(u.path.strip("/") or 0)
        except ValueError:
            raise ValueError(f"state_store: cannot parse {url!r}; use redis://host:port/db") from None
        self.url = f"{u.scheme}://{host}:{port}/{db}"
        self._address = f"{host}:{port}"
        self._prefix = f"tidal:{_check_deployment(deployment)}:"
        self._r = redis.Redis(host=host, port=port, db=db, username=u.username, password=u.password,
                              ssl=u.scheme == "rediss", socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                              retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1))
        if check:
            with self._errors():    # fail at startup, not at the first checkpoint
                self._r.ping()

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreError(f"cannot reach redis at {self._address}: {e}; is redis-server running? "
                             "check --state-store") from e
        except redis.RedisError as e:
            raise StoreError(f"redis at {self._address} refused a command: {e}; check --state-store") from e

    def get(self, key):
        with self._errors():
            return _decode(self._r.get(self._prefix + key))

    def put(self, key, value):
        data = _encode(key, value)
        with self._errors():
            self._r.set(self._prefix + key, data)

    def delete(self, key):
        with self._errors():
            self._r.delete(self._prefix + key)

    def scan(self, prefix=""):
        match = re.sub(r"([*?\[\]\\])", r"\\\1", self._prefix + prefix) + "*"    # glob-escape, then wildcard
        with self._errors():
            keys = sorted(set(self._r.scan_iter(match=match, count=1000)))
            values = self._r.mget(keys) if keys else []
        n = len(self._prefix)
        return {k.decode()[n:]: _decode(v) for k, v in zip(keys, values) if v is not None}

    def close(self):
        self._r.close()


def open_store(url: str | None, deployment: str, check: bool = True) -> StateStore:
    """The store named by `--state-store`: None, "" or "ray" -> RayKVStore; redis://host:port/db -> RedisStore.
    `check`: reach it now and raise StoreError if it is down (what a command wants); the scheduler opens it
    unchecked, so that it starts, and restarts, while the store is down."""
    if not url or url == "ray":
        return RayKVStore(deployment, check)
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url, deployment, check=check)
    raise ValueError(f"state_store: {url!r} is not a store; use ray or redis://host:port/db")
