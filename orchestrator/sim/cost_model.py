"""How long one engine step takes, from what it computes: a linear model fitted to measured step times.

`benchmarks/step_costs.py` times the native engine's steps on SmolLM2-135M (one torch thread) over prefill
tokens, decode batch and context length, fits the model and writes `step_costs.json` beside this file, with
the machine, the date and the command. The simulator reads it with `StepCostModel.load()`.

    t = step_s + tokens_s * tokens computed + samples_s * tokens sampled
        + decode_attn_s * decodes x padded context + prefill_attn_s * sum(chunk tokens x context end)

Decode attention gathers every decoding request's blocks up to the longest context in the batch (see
`ModelRunner._add_decodes`), so its cost is the batch size times that padded context.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("step_costs.json")
FEATURES = ("tokens", "samples", "decode_attn", "prefill_attn")


@dataclass(frozen=True)
class StepWork:
    tokens: int = 0          # tokens computed (prefill chunks + one per decode)
    samples: int = 0         # tokens sampled (decodes + chunks that end a prompt)
    decode_attn: int = 0     # decodes x the longest decode context, in tokens
    prefill_attn: int = 0    # sum over prefill chunks of chunk tokens x context at the chunk's end

    def as_dict(self) -> dict:
        return asdict(self)


def step_work(chunks) -> StepWork:
    """The work of a step from the scheduler's chunks (`ScheduledChunk`s, before the step is applied)."""
    tokens = samples = prefill_attn = decodes = longest = 0
    for c in chunks:
        r = c.request
        tokens += c.num_tokens
        end = r.num_computed_tokens + c.num_tokens
        if end == r.num_tokens:
            samples += 1
        if c.num_tokens == 1:
            decodes += 1
            longest = max(longest, end)
        else:
            prefill_attn += c.num_tokens * end
    return StepWork(tokens, samples, decodes * longest, prefill_attn)


@dataclass(frozen=True)
class StepCostModel:
    step_s: float
    tokens_s: float
    samples_s: float
    decode_attn_s: float
    prefill_attn_s: float

    def work_seconds(self, w: StepWork) -> float:
        return (self.step_s + self.tokens_s * w.tokens + self.samples_s * w.samples
                + self.decode_attn_s * w.decode_attn + self.prefill_attn_s * w.prefill_attn)

    def seconds(self, chunks) -> float:
        return self.work_seconds(step_work(chunks))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PATH) -> "StepCostModel":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"step cost model {path} is missing; measure it with "
                                    f"`python -m benchmarks.step_costs --out {path}`")
        return cls(**json.loads(path.read_text())["coefficients"])


# ----- a GPU-shaped profile: LLaMA-7B (fp16) on one NVIDIA A10, the setting of Llumnix's evaluation ------------
#
# Arithmetic from published specifications, not a measurement (no GPU here):
# - NVIDIA A10 datasheet: 24 GB GDDR6, 600 GB/s memory bandwidth, 125 TFLOPS fp16 tensor (dense).
# - LLaMA-7B (Touvron et al. 2023, table 2): 6.7e9 parameters, 32 layers, hidden 4096, 32 heads, no GQA:
#   13.4 GB of fp16 weights; KV per token 2 (K, V) x 32 layers x 4096 x 2 bytes = 0.5 MiB.
# - Efficiencies: decode streams the weights (memory bound) at ~70% of peak bandwidth, prefill runs at ~50%
#   of peak fp16 (as commonly achieved by vLLM-class kernels; see Baseten's "A guide to LLM inference and
#   performance", Llama 2 7B on an A10, and vLLM's own benchmarks); ~3 ms of fixed per-step overhead
#   (scheduling, sampling, kernel launches).
# - KV capacity: (24 GB x 0.9 utilisation - 13.4 GB weights) / 0.5 MiB ≈ 15,600 tokens ≈ 976 blocks of 16.
# What that gives, and what a GPU looks like to the scheduler: a decode step costs ~36 ms for one sequence and
# ~57 ms for a full cache (15 sequences at context 1,000: the weights dominate, the KV read comes second); a
# 512-token prefill chunk ~0.14 s; memory, not compute, runs out. The model is linear (it adds the compute and
# memory terms where a roofline would take the larger), so it overstates large decode batches a little.
A10_BANDWIDTH_BPS = 600e9 * 0.70
A10_FP16_FLOPS = 125e12 * 0.50
LLAMA7B_PARAMS = 6.7e9
LLAMA7B_LAYERS, LLAMA7B_HIDDEN = 32, 4096
KV_BYTES_PER_TOKEN = 2 * LLAMA7B_LAYERS * LLAMA7B_HIDDEN * 2
STEP_OVERHEAD_S = 0.003
GPU_7B_KV_BLOCKS = 976


def gpu_7b() -> StepCostModel:
    """LLaMA-7B on an A10 as a linear step model (see the notes above; every coefficient is derived there)."""
    return StepCostModel(
        step_s=STEP_OVERHEAD_S + 2 * LLAMA7B_PARAMS / A10_BANDWIDTH_BPS,     # fp16 weights read once per step
        tokens_s=2 * LLAMA7B_PARAMS / A10_FP16_FLOPS,                        # 2 FLOP per parameter per token
        samples_s=0.00005,                                                   # logits of one row and a draw
        decode_attn_s=KV_BYTES_PER_TOKEN / A10_BANDWIDTH_BPS,                # the KV read per context token
        prefill_attn_s=4 * LLAMA7B_LAYERS * LLAMA7B_HIDDEN / A10_FP16_FLOPS)  # QK^T and AV per token pair


COST_MODELS = ("cpu", "gpu-7b")


def load_cost_model(name: str) -> StepCostModel:
    """`cpu`: the model fitted to the native engine on this machine (step_costs.json); `gpu-7b`: `gpu_7b()`."""
    if name == "cpu":
        return StepCostModel.load()
    if name == "gpu-7b":
        return gpu_7b()
    raise ValueError(f"cost model: unknown {name!r}; choose one of {', '.join(COST_MODELS)}")
