"""The batch scheduler's admission: a prompt is admitted only when all of it fits, with room for the batch."""

from instance.core import EngineCore
from instance.request import Request
from instance.sampling import SamplingParams

BS = 4


def engine_core(num_blocks: int, budget: int = 8) -> EngineCore:
    return EngineCore(num_blocks, BS, max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=64,
                      vocab_size=2, token_bytes=lambda t: b"")


def make_request(core: EngineCore, request_id: str, prompt: int, output: int, arrival: float) -> Request:
    """A request of the core's, taken out of its scheduler's queue (each test adds it where it wants)."""
    params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
    req = core.add_request(request_id, [0] * prompt, params, 0, arrival)
    core.scheduler.remove(req)
    return req


def apply(out) -> None:
    """What the engine does after a step: the chunks are computed, a finished prompt samples a token."""
    for c in out.chunks:
        c.request.num_computed_tokens += c.num_tokens
        if c.request.num_computed_tokens == c.request.num_tokens:
            c.request.append_token(1)


def test_a_chunked_prompt_gets_the_blocks_of_its_whole_prompt_when_admitted():
    core = engine_core(16)
    s = core.scheduler
    long = make_request(core, "long", 20, 4, 0.0)           # 5 blocks, prefilled in chunks of 8 tokens
    s.add(long)
    out = s.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("long", 8)]
    assert len(long.block_ids) == 5 and s.pool.num_free == 11


def test_a_prompt_that_would_preempt_the_batch_for_its_later_chunks_waits_instead():
    core = engine_core(8)
    s = core.scheduler
    a = make_request(core, "a", 12, 20, 0.0)                # 3 blocks, decodes into a 4th and 5th
    s.add(a)
    apply(s.schedule())
    apply(s.schedule())                                        # a is decoding, 13 tokens in 4 blocks
    assert a.num_output_tokens == 1 and len(s.running) == 1
    big = make_request(core, "big", 16, 4, 1.0)              # 4 blocks: fits in the 4 free, but not + 1 for a
    s.add(big)
    for _ in range(3):
        out = s.schedule()
        assert [c.request.request_id for c in out.chunks] == ["a"] and not out.preempted
        apply(out)
    assert s.waiting == [big] and s.num_preemptions_total == 0
    s.remove(a)                                                # a finishes: big alone always fits
    s.free_blocks(a)
    out = s.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("big", 8)] and len(big.block_ids) == 4
