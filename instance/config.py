"""Configuration of one serving instance's engine.

One frozen pydantic model, validated at construction. Limits a user can hit carry a sentence that says what
to change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from instance.limits import MAX_MODEL_LEN_CAP

DEFAULT_MODEL = "smollm2-135m"


class ExpertParallelConfig(BaseModel):
    """Expert parallelism of an MoE instance: its experts on expert-worker actors beside the leader.
    EP size N = the leader plus N-1 workers; N = 1 keeps every expert on the leader."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(1, ge=1, le=64, description="EP size the instance starts at (1 = all experts on the leader)")
    max_size: int = Field(4, ge=1, le=64, description="largest EP size `tidal scale INSTANCE --ep N` accepts")
    warm_workers: int = Field(1, ge=0, le=64, description="empty expert workers kept started, ready to take "
                                                          "experts (MoE models only)")
    worker_num_cpus: float = Field(0.25, gt=0, description="Ray CPUs each expert worker asks for")
    layer_timeout_s: float = Field(10.0, gt=0, description="a worker that does not answer a layer's rows within "
                                                           "this is lost (its experts go back to the leader)")
    copy_timeout_s: float = Field(60.0, gt=0, description="one copy of experts into a worker during a scale")

    @model_validator(mode="after")
    def _size_within_max(self):
        if self.size > self.max_size:
            raise ValueError(f"ep.size ({self.size}) must not exceed ep.max_size ({self.max_size})")
        return self


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="smollm2-135m, smollm2-135m-moe, tiny-llama, tiny-moe, or a path "
                                                  "to a GGUF file / HF directory")
    backend: Literal["native", "vllm"] = Field("native", description="engine: native (Tidal's own) or vllm (an "
                                               "in-process vLLM LLMEngine; pip install 'tidal[vllm]')")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = float32 on CPU, bfloat16 on CUDA")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block (vllm on CPU: a multiple "
                                                         "of 32; left unset there it is 32)")
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
    deterministic: bool = Field(False, description="every token's logits independent of its batch, chunking and "
                                               "prefill vs decode, bit for bit (padded products and chunked "
                                               "attention; instance/model/llama.py)")
    ep: ExpertParallelConfig = Field(default_factory=ExpertParallelConfig,
                                     description="expert parallelism (MoE models; the instance actor runs it)")

    prefix_caching: bool = Field(True, description="reuse the KV of full blocks earlier requests computed for the "
                                 "same prefix (on by default: outputs are unchanged, cached blocks are evicted "
                                 "before any request waits for them, and it costs one hash per full block)")
    prefix_digest_blocks: int = Field(4096, ge=0, le=65536, description="most hashes of cached blocks (most recently "
                                      "used first) each load report carries for prefix-aware dispatch (8 bytes "
                                      "each); a digest smaller than the cache hides its older prefixes")

    @model_validator(mode="before")
    @classmethod
    def _vllm_block_size(cls, data):
        """vLLM's CPU attention takes multiples of 32 tokens per block: that is its default here."""
        if isinstance(data, dict) and data.get("backend") == "vllm" and data.get("block_size") is None:
            data = {**data, "block_size": 32}
        return data

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
