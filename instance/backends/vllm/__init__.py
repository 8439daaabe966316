"""The vLLM backend: an in-process vLLM `LLMEngine` behind `EngineBackend` (engine.py), Tidal's KV connector for
live migration (connector.py), Tidal's position-addressed sampler as a vLLM logits processor (sampler.py), and
every vLLM internal touched, with its check (internals.py). Needs `pip install 'tidal[vllm]'`."""

from __future__ import annotations


def __getattr__(name: str):
    if name == "VllmBackend":
        try:
            from instance.backends.vllm.engine import VllmBackend
        except ImportError as e:
            if "vllm" in str(e):
                raise ImportError(f"backend vllm: vLLM is not installed ({e}); install it with `make install-vllm` "
                                  "(pip install 'tidal[vllm]', then remove torchvision/torchaudio/torchcodec)") from e
            raise
        return VllmBackend
    raise AttributeError(name)
