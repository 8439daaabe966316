"""Configuration of one serving instance's engine.

One frozen pydantic model, validated at construction. Limits a user can hit carry a sentence that says what
to change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from instance.limits import MAX_MODEL_LEN_CAP

DEFAULT_MODEL = "smollm2-135m"


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="smollm2-135m, tiny-llama, or a path to a GGUF file / HF directory")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = float32 on CPU, bfloat16 on CUDA")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    num_blocks: int | None = Field(None, ge=1, description="KV-cache blocks; overrides kv_cache_gib")
    kv_cache_gib: float = Field(1.0, gt=0, description="memory budget of the KV cache, in GiB")
    max_num_batched_tokens: int = Field(512, ge=1, description="token budget of one engine step")
    max_num_seqs: int = Field(64, ge=1, description="most requests running at once")
    max_model_len: int | None = Field(None, ge=2, description="prompt + output limit; default: the model's, "
                                                              f"capped at {MAX_MODEL_LEN_CAP}")
    seed: int = Field(0, description="seed of tiny-llama's random weights and of unseeded requests' seeds")
    tiny_num_layers: int = Field(2, ge=1, description="tiny-llama only: decoder layers")
    tiny_hidden_size: int = Field(64, ge=8, description="tiny-llama only: hidden size")

    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return getattr(torch, self.dtype)
