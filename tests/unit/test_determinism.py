"""Deterministic mode: a request's logits are the same bits whatever shares its batch, however its prompt is
chunked, and whether a position was decoded or prefilled (instance/model/llama.py). First the torch
behaviour it stands on, so an upgrade that changes it fails here by name; then whole engines."""

import random

import pytest
import torch
import torch.nn.functional as F

import instance.model_runner as runner
from instance.engine import Engine
from instance.model.exact import KV_CHUNK, chunked_attention, min_rows, padded_rows
from instance.sampling import SamplingParams, sample

PROBE_SEED = 777         # the request whose logits are recorded


@pytest.mark.parametrize("threads", [1, 2])
def test_a_product_row_is_the_same_for_every_row_count_from_min_rows(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for out_f, in_f in ((576, 576), (1536, 576), (576, 1536), (192, 64)):
            w = torch.randn(out_f, in_f, generator=g)
            x = torch.randn(600, in_f, generator=g)
            full = F.linear(x, w)
            least = min_rows(threads)
            for m in (*range(least, 20), 31, 64, 65, 257, 599):
                assert torch.equal(F.linear(x[:m], w), full[:m]), \
                    f"torch's CPU matmul gives row results that depend on the row count ({m} vs 600 rows, " \
                    f"{out_f}x{in_f}, {threads} threads): exact.min_rows no longer holds"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_chunked_attention_gives_a_row_the_same_bits_alone_batched_and_with_more_keys(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(1)
        kvh, d, length = 3, 64, 1024
        k, v = torch.randn(kvh, length, d, generator=g), torch.randn(kvh, length, d, generator=g)
        q = torch.randn(length, kvh, d, generator=g)

        def rows_at(positions, keys):
            qp = padded_rows(q[positions], min_rows(threads)).transpose(0, 1)                    # [kvh, m, d]
            pos = torch.tensor(positions + [-1] * (qp.shape[1] - len(positions)))
            allowed = torch.arange(keys)[None, :] <= pos[:, None]
            return chunked_attention(qp, k[:, :keys], v[:, :keys], allowed, d ** -0.5)[:, :len(positions)]

        for p in (0, 63, 64, 300, 1023):
            alone = rows_at([p], -(-(p + 1) // KV_CHUNK) * KV_CHUNK)[:, 0]
            for positions in ([p], [5, p, 900 % (p + 1)], list(range(max(0, p - 40), p + 1))):
                got = rows_at(positions, length)[:, positions.index(p)]
                assert torch.equal(got, alone), f"row {p} among {len(positions)} rows over {length} keys differs"
    finally:
        torch.set_num_threads(before)


class Probe:
    """Records the probe request's logits, by output index, as the engine samples them."""

    def __init__(self, monkeypatch):
        self.logits: dict[int, torch.Tensor] = {}
        monkeypatch.setattr(runner, "sample", self._sample)

    def _sample(self, logits, rows):
        for i, row in enumerate(rows):
            if row.seed == PROBE_SEED:
                self.logits[row.index] = logits[i].clone()
        return sample(logits, rows)

    def run(self, engine: Engine, probe: list[int], others: list[list[int]], n: int) -> dict[int, torch.Tensor]:
        self.logits = {}
        engine.add_request("probe", prompt_token_ids=probe,
                           params=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, seed=PROBE_SEED))
        for i, p in enumerate(others):
            engine.add_request(f"other-{i}", prompt_token_ids=p,
                               params=SamplingParams(max_tokens=n + 3, temperature=0.8, ignore_eos=True, seed=i))
        while engine.has_unfinished():
            engine.step()
        return self.logits


def differing(a: dict, b: dict) -> list[int]:
    assert a.keys() == b.keys()
    return [i for i in a if not torch.equal(a[i], b[i])]


def prompts(seed: int, n: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 200) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def check_invariance(monkeypatch, model: str, batches, chunks, n: int, decode_positions) -> None:
    probe = Probe(monkeypatch)
    cfg = dict(model=model, num_blocks=600, block_size=16, max_model_len=2048, deterministic=True)
    tokens = prompts(0, 1, 150, 151)[0]
    others = prompts(1, max(batches) - 1, 5, 300)
    engine = Engine(**cfg)
    alone = probe.run(engine, tokens, [], n)
    for size in batches:
        assert differing(probe.run(engine, tokens, others[:size - 1], n), alone) == [], f"batch of {size}"
    for chunk in chunks:
        got = probe.run(Engine(**cfg, max_num_batched_tokens=chunk), tokens, [], n)
        assert differing(got, alone) == [], f"prefill in chunks of {chunk}"
    generated = [int(alone[i].argmax()) for i in range(n)]
    for p in decode_positions:          # output token p decoded vs the same position prefilled
        got = probe.run(engine, tokens + generated[:p], [], 1)
        assert torch.equal(got[0], alone[p]), f"decode at output {p} differs from prefilling it"


def test_tiny_llama_logits_are_the_same_bits_in_any_batch_chunking_or_prefill(monkeypatch):
    check_invariance(monkeypatch, "tiny-llama", batches=(2, 7, 16, 33), chunks=(1, 16, 64), n=8,
                     decode_positions=range(1, 8))


def test_smollm2_logits_are_the_same_bits_in_any_batch_chunking_or_prefill(monkeypatch):
    check_invariance(monkeypatch, "smollm2-135m", batches=(2, 7), chunks=(16,), n=4, decode_positions=(1, 3))


def test_without_deterministic_mode_batching_does_change_the_bits(monkeypatch):
    """The mode is what makes the difference: the fast path is not batch-invariant (so the tests above can
    fail)."""
    probe = Probe(monkeypatch)
    engine = Engine(model="tiny-llama", num_blocks=600, block_size=16, max_model_len=2048)
    tokens, others = prompts(0, 1, 150, 151)[0], prompts(1, 6, 5, 300)
    assert differing(probe.run(engine, tokens, others, 6), probe.run(engine, tokens, [], 6))
