"""Every vLLM internal the vLLM backend touches, in one place, each with a check.

Public API the backend uses (documented by vLLM, not listed here): `LLMEngine.from_engine_args`, `add_request`,
`step`, `abort_request`, `has_unfinished_requests`; `EngineArgs`; `SamplingParams` (`output_kind=DELTA`,
`detokenize`, `ignore_eos`, `extra_args`); `KVTransferConfig` with `kv_connector_module_path` and the KV
connector API (`KVConnectorBase_V1`, experimental by vLLM's own word); the `logits_processors` hook
(`LogitsProcessor`, `BatchUpdate`, `MoveDirectionality`).

Internals (read-only, from the thread that steps the engine, between two steps, or for block ids beside one):

| what | why |
|---|---|
| `LLMEngine.engine_core` is an `InprocClient` with `.engine_core` (`EngineCore`) | reach the scheduler in-process |
| `EngineCore.scheduler` (`Scheduler`) | load and request state |
| `Scheduler.requests` (id -> `Request`), `.running`, `.waiting` (iterable), `.get_request_counts()` | running / waiting / preempted counts |
| `Request.num_computed_tokens`, `.num_preemptions`, `.num_tokens`, `.request_id`, `.kv_transfer_params` | how far a request is (migration stages), preemptions abort a migration |
| `Scheduler.kv_cache_manager.get_block_ids(id)` -> tuple of block-id lists (group 0 used) | which blocks hold a request's KV |
| `Scheduler.kv_cache_manager.block_pool.get_num_free_blocks()`, `.num_gpu_blocks` (one null block) | free / total blocks |
| `SchedulerOutput.num_scheduled_tokens`, `.total_num_scheduled_tokens` (in `build_connector_meta`) | tokens vLLM computed, per request and per step |
| `KVConnectorBase_V1._kv_cache_config.kv_cache_groups`, `._get_connector_metadata()` | the connector's own state |
| `Scheduler._free_blocks(request)` (what vLLM calls when a connector reports `finished_sending`) | free a suspended request's held blocks at once when it leaves (committed elsewhere, or aborted), instead of one engine step later |
| `vllm.distributed.kv_transfer.kv_transfer_state._KV_CONNECTOR_AGENT` | vLLM keeps the worker-side connector in this process-wide global, so two engines in one process (tests, benchmarks) would share one: each backend builds its engine with the slot empty, keeps the connector it got, and puts it back before each of its steps (one engine per actor process needs none of this) |

`check_installed()` checks the classes and methods without an engine; `check_engine(llm)` walks the attribute
paths of a built engine. Both raise `VllmInternalsChanged` naming what moved.
"""

from __future__ import annotations

import inspect
from typing import Any

_WHERE = "instance/backends/vllm/internals.py"


class VllmInternalsChanged(RuntimeError):
    """The installed vLLM no longer has an internal the backend relies on."""

    def __init__(self, problems: list[str]):
        import vllm

        super().__init__(f"the installed vLLM {vllm.__version__} moved internals the Tidal vLLM backend relies on "
                         f"(see {_WHERE}): " + "; ".join(problems))
        self.problems = problems


# ----- the accessors the backend uses ----------------------------------------------------------------------

def engine_core(llm: Any) -> Any:
    return llm.engine_core.engine_core


def scheduler(llm: Any) -> Any:
    return engine_core(llm).scheduler


def vllm_request(sched: Any, vllm_id: str) -> Any | None:
    return sched.requests.get(vllm_id)


def block_ids(sched: Any, vllm_id: str) -> list[int]:
    return list(sched.kv_cache_manager.get_block_ids(vllm_id)[0])


def num_free_blocks(sched: Any) -> int:
    return sched.kv_cache_manager.block_pool.get_num_free_blocks()


def num_total_blocks(sched: Any) -> int:
    """Blocks requests can hold: vLLM keeps one null block aside."""
    return sched.kv_cache_manager.block_pool.num_gpu_blocks - 1


def swap_worker_connector(connector: Any) -> Any:
    """Put `connector` in vLLM's process-wide worker-connector slot; returns what was there."""
    from vllm.distributed.kv_transfer import kv_transfer_state

    previous = kv_transfer_state._KV_CONNECTOR_AGENT
    kv_transfer_state._KV_CONNECTOR_AGENT = connector
    return previous


def free_held_blocks(sched: Any, vllm_id: str) -> None:
    """Free the blocks vLLM keeps for a finished request on the connector's behalf."""
    request = sched.requests.get(vllm_id)
    if request is not None:
        sched._free_blocks(request)


def running(sched: Any) -> list[Any]:
    return list(sched.running)


def waiting(sched: Any) -> list[Any]:
    return list(sched.waiting)


# ----- checks ------------------------------------------------------------------------------------------------

def _has_method(cls: type, name: str, params: tuple[str, ...] = ()) -> str | None:
    fn = getattr(cls, name, None)
    if not callable(fn):
        return f"{cls.__name__}.{name} is gone"
    try:
        have = set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    missing = [p for p in params if p not in have]
    if missing:
        return f"{cls.__name__}.{name} no longer takes {', '.join(missing)}"
    return None


def _assigns(cls: type, attrs: tuple[str, ...]) -> list[str]:
    """Attributes `cls.__init__` no longer sets (instance attributes leave no trace on the class)."""
    try:
        src = inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        return []
    return [f"{cls.__name__}.{a} is no longer set in __init__" for a in attrs if f"self.{a}" not in src]


