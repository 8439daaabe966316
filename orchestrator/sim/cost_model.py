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
