"""Configuration of one serving instance's engine.

One frozen pydantic model, validated at construction. Limits a user can hit carry a sentence that says what
to change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from instance.limits import MAX_MODEL_LEN_CAP

DEFAULT_MODEL = "smollm2-135m"


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="smollm2-135m, smollm2-135m-moe, tiny-llama, tiny-moe, or a path "
                                                  "to a GGUF file / HF directory")
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
    seed: int = Field(0, description="seed of tiny-llama's / tiny-moe's random weights, of upcycled "
                                          "routers and of unseeded requests' seeds")
    tiny_num_layers: int | None = Field(None, ge=1, description="tiny-llama / tiny-moe only: decoder layers "
                                                                "(default 2 / 4)")
    tiny_hidden_size: int = Field(64, ge=8, description="tiny-llama / tiny-moe only: hidden size")
    tiny_num_experts: int = Field(8, ge=1, description="tiny-moe only: experts per layer")
    tiny_top_k: int = Field(2, ge=1, description="tiny-moe only: experts each token is routed to")
    upcycle_experts: int = Field(0, ge=0, description="serve a dense model as an MoE: copy each MLP into this many "
                                                      "experts behind a seeded router (0 = off; smollm2-135m-moe: 4)")
    upcycle_top_k: int = Field(1, ge=1, description="experts each token is routed to when upcycling; with 1 the "
                                                    "output equals the dense model's")
    prefix_caching: bool = Field(True, description="reuse the KV of full blocks earlier requests computed for the "
                                 "same prefix (on by default: outputs are unchanged, cached blocks are evicted "
                                 "before any request waits for them, and it costs one hash per full block)")
    prefix_digest_blocks: int = Field(4096, ge=0, le=65536, description="most hashes of cached blocks (most recently "
                                      "used first) each load report carries for prefix-aware dispatch (8 bytes "
                                      "each); a digest smaller than the cache hides its older prefixes")

    @model_validator(mode="after")
    def _top_k_within_experts(self):
        if self.tiny_top_k > self.tiny_num_experts:
            raise ValueError(f"tiny_top_k ({self.tiny_top_k}) must not exceed tiny_num_experts "
                             f"({self.tiny_num_experts})")
        if self.upcycle_experts and self.upcycle_top_k > self.upcycle_experts:
            raise ValueError(f"upcycle_top_k ({self.upcycle_top_k}) must not exceed upcycle_experts "
                             f"({self.upcycle_experts})")
        return self

    def prefix_cache_seed(self) -> str | None:
        """What names the model in prefix-cache hashes: the settings that decide the weights and the KV dtype, so
        instances of one model agree (and migrations and dispatch find each other's blocks) and two models
        never do. None with prefix caching off."""
        if not self.prefix_caching:
            return None
        fields = ("model", "dtype", "seed", "tiny_num_layers", "tiny_hidden_size", "tiny_num_experts", "tiny_top_k",
                  "upcycle_experts", "upcycle_top_k", "block_size")
        return "|".join(f"{f}={getattr(self, f)}" for f in fields) + f"|kv={self.torch_dtype()}"

    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return getattr(torch, self.dtype)
