"""The batch scheduler's admission: a prompt is admitted only when all of it fits, with room for the batch."""

from instance.kv_cache import BlockPool
from instance.scheduler import Scheduler
from orchestrator.sim.instance import make_request

BS = 4


def scheduler(num_blocks: int, budget: int = 8) -> Scheduler:
    return Scheduler(BlockPool(num_blocks), BS, max_num_batched_tokens=budget, max_num_seqs=8)


def apply(out) -> None:
    """What the engine does after a step: the chunks are computed, a finished prompt samples a token."""
    for c in out.chunks:
        c.request.num_computed_tokens += c.num_tokens
        if c.request.num_computed_tokens == c.request.num_tokens:
            c.request.append_token(1)


def test_a_chunked_prompt_gets_the_blocks_of_its_whole_prompt_when_admitted():
    s = scheduler(16)
    long = make_request("long", 20, 4, 0, 0.0, 64)           # 5 blocks, prefilled in chunks of 8 tokens
    s.add(long)
    out = s.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("long", 8)]
    assert len(long.block_ids) == 5 and s.pool.num_free == 11


def test_a_prompt_that_would_preempt_the_batch_for_its_later_chunks_waits_instead():
    s = scheduler(8)
    a = make_request("a", 12, 20, 0, 0.0, 64)                # 3 blocks, decodes into a 4th and 5th
    s.add(a)
    apply(s.schedule())
    apply(s.schedule())                                        # a is decoding, 13 tokens in 4 blocks
    assert a.num_output_tokens == 1 and len(s.running) == 1
    big = make_request("big", 16, 4, 0, 1.0, 64)              # 4 blocks: fits in the 4 free, but not + 1 for a
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
