"""Prefix caching and prefix-aware dispatch on a real deployment (two tiny-llama instances over gRPC): requests
that share a prefix go to the instance that caches it, prefill only their suffix there, `ListInstances`
reports the hits, and the tokens are those of an engine without caching."""

import random

import pytest

from instance.engine import Engine
from instance.sampling import SamplingParams
from tests.e2e.helpers import TINY, deployment, tokens_of


@pytest.fixture(scope="module")
def tidal(ray_local):
    with deployment("prefix", instances=2, dispatch_policy="prefix-aware") as client:
        yield client


def test_shared_prefixes_follow_their_cache_and_keep_their_tokens(tidal):
    rng = random.Random(0)
    plain = Engine(**{**TINY, "prefix_caching": False})
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prefix = [rng.randrange(256) for _ in range(320)]                 # 20 blocks of 16
    first = tidal.generate(token_ids=prefix + [1, 2, 3], max_tokens=8, ignore_eos=True)
    holder = first[0].instance_id
    load = tidal.wait_for_load(holder, lambda l: l.cached_blocks >= 20)     # the digest reached the frontend
    hits = load.prefix_hit_tokens
    for i in range(4):
        prompt = prefix + [rng.randrange(256) for _ in range(5 + i)]
        chunks = tidal.generate(token_ids=prompt, max_tokens=8, ignore_eos=True)
        assert {c.instance_id for c in chunks} == {holder}, "a cached prefix should draw its requests"
        assert tokens_of(chunks) == plain.generate([prompt], params)[0].new_token_ids
    load = tidal.wait_for_load(holder, lambda l: l.prefix_hit_tokens >= hits + 4 * 320)
    assert 0 < load.prefix_hit_tokens <= load.prefix_query_tokens
    tidal.wait_all_blocks_free()