def check_installed() -> list[str]:
    """The classes, methods and signatures the backend uses, without building an engine. Returns what was
    checked; raises VllmInternalsChanged for anything gone."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.request import Request

    checks = [
        _has_method(LLMEngine, "from_engine_args", ("engine_args",)),
        _has_method(LLMEngine, "add_request", ("request_id", "prompt", "params", "arrival_time")),
        _has_method(LLMEngine, "abort_request", ("request_ids",)),
        _has_method(LLMEngine, "step"),
        _has_method(Scheduler, "get_request_counts"),
        _has_method(Scheduler, "_free_blocks", ("request",)),
        _has_method(KVCacheManager, "get_block_ids", ("request_id",)),
        _has_method(KVCacheBlocks, "get_block_ids"),
        _has_method(BlockPool, "get_num_free_blocks"),
        _has_method(KVConnectorBase_V1, "get_num_new_matched_tokens", ("request", "num_computed_tokens")),
        _has_method(KVConnectorBase_V1, "update_state_after_alloc", ("request", "blocks", "num_external_tokens")),
        _has_method(KVConnectorBase_V1, "build_connector_meta", ("scheduler_output",)),
        _has_method(KVConnectorBase_V1, "request_finished", ("request", "block_ids")),
        _has_method(KVConnectorBase_V1, "start_load_kv", ("forward_context",)),
        _has_method(KVConnectorBase_V1, "get_finished", ("finished_req_ids",)),
        _has_method(KVConnectorBase_V1, "register_kv_caches", ("kv_caches",)),
        _has_method(KVConnectorBase_V1, "get_loaded_kv_cache_group_ids", ("request",)),
        _has_method(KVConnectorBase_V1, "_get_connector_metadata"),
        _has_method(KVConnectorBase_V1, "has_connector_metadata"),
    ]
    problems = [c for c in checks if c]
    problems += _assigns(InprocClient, ("engine_core",))
    problems += _assigns(EngineCore, ("scheduler",))
    problems += _assigns(Scheduler, ("requests", "running", "waiting", "kv_cache_manager"))
    problems += _assigns(Request, ("num_computed_tokens", "num_preemptions", "kv_transfer_params"))
    problems += _assigns(BlockPool, ("num_gpu_blocks",))
    problems += _assigns(KVConnectorBase_V1, ("_kv_cache_config",))
    from vllm.distributed.kv_transfer import kv_transfer_state

    if not hasattr(kv_transfer_state, "_KV_CONNECTOR_AGENT"):
        problems.append("kv_transfer_state._KV_CONNECTOR_AGENT (the worker-connector slot) is gone")
    fields = getattr(SchedulerOutput, "__dataclass_fields__", {})
    problems += [f"SchedulerOutput.{f} is gone" for f in ("num_scheduled_tokens", "total_num_scheduled_tokens")
                 if f not in fields]
    if problems:
        raise VllmInternalsChanged(problems)
    return [c for c in ("LLMEngine.from_engine_args", "LLMEngine.add_request", "LLMEngine.abort_request",
                        "LLMEngine.step", "Scheduler.get_request_counts", "Scheduler._free_blocks", "KVCacheManager.get_block_ids",
                        "KVCacheBlocks.get_block_ids", "BlockPool.get_num_free_blocks",
                        "KVConnectorBase_V1 (9 methods)", "InprocClient.engine_core", "EngineCore.scheduler",
                        "Scheduler.requests/running/waiting/kv_cache_manager",
                        "Request.num_computed_tokens/num_preemptions/kv_transfer_params",
                        "BlockPool.num_gpu_blocks", "KVConnectorBase_V1._kv_cache_config",
                        "SchedulerOutput.num_scheduled_tokens/total_num_scheduled_tokens",
                        "kv_transfer_state._KV_CONNECTOR_AGENT")]


def check_engine(llm: Any) -> None:
    """Walk every attribute path the backend reads on a built engine (with at least one request in it, so a
    live Request is checked too); VllmInternalsChanged naming the first broken link of each path."""
    problems = []

    def walk(path: str, root: Any) -> Any:
        obj = root
        for part in path.split("."):
            if not hasattr(obj, part):
                problems.append(f"LLMEngine.{path}: no {part!r} on {type(obj).__name__}")
                return None
            obj = getattr(obj, part)
        return obj

    sched = walk("engine_core.engine_core.scheduler", llm)
    if sched is not None:
        for path in ("requests", "running", "waiting", "kv_cache_manager.block_pool.num_gpu_blocks"):
            walk(f"engine_core.engine_core.scheduler.{path}", llm)
        reqs = getattr(sched, "requests", {})
        for req in list(reqs.values())[:1]:
            for attr in ("num_computed_tokens", "num_preemptions", "num_tokens", "request_id",
                         "kv_transfer_params"):
                if not hasattr(req, attr):
                    problems.append(f"vllm Request.{attr} is gone")
            try:
                ids = sched.kv_cache_manager.get_block_ids(req.request_id)
                if not isinstance(ids, tuple) or not isinstance(ids[0], list):
                    problems.append("KVCacheManager.get_block_ids no longer returns a tuple of lists")
            except Exception as e:  # noqa: BLE001 - report whatever it became
                problems.append(f"KVCacheManager.get_block_ids failed: {e!r}")
        if not reqs:
            problems.append("check_engine needs an engine holding a request")
    if problems:
        raise VllmInternalsChanged(problems)
