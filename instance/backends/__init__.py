"""The engines an instance can run, side by side behind `instance.backend.EngineBackend`:

- `native` (`native.py`): Tidal's own engine — continuous batching over a paged KV cache, in this process;
- `vllm` (`vllm/`): an in-process vLLM `LLMEngine`, with a KV connector of ours for live migration.

`create_backend(config)` builds the one `config.backend` names; nothing else imports an engine directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from instance.backend import EngineBackend
    from instance.config import EngineConfig
    from instance.tokenizer import Tokenizer

BACKENDS = ("native", "vllm")


def create_backend(config: "EngineConfig") -> "EngineBackend":
    check_kind(config.backend)
    if config.backend == "vllm":
        from instance.backends.vllm import VllmBackend

        return VllmBackend(config)
    from instance.backends.native import Engine

    return Engine(config)


def load_tokenizer(config: "EngineConfig") -> "Tokenizer":
    """The tokenizer `config`'s engine serves with, without loading the model (frontends tokenize at the edge).
    Both backends serve the same tokenizer: Tidal's own, read from the model's GGUF file or HF directory."""
    check_kind(config.backend)
    from instance.model.loader import load_tokenizer as model_tokenizer

    return model_tokenizer(config.model)


def check_kind(kind: str) -> None:
    if kind not in BACKENDS:
        raise ValueError(f"backend: unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")


def check_same_backend(kinds: dict[str, str]) -> None:
    """ValueError unless every instance (id -> backend) runs the same backend: KV blocks, and so requests in
    flight, move only between engines of one kind."""
    found = sorted(set(kinds.values()))
    if len(found) > 1:
        by = {k: sorted(i for i, b in kinds.items() if b == k) for k in found}
        raise ValueError("backend: one deployment runs one backend, but these instances mix "
                         + " and ".join(f"{k} ({', '.join(v)})" for k, v in by.items())
                         + "; start them all with the same --backend")
