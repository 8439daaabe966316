"""Sampling parameters and the sampler.

Seeded draws are position-addressed: the uniform number used for output token i of a request is a hash of
(seed, i) and nothing else. A request that moves to another engine therefore continues with the tokens it
would have produced where it was, and no generator state needs to travel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


class InvalidRequestError(ValueError):
    """Input a user can fix. `field` names the offending field; the message says what the limit is."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message

    def __reduce__(self):    # crosses process boundaries inside Ray errors
        return InvalidRequestError, (self.field, self.message)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0     # 0 = greedy
    top_k: int = 0               # 0 = off
    top_p: float = 1.0           # in (0, 1]
    min_p: float = 0.0           # in [0, 1]
    seed: int | None = None      # None = the engine picks one, so the request still moves deterministically
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be a positive integer, got {self.max_tokens}")
        if not self.temperature >= 0.0 or self.temperature > 100.0:
            raise InvalidRequestError("temperature", f"must be in [0, 100] (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be 0 (off) or a positive integer, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed <= _MASK64:
            raise InvalidRequestError("seed", f"must be in [0, 2^64), got {self.seed}")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise InvalidRequestError("stop", "at most 16 non-empty stop strings of at most 256 characters each")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError("stop_token_ids", f"ids must be in [0, {vocab_size}), got {bad[:4]}")


def validate_request(prompt_token_ids: list[int], params: SamplingParams, priority: int, vocab_size: int,
                     max_model_len: int) -> None:
    """Check a whole request against the served model's limits; the engine and the frontend both call this."""
    if not prompt_token_ids:
        raise InvalidRequestError("prompt", "is empty; give at least one token of prompt")
    bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError("prompt_token_ids", f"ids must be in [0, {vocab_size}), got {bad[:4]}")
    params.validate(vocab_size)
    n = len(prompt_token_ids)
    room = max_model_len - n                    # output tokens that fit after this prompt
    if params.max_tokens > room:
        if room < 1:
            raise InvalidRequestError("prompt", f"has {n} tokens; this model takes at most {max_model_len - 1} "
                                      f"(max_model_len {max_model_len}, with room for one output token)")
        if params.max_tokens >= max_model_len:
            raise InvalidRequestError("max_tokens", f"is {params.max_tokens}, more than max_model_len "
                                      f"({max_model_len}); with this {n}-token prompt at most {room} fit")
        raise InvalidRequestError(
            "prompt", f"has {n} tokens, more than max_model_len ({max_model_len}) - max_tokens "
            f"({params.max_tokens}) = {max_model_len - params.max_tokens}; shorten the prompt or lower max_tokens "
            f"to at most {room}")
    if not isinstance(priority, int) or not -1000 <= priority <= 1000:
        raise InvalidRequestError("priority", f"must be an integer in [-1000, 1000], got {priority}")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform_for(seed: int, index: int) -> float:
    """The uniform draw in [0, 1) for output token `index` of a request seeded with `seed`."""
    return (_splitmix64(_splitmix64(seed) ^ index) >> 11) * (1.0 / (1 << 53))


@dataclass
class SampleRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    seed: int
    index: int  # output token index the draw is for


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
    """Turns a [rows, vocab] tensor of logits into one token id per row."""
    logits = logits.float()
    out = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if not row.params.greedy:
            out[i] = _sample_one(logits[i], row)
    return out


def _kept(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Probabilities sorted in descending order, their token ids, and how many top-k / top-p / min-p keep."""
    probs = torch.softmax(logits / p.temperature, dim=-1)
    probs, ids = probs.sort(descending=True, stable=True)
    keep = probs.shape[0]
    if p.top_k > 0:
        keep = min(keep, p.top_k)
    if p.top_p < 1.0:
        cum = probs[:keep].cumsum(0)
        # smallest prefix whose mass reaches top_p (always at least one token)
        keep = min(keep, int((cum < p.top_p).sum().item()) + 1)
    if p.min_p > 0.0:
        keep = min(keep, max(1, int((probs[:keep] >= p.min_p * probs[0]).sum().item())))
    return probs, ids, keep


def _sample_one(logits: torch.Tensor, row: SampleRow) -> int:
    probs, ids, keep = _kept(logits, row.params)
    cum = probs[:keep].double().cumsum(0)
    target = uniform_for(row.seed, row.index) * cum[-1].item()
    pick = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype), right=True).item())
    return int(ids[min(pick, keep - 1)].item())


def draw_margin(logits: torch.Tensor, row: SampleRow) -> float:
    """How far this row's choice is from flipping: for greedy, the gap between the two most likely tokens'
    probabilities; for sampling, the distance from the seeded draw to the nearest boundary of the kept
    tokens' cumulative mass (as a fraction of that mass), or from top_p to the nearest cumulative mass.

    A request recomputed after a failure (prefill of prompt + streamed tokens, where the tokens were first
    computed one decode step at a time) gets logits equal up to float rounding, so it draws the same tokens
    except where this margin is of that order."""
    logits = logits.float()
    p = row.params
    if p.greedy:
        top = torch.softmax(logits, dim=-1).topk(2).values
        return float(top[0] - top[1])
    probs, _, keep = _kept(logits, p)
    cum = probs[:keep].double().cumsum(0)
    target = uniform_for(row.seed, row.index) * cum[-1].item()
    margin = float((cum - target).abs().min() / cum[-1])
    if p.top_p < 1.0:
        margin = min(margin, float((probs[:keep + 1].double().cumsum(0) - p.top_p).abs().min()))
    return margin
