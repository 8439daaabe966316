"""The native engine: an `EngineCore` (requests, batch scheduler, block pool) paired with a model runner
over a paged KV-cache tensor.

Decide, execute, reconcile: the core schedules a plain decision, the model runner runs it, the core applies
the sampled tokens. The engine never imports Ray; `InstanceActor` wraps it.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from instance.backend import EngineBackend, LoadSnapshot, RequestInfo
from instance.config import EngineConfig
from instance.core import EngineCore
from instance.kv_cache import KVCacheTensors
from instance.limits import MAX_MODEL_LEN_CAP
from instance.model.loader import load_model
from instance.model_runner import ModelRunner
from instance.request import RequestOutput, RequestState
from instance.sampling import SamplingParams

log = logging.getLogger(__name__)

_STATS_WINDOW = 32


class Engine(EngineBackend):
    kind = "native"

    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig(**overrides)
        self.config = config
        loaded = load_model(config)
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        arch = self.arch = loaded.model.arch        # the model's shape (native engine only; not in the interface)
        self.block_size = config.block_size
        self.vocab_size = arch.vocab_size
        dtype = config.torch_dtype()
        per_block = KVCacheTensors.bytes_per_block(arch.num_layers, config.block_size, arch.num_kv_heads,
                                                   arch.head_dim, dtype)
        num_blocks = config.num_blocks or int(config.kv_cache_gib * 2**30 // per_block)
        capacity = num_blocks * config.block_size
        self.max_model_len = config.max_model_len or min(arch.max_position_embeddings, MAX_MODEL_LEN_CAP)
        if config.max_model_len is None and capacity < self.max_model_len:
            log.warning("max_model_len lowered from %d to %d tokens, what the KV cache holds; raise kv_cache_gib "
                        "for longer contexts", self.max_model_len, capacity)
            self.max_model_len = capacity
        if capacity < self.max_model_len:
            raise ValueError(
                f"kv_cache: {num_blocks} blocks of {config.block_size} tokens hold "
                f"{num_blocks * config.block_size} tokens, fewer than max_model_len {self.max_model_len}; "
                f"raise kv_cache_gib / num_blocks or lower max_model_len")
        self.core = EngineCore(num_blocks, config.block_size, config.max_num_batched_tokens, config.max_num_seqs,
                               self.max_model_len, arch.vocab_size, self.tokenizer.token_bytes,
                               frozenset(self.tokenizer.eos_token_ids), seed=config.seed,
                               prefix_cache_seed=config.prefix_cache_seed(),
                               digest_limit=config.prefix_digest_blocks)
        self.kv = KVCacheTensors(arch.num_layers, num_blocks, config.block_size, arch.num_kv_heads,
                                 arch.head_dim, dtype, config.device)
        loaded.model.set_deterministic(config.deterministic)
        self.runner = ModelRunner(loaded.model, self.kv, config.device)
        self._steps: deque[tuple[float, float, int]] = deque(maxlen=_STATS_WINDOW)  # (end, seconds, tokens)
        log.info("engine ready: model %s on %s, %d KV blocks x %d tokens (%.2f GiB), max_model_len %d, "
                 "prefix caching %s", self.model_name, config.device, num_blocks, config.block_size,
                 num_blocks * per_block / 2**30, self.max_model_len, "on" if config.prefix_caching else "off")

    # ----- requests ------------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> list[int]:
        return self.core.validate(prompt_token_ids, params, priority)

    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> None:
        if prompt_token_ids is None:
            prompt_token_ids = self.tokenizer.encode(prompt) if prompt else []
        self.core.add_request(request_id, prompt_token_ids, params or SamplingParams(), priority, arrival_time)

    def resume_from_tokens(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                           params: SamplingParams, seed: int, priority: int, text_emitted: int) -> None:
        self.core.resume_from_tokens(request_id, prompt_token_ids, output_token_ids, params, seed, priority,
                                     text_emitted)

    def abort(self, request_id: str) -> bool:
        aborted = self.core.abort(request_id)
        if aborted:
            log.debug("aborted %s", request_id)
        return aborted

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    # ----- one step --------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.core.schedule()
        if not sched.chunks:
            return []
        start = time.perf_counter()
        sampled = self.runner.execute(sched)
        elapsed = time.perf_counter() - start
        self._steps.append((time.monotonic(), elapsed, sched.num_tokens))
        return self.core.update(sched, sampled)

    def moe_blocks(self) -> dict:
        """layer -> the model's sparse MoE block (empty for a dense model): where expert parallelism hooks in."""
        return self.runner.model.moe_blocks()

    # ----- load ------------------------------------------------------------------------------------------------
    def load(self) -> LoadSnapshot:
        now = time.monotonic()
        recent = [st for st in self._steps if now - st[0] < 5.0]
        busy = sum(st[1] for st in recent)
        generated = sum(st[2] for st in recent)
        return self.core.load(step_time_ms=1000.0 * busy / len(recent) if recent else 0.0,
                              tokens_per_s=generated / busy if busy > 0 else 0.0)

    def check_integrity(self) -> None:
        self.core.check_integrity()

    def request_info(self, request_id: str) -> RequestInfo | None:
        return self.core.request_info(request_id)

    def list_requests(self) -> list[RequestInfo]:
        return self.core.list_requests()

    # ----- migration ---------------------------------------------------------------------------------------
    def export_blocks(self, request_id: str, start: int, end: int):
        return self.kv.export_blocks(self.core.block_ids(request_id, start, end))

    def suspend(self, request_id: str) -> RequestState:
        return self.core.suspend(request_id)

    def resume(self, request_id: str) -> None:
        self.core.resume(request_id)

    def free_suspended(self, request_id: str) -> None:
        self.core.free_suspended(request_id)

    def prefix_hashes(self, request_id: str, num_blocks: int) -> list[int]:
        return self.core.prefix_hashes(request_id, num_blocks)

    def attach_import_prefix(self, import_id: str, block_hashes: list[int]) -> int:
        return self.core.attach_import_prefix(import_id, block_hashes)

    def reserve_import(self, import_id: str, num_blocks: int) -> int:
        return self.core.reserve_import(import_id, num_blocks)

    def write_import(self, import_id: str, first: int, blocks) -> None:
        self.kv.import_blocks(self.core.import_block_ids(import_id, first, blocks.shape[2]), blocks)

    def commit_import(self, import_id: str, state: RequestState) -> None:
        self.core.commit_import(import_id, state)

    def cancel_import(self, import_id: str) -> None:
        self.core.cancel_import(import_id)
