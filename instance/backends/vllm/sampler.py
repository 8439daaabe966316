"""Tidal's seeded sampling inside vLLM: a logits processor (vLLM's public `logits_processors` hook) that draws a
request's tokens with Tidal's own position-addressed sampler, `instance.sampling` (the draw for output token i
is a hash of (seed, i)), so a request that moves between vLLM engines continues with the tokens it would have
drawn where it was. vLLM's own seeded sampler keeps a per-request generator whose state is sequential and does
not travel.

A sampled request reaches vLLM with temperature 0 and `extra_args["tidal_sample"]` = its Tidal parameters, seed
and the index of its first draw there (the output tokens it already had). This processor replaces each such
row's logits by 0 at the token Tidal's sampler picks and -inf elsewhere, so vLLM's greedy argmax takes it.
Greedy requests are left to vLLM's argmax untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from instance.sampling import SampleRow, SamplingParams, sample

EXTRA_ARG = "tidal_sample"


@dataclass
class _Row:
    params: SamplingParams
    seed: int
    first_index: int
    output_token_ids: list[int]      # vLLM's live list of the request's outputs in this engine

    def draw(self) -> SampleRow:
        return SampleRow(self.params, self.seed, self.first_index + len(self.output_token_ids))


def sample_args(params: SamplingParams, seed: int, first_index: int) -> dict:
    """What `extra_args[EXTRA_ARG]` carries for a sampled request."""
    return {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
            "min_p": params.min_p, "seed": seed, "first_index": first_index}


class TidalSampler(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, _Row] = {}          # batch index -> the request sampled there

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index, params, _prompt, output_token_ids in batch_update.added:
            args = (params.extra_args or {}).get(EXTRA_ARG) if params is not None else None
            if args is None:
                self.rows.pop(index, None)
                continue
            p = SamplingParams(temperature=args["temperature"], top_k=args["top_k"], top_p=args["top_p"],
                               min_p=args["min_p"], seed=args["seed"])
            self.rows[index] = _Row(p, args["seed"], args["first_index"], output_token_ids)
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction is MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        indices = sorted(self.rows)
        picks = sample(logits[indices], [self.rows[i].draw() for i in indices])
        for i, token in zip(indices, picks):
            logits[i].fill_(float("-inf"))
            logits[i, token] = 0.0
        return logits
