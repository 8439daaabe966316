"""The EP dispatcher over real expert-worker actors (separate processes, Ray calls, experts copied in with
checksums) gives the local experts' logits bit for bit for 1, 2 and 3 workers; a worker killed between two
steps is lost, not fatal: the leader serves its experts and no logit bit changes."""

import pytest
import torch

from instance.ep.dispatch import ExpertDispatcher
from instance.ep.placement import LEADER, plan
from instance.ep.worker import ExpertWeights
from instance.sampling import SamplingParams
from rpc import ActorDead, ActorTimeout, Deadlines
from rpc.expert import ExpertWorkerClient
from tests.unit.test_moe_engine import prompts, tiny_moe, tokens

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def recording(engine) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    logits = engine.runner.model.logits
    engine.runner.model.logits = lambda hidden: seen.append(logits(hidden)) or seen[-1]
    return seen


@pytest.fixture(scope="module")
def reference():
    engine = tiny_moe()
    seen = recording(engine)
    ps = prompts(5, seed=11)
    return ps, tokens(engine.generate(ps, GREEDY)), list(seen)


def start(n: int, tag: str) -> list[ExpertWorkerClient]:
    workers = [ExpertWorkerClient.create(f"{tag}-w{i}", 0.1, Deadlines(), 30.0, 60.0) for i in range(n)]
    for w in workers:
        w.ping().result()
    return workers


def placed(workers):
    engine = tiny_moe()
    seen = recording(engine)
    dispatcher = ExpertDispatcher(engine.moe_blocks(), is_lost=lambda e: isinstance(e, (ActorDead, ActorTimeout)))
    new, moves = plan(dispatcher.placement, [LEADER] + [w.name for w in workers])
    for w in workers:
        bundle = {(m.layer, m.expert): ExpertWeights.of(dispatcher.banks[m.layer].expert(m.expert))
                  for m in moves if m.dst == w.name}
        held = w.accept(bundle).result()
        assert held == {k: v.checksum for k, v in bundle.items()}
    dispatcher.switch(new, {w.name: w for w in workers}, dispatcher.generation)
    return engine, dispatcher, seen


@pytest.mark.parametrize("n", [1, 2, 3])
def test_real_workers_give_the_local_logits_bit_for_bit(ray_local, reference, n):
    ps, want, want_logits = reference
    workers = start(n, f"bitwise{n}")
    try:
        engine, dispatcher, seen = placed(workers)
        assert tokens(engine.generate(ps, GREEDY)) == want
        assert len(seen) == len(want_logits) and all(torch.equal(a, b) for a, b in zip(seen, want_logits))
        assert dispatcher.remote_calls > 0 and not dispatcher.lost
    finally:
        for w in workers:
            w.kill()


def test_a_killed_worker_is_lost_and_changes_no_bit(ray_local, reference):
    ps, want, want_logits = reference
    workers = start(2, "killed")
    try:
        engine, dispatcher, seen = placed(workers)
        workers[1].kill()
        assert tokens(engine.generate(ps, GREEDY)) == want
        assert all(torch.equal(a, b) for a, b in zip(seen, want_logits))
        assert [rank for rank, _ in dispatcher.lost] == [workers[1].name]
        assert dispatcher.ep_size == 2 and not dispatcher.placement.experts_of(workers[1].name)
    finally:
        for w in workers:
            w.kill()
