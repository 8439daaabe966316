"""Expert parallelism's data path without Ray: the dispatcher, sending each layer's rows to real
`ExpertWorker`s through a pickling in-process transport (what Ray does to the payloads), gives the logits of
the local experts bit for bit for 1, 2 and 3 workers; a worker lost in the middle of a step changes no bit
either (the leader recomputes its share from its own copy); a tampered copy is refused by its checksum."""

import pickle

import pytest
import torch

from instance.engine import Engine
from instance.ep.dispatch import ExpertDispatcher
from instance.ep.placement import LEADER, Placement, plan
from instance.ep.worker import ChecksumMismatch, ExpertWeights, ExpertWorker
from instance.sampling import SamplingParams
from tests.unit.test_moe_engine import prompts, tiny_moe, tokens

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


class Done:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    def result(self):
        if self.error is not None:
            raise self.error
        return pickle.loads(self.value)


class InProcess:
    """An ExpertWorker reached through pickled payloads; `die_after` calls, it fails as a dead actor would."""

    def __init__(self, name: str, die_after: int | None = None):
        self.name, self.worker, self.calls, self.die_after = name, ExpertWorker(name), 0, die_after

    def run(self, layer, inputs):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            return Done(error=ConnectionError(f"{self.name} died"))
        return Done(pickle.dumps(self.worker.run(layer, pickle.loads(pickle.dumps(inputs)))))


def recording(engine: Engine) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    logits = engine.runner.model.logits
    engine.runner.model.logits = lambda hidden: seen.append(logits(hidden)) or seen[-1]
    return seen


def place(dispatcher: ExpertDispatcher, workers: list[InProcess], load=None) -> Placement:
    ranks = [LEADER] + [w.name for w in workers]
    new, moves = plan(dispatcher.placement, ranks, load)
    for w in workers:
        bundle = {(m.layer, m.expert): ExpertWeights.of(dispatcher.banks[m.layer].expert(m.expert))
                  for m in moves if m.dst == w.name}
        w.worker.accept(pickle.loads(pickle.dumps(bundle)))
    dispatcher.switch(new, {w.name: w for w in workers}, dispatcher.generation)
    return new


@pytest.fixture(scope="module")
def reference():
    engine = tiny_moe()
    seen = recording(engine)
    ps = prompts(6, seed=6)
    return ps, tokens(engine.generate(ps, GREEDY)), list(seen)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_the_dispatcher_gives_the_local_logits_bit_for_bit(reference, workers):
    ps, want, want_logits = reference
    engine = tiny_moe()
    seen = recording(engine)
    dispatcher = ExpertDispatcher(engine.moe_blocks())
    pool = [InProcess(f"w{i}") for i in range(workers)]
    placement = place(dispatcher, pool)
    assert all(placement.experts_of(w.name) for w in pool) and dispatcher.ep_size == workers + 1
    assert tokens(engine.generate(ps, GREEDY)) == want
    assert len(seen) == len(want_logits) and all(torch.equal(a, b) for a, b in zip(seen, want_logits))
    assert all(w.calls > 0 for w in pool)


def test_a_worker_lost_mid_step_changes_no_logit_bit(reference):
    ps, want, want_logits = reference
    engine = tiny_moe()
    seen = recording(engine)
    lost = []
    dispatcher = ExpertDispatcher(engine.moe_blocks(), on_lost=lambda rank, why: lost.append(rank))
    pool = [InProcess("w0"), InProcess("w1", die_after=9)]     # dies in the third step, after layer 1
    place(dispatcher, pool)
    assert tokens(engine.generate(ps, GREEDY)) == want
    assert all(torch.equal(a, b) for a, b in zip(seen, want_logits))
    assert lost == ["w1"] and dispatcher.ep_size == 2
    assert not dispatcher.placement.experts_of("w1")
    assert dispatcher.placement.experts_of("w0")


def test_a_copy_that_does_not_match_its_checksum_is_refused():
    engine = tiny_moe()
    w = ExpertWeights.of(engine.moe_blocks()[0].experts.expert(3))
    bad = ExpertWeights(w.gate_up.copy(), w.down, w.checksum)
    bad.gate_up[0, 0] += 1e-3
    worker = ExpertWorker("w")
    with pytest.raises(ChecksumMismatch):
        worker.accept({(0, 3): bad})
    assert worker.held() == {}
    assert worker.accept({(0, 3): w}) == {(0, 3): w.checksum}


def test_a_switch_planned_before_a_worker_was_lost_is_refused(reference):
    engine = tiny_moe()
    dispatcher = ExpertDispatcher(engine.moe_blocks())
    place(dispatcher, [InProcess("w0")])
    planned_at = dispatcher.generation
    dispatcher._lose("w0", ConnectionError("gone"))
    new, _ = plan(dispatcher.placement, [LEADER, "w1"])
    with pytest.raises(RuntimeError, match="changed during the copy"):
        dispatcher.switch(new, {"w1": InProcess("w1")}, planned_at)
    assert dispatcher.placement.ranks() == [LEADER]
