"""One remote call in flight, the deadlines calls run under, and the three ways a call fails."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Generator, Generic, TypeVar

import ray

T = TypeVar("T")


class RemoteError(Exception):
    """A call to another Tidal process did not return a result."""

    def __init__(self, target: str, method: str, message: str):
        super().__init__(f"{method} on {target}: {message}")
        self.target = target
        self.method = method
        self.detail = message

    def __reduce__(self):    # crosses process boundaries inside Ray errors
        return type(self), (self.target, self.method, self.detail)


class ActorDead(RemoteError):
    """The actor is gone (crashed, killed, or its node died); it will not answer again. A restartable actor
    (the scheduler) may come back under the same name."""


class ActorTimeout(RemoteError):
    """No answer within the call's deadline; the actor may still be working on it."""


class Rejected(RemoteError):
    """The actor answered with an error: `cause` is the exception its method raised (InvalidRequestError,
    AdminError, MigrationAborted, ...)."""

    def __init__(self, target: str, method: str, cause: BaseException):
        super().__init__(target, method, f"{type(cause).__name__}: {cause}")
        self.cause = cause

    def __reduce__(self):
        return Rejected, (self.target, self.method, self.cause)


@dataclass(frozen=True)
class Deadlines:
    """How long each kind of call may take. Built from the deployment's settings (`ServeConfig.deadlines`)."""

    call_s: float = 30.0          # one control-plane call
    startup_s: float = 600.0      # an actor's start (it loads a model)
    migration_s: float = 120.0    # one whole migration (MigrationConfig.deadline_s)
    handoff_s: float = 240.0      # one prefill-to-decode hand-over, which may first wait for the prefill
    ping_s: float = 5.0           # a liveness ping
    drain_work_s: float = 300.0   # an operator's drain (drain_timeout_s)

    def command_s(self, work_s: float) -> float:
        """An admin command forwarded to the scheduler: its own work plus one call's worth for the hop."""
        return work_s + self.call_s


class Call(Generic[T]):
    """A call in flight. `await call` (async) or `call.result()` (sync) gives its result, or raises ActorDead,
    ActorTimeout (after the deadline) or Rejected (the actor raised)."""

    __slots__ = ("_ref", "_target", "_method", "_timeout_s")

    def __init__(self, ref: Any, target: str, method: str, timeout_s: float):
        self._ref, self._target, self._method, self._timeout_s = ref, target, method, timeout_s

    @property
    def method(self) -> str:
        return self._method

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    async def _wait(self) -> T:
        try:
            return await asyncio.wait_for(self._ref, self._timeout_s)
        except asyncio.TimeoutError:
            raise ActorTimeout(self._target, self._method, f"no answer within {self._timeout_s:g} s") from None
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise self._mapped(e) from None

    def result(self) -> T:
        try:
            return ray.get(self._ref, timeout=self._timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ActorTimeout(self._target, self._method, f"no answer within {self._timeout_s:g} s") from None
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise self._mapped(e) from None

    def _mapped(self, e: Exception) -> RemoteError:
        if isinstance(e, ray.exceptions.RayActorError):
            return ActorDead(self._target, self._method, f"{type(e).__name__}")
        cause = getattr(e, "cause", None)
        return Rejected(self._target, self._method, cause if cause is not None else e)


class ActorClient:
    """What the three clients share: their actor's handle (None: an actor known to be gone), the deadlines
    their calls run under, and how a call is sent. Subclasses are frozen dataclasses naming their target."""

    actor: Any
    deadlines: Deadlines

    @property
    def target(self) -> str:
        raise NotImplementedError

    def _call(self, method: str, *args, timeout_s: float | None = None) -> Call:
        return call(self.actor, self.target, method, timeout_s or self.deadlines.call_s, *args)

    def kill(self) -> None:
        kill_actor(self.actor)


def call(actor: Any, target: str, method: str, timeout_s: float, *args) -> Call:
    """Send one call (the only `.remote()` on a method of Tidal's actors in the tree). ActorDead at once for
    the client of an actor known to be gone (no handle)."""
    if actor is None:
        raise ActorDead(target, method, "the actor is gone")
    return Call(getattr(actor, method).remote(*args), target, method, timeout_s)


def send(actor: Any, method: str, *args) -> None:
    """Send a call whose answer nobody waits for (token chunks on the hot path)."""
    getattr(actor, method).remote(*args)


def current_actor() -> Any:
    """The handle of the actor this code runs in."""
    return ray.get_runtime_context().current_actor


def node_identity() -> tuple[str, str]:
    """(node id, node IP) of the Ray node this process runs on."""
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


def find_actor(name: str, namespace: str) -> Any | None:
    """A named actor's handle, or None if there is none (alive) by that name."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def kill_actor(actor: Any, restart: bool = False) -> None:
    """Kill (and let Ray restart it only if `restart` and the actor is restartable); no error if it is gone."""
    if actor is None:
        return
    try:
        ray.kill(actor, no_restart=not restart)
    except Exception:  # noqa: BLE001 - already gone
        pass
