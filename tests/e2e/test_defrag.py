"""De-fragmentation on two real instances: a prompt that fits on neither, though the two together have room,
is admitted once a running request moves out of its way, long before anything finishes."""

import threading
import time

import pytest

from instance.engine import Engine
from instance.sampling import SamplingParams
from tests.e2e.helpers import TINY, deployment
from tidal.v1 import admin_pb2

# 100 blocks of 16 tokens per instance; a deeper, wider tiny-llama so the blockers decode for seconds
ENGINE = dict(num_blocks=100, max_model_len=1600, tiny_num_layers=32, tiny_hidden_size=128)
BLOCKER_TOKENS = 96


def prompt(n: int, salt: int) -> list[int]:
    return [(7 * i + salt) % 200 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def client(ray_local):
    rebalance = dict(auto=False, defrag=True, source_freeness=8, target_freeness=1000, headroom_blocks=0)
    with deployment("e2e-defrag", engine=ENGINE, rebalance=rebalance) as c:
        yield c


class Stream(threading.Thread):
    """One request's stream, with when its first and last chunks arrived."""

    def __init__(self, client, request_id: str, token_ids: list[int], max_tokens: int):
        super().__init__(daemon=True)
        self.client, self.request_id, self.token_ids, self.max_tokens = client, request_id, token_ids, max_tokens
        self.chunks, self.first_at, self.done_at, self.error = [], None, None, None

    def run(self):
        try:
            for chunk in self.client.gen.Generate(self.client_request(), timeout=120):
                self.chunks.append(chunk)
                self.first_at = self.first_at or time.monotonic()
            self.done_at = time.monotonic()
        except Exception as e:          # noqa: BLE001 - reported by the test
            self.error = e

    def client_request(self):
        from tests.e2e.helpers import request
        return request(token_ids=self.token_ids, max_tokens=self.max_tokens, ignore_eos=True,
                       request_id=self.request_id)

    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]


def test_a_prompt_that_fits_nowhere_is_admitted_once_a_running_request_moves_out_of_its_way(client):
    # 1040 tokens (65 blocks) on one instance, 256 (16 blocks) on the other: dispatch sends each to the freer
    wide = Stream(client, "wide", prompt(1040, 1), BLOCKER_TOKENS)
    wide.start()
    client.wait_until(lambda ls: sum(l.num_running for l in ls.values()) == 1)
    small = Stream(client, "small", prompt(256, 2), BLOCKER_TOKENS)
    small.start()
    loads = client.wait_until(lambda ls: sorted(l.num_running for l in ls.values()) == [1, 1])
    home = max(loads, key=lambda i: loads[i].free_blocks)          # small's instance: the freer one
    other = next(i for i in loads if i != home)
    # 1360 tokens (85 blocks): more than either instance has free, less than the two together
    big = Stream(client, "big", prompt(1360, 3), 16)
    big.start()
    client.wait_for_load(home, lambda l: l.num_waiting == 1, timeout=30)
    assert all(s.done_at is None for s in (wide, small)), "the blockers finished before the test could start"

    moved = client.admin.Rebalance(admin_pb2.RebalanceRequest(), timeout=60).migrations
    assert [(m.request_id, m.src, m.dst) for m in moved] == [("small", home, other)]
    assert moved[0].state == admin_pb2.MIGRATION_STATE_COMMITTED

    for s in (wide, small, big):
        s.join(120)
        assert s.error is None and s.done_at is not None, f"{s.request_id}: {s.error}"
    assert big.first_at < min(wide.done_at, small.done_at)          # room was made, not waited for
    assert big.chunks[0].instance_id == home and small.chunks[-1].instance_id == other

    reference = Engine(**{**TINY, **ENGINE})
    for s in (wide, small, big):
        expected = reference.generate([s.token_ids], SamplingParams(max_tokens=s.max_tokens, temperature=0.0,
                                                                    ignore_eos=True))[0].new_token_ids
        assert [c.seq for c in s.chunks] == list(range(len(s.chunks)))
        assert s.tokens() == expected, f"{s.request_id} differs from an unmoved run"
    client.wait_all_blocks_free()
