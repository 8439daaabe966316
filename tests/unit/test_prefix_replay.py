"""Replay keeps the Mooncake trace's prefix structure: equal hash ids give equal token blocks, scaled with the
lengths, so the sharing the trace records is real sharing of prompt tokens."""

import pytest

from orchestrator.bench.traces import hash_block_prompt, load_trace, scale_lengths, shared_block_fraction, trace_dir
from instance.tokenizer import ByteTokenizer
from orchestrator.bench.replay import PromptSource
from orchestrator.bench.schedule import build_schedule

needs_data = pytest.mark.skipif(not trace_dir().is_dir(), reason=f"no trace data at {trace_dir()}")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_equal_leading_ids_give_equal_leading_tokens_and_blocks_keep_their_scaled_length():
    block = lambda h, k: [h * 1000 + j for j in range(k)]       # noqa: E731 - a block's tokens name its id
    own = lambda k: [7] * k                                      # noqa: E731
    a = hash_block_prompt((1, 2, 3), 30, 10.5, block, own)
    b = hash_block_prompt((1, 2, 9), 30, 10.5, block, own)
    assert len(a) == len(b) == 30
    assert common_prefix(a, b) == 21                             # round(2 x 10.5): blocks 1 and 2
    assert hash_block_prompt((1,), 15, 10.5, block, own)[10:] == [7] * 5   # longer than its blocks: its own tail
    with pytest.raises(ValueError, match="block_tokens"):
        hash_block_prompt((1,), 5, 0, block, own)


@needs_data
def test_mooncake_replay_prompts_share_what_the_trace_shares():
    rows = load_trace("mooncake", limit=400)
    assert all(r.hash_ids for r in rows) and 0.05 < shared_block_fraction(rows) < 0.9   # 13.5 % here
    scaled = scale_lengths(rows, max_prompt=1024, max_output=64, factor=16.0)
    assert scaled[0].block_tokens == 32.0 and scaled[0].hash_ids == rows[0].hash_ids
    plan = build_schedule(scaled)
    source = PromptSource(ByteTokenizer(), max(p.prompt_tokens for p in plan), seed=0)
    prompts = {p.index: source.ids(p.index, p.prompt_tokens, p.hash_ids, p.block_tokens) for p in plan}
    assert all(len(prompts[p.index]) == p.prompt_tokens for p in plan)
    pairs = 0
    for x, y in zip(plan, plan[1:] + plan[:1]):
        lead = common_prefix(list(x.hash_ids), list(y.hash_ids))
        shared = common_prefix(prompts[x.index], prompts[y.index])
        bound = min(round(lead * x.block_tokens), x.prompt_tokens, y.prompt_tokens)
        assert shared >= bound                                   # equal ids: equal tokens
        if lead < min(len(x.hash_ids), len(y.hash_ids)):
            assert shared < round((lead + 1) * x.block_tokens)   # the first different id: different tokens
        pairs += lead > 0
    assert pairs > 20                                            # the trace's neighbours do share prefixes
