"""The native engine on tiny-llama: batching, preemption, sampling, migration hooks, bad input."""

import random

import pytest

from instance.engine import Engine
from instance.model.loader import ModelNotFoundError
from instance.request import Detokenizer
from instance.sampling import InvalidRequestError, SamplingParams
from instance.kv_cache import blocks_for

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, seed=1234,
                        ignore_eos=True)


def tiny(**kw) -> Engine:
    cfg = dict(model="tiny-llama", num_blocks=128, block_size=4, max_model_len=256, max_num_batched_tokens=64)
    cfg.update(kw)
    return Engine(**cfg)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny()


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def tokens(outs) -> list[list[int]]:
    return [o.new_token_ids for o in outs]


def test_batch_of_eight_mixed_lengths_matches_each_request_alone(engine):
    ps = prompts(8)
    alone = [engine.generate([p], GREEDY)[0].new_token_ids for p in ps]
    assert tokens(engine.generate(ps, GREEDY)) == alone
    assert all(len(t) == 40 for t in alone)
    engine.check_integrity()
    assert engine.load().free_blocks == engine.load().total_blocks


def test_chunked_prefill_gives_the_same_tokens_as_unchunked():
    ps = prompts(4, seed=1, lo=40, hi=90)
    whole = tokens(tiny(max_num_batched_tokens=256).generate(ps, GREEDY))
    chunked = tokens(tiny(max_num_batched_tokens=7).generate(ps, GREEDY))
    assert chunked == whole


def test_preemption_and_recompute_do_not_change_tokens(engine):
    ps = prompts(8, seed=2)
    reference = tokens(engine.generate(ps, GREEDY))
    small = tiny(num_blocks=70)           # 8 requests of up to 100 tokens need up to 200 blocks
    out = tokens(small.generate(ps, GREEDY))
    assert small.load().num_preemptions_total > 0
    assert out == reference
    small.check_integrity()
    assert small.load().free_blocks == small.load().total_blocks


def test_seeded_sampling_repeats_across_engines_and_differs_across_seeds(engine):
    ps = prompts(3, seed=3)
    a = tokens(engine.generate(ps, SEEDED))
    b = tokens(tiny().generate(ps, SEEDED))
    assert a == b
    other = SamplingParams(**{**SEEDED.__dict__, "seed": 99})
    assert tokens(engine.generate(ps, other)) != a


def move(src: Engine, dst: Engine, rid: str) -> None:
    """The migration hooks end to end: suspend, export, reserve, write, commit, free."""
    state = src.suspend(rid)
    n = blocks_for(state.num_computed_tokens, src.block_size)
    blob = src.export_blocks(rid, 0, n)
    first = dst.reserve_import(f"move-{rid}", n)
    dst.write_import(f"move-{rid}", first, blob)
    dst.commit_import(f"move-{rid}", state)
    src.free_suspended(rid)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_export_import_mid_decode_continues_with_the_same_tokens(engine, params):
    rng = random.Random(7)
    for trial in range(3):
        p = prompts(1, seed=10 + trial)[0]
        reference = engine.generate([p], params)[0]
        src, dst = engine, tiny()
        rid = f"m{trial}"
        src.add_request(rid, prompt_token_ids=p, params=params)
        got, text = [], ""
        for _ in range(rng.randint(1, 30)):     # a random step, in prefill or decode
            for o in src.step():
                got += o.new_token_ids
                text += o.text_delta
        move(src, dst, rid)
        assert src.request_info(rid) is None
        src.check_integrity()
        dst.check_integrity()
        while dst.has_unfinished():
            for o in dst.step():
                got += o.new_token_ids
                text += o.text_delta
        assert got == reference.new_token_ids
        assert text == reference.text_delta
        assert dst.load().free_blocks == dst.load().total_blocks


def test_suspend_then_resume_puts_the_request_back_unchanged(engine):
    p = prompts(1, seed=20)[0]
    reference = engine.generate([p], GREEDY)[0].new_token_ids
    engine.add_request("r", prompt_token_ids=p, params=GREEDY)
    got = []
    for _ in range(5):
        got += [t for o in engine.step() for t in o.new_token_ids]
    engine.suspend("r")
    assert engine.step() == []              # out of the batch, blocks kept
    assert engine.load().used_blocks > 0
    engine.check_integrity()
    engine.resume("r")
    while engine.has_unfinished():
        got += [t for o in engine.step() for t in o.new_token_ids]
    assert got == reference


def test_reservations_are_released_when_a_migration_is_abandoned(engine):
    engine.reserve_import("abandoned", 5)
    load = engine.load()
    assert load.reserved_blocks == 5 and load.free_blocks == load.total_blocks - 5
    engine.check_integrity()
    engine.cancel_import("abandoned")
    assert engine.load().free_blocks == engine.load().total_blocks


def test_randomized_stress_keeps_integrity_every_step_and_frees_everything():
    rng = random.Random(42)
    e = tiny(num_blocks=80, max_num_batched_tokens=48, max_num_seqs=16)
    live: set[str] = set()
    n = 0
    for step in range(400):
        if rng.random() < 0.3 and n < 120:
            rid = f"s{n}"
            n += 1
            params = SamplingParams(max_tokens=rng.randint(1, 60), temperature=rng.choice([0.0, 0.7]),
                                    seed=rng.randrange(1000), ignore_eos=rng.random() < 0.5)
            e.add_request(rid, prompt_token_ids=prompts(1, seed=step, lo=1, hi=120)[0], params=params,
                          priority=rng.choice([0, 0, 1, 5]))
            live.add(rid)
        if live and rng.random() < 0.05:
            victim = rng.choice(sorted(live))
            assert e.abort(victim)
            live.discard(victim)
        for o in e.step():
            if o.finished:
                live.discard(o.request_id)
        e.check_integrity()
    while e.has_unfinished():
        for o in e.step():
            if o.finished:
                live.discard(o.request_id)
        e.check_integrity()
    assert not live
    assert e.load().num_preemptions_total > 0     # the run did exercise preemption
    assert e.load().free_blocks == e.load().total_blocks
    assert not e.abort("s0")                          # finished or aborted long ago


def test_higher_priority_is_admitted_first():
    e = tiny(max_num_seqs=1)
    e.add_request("low", prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=3, temperature=0))
    e.add_request("high", prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=3, temperature=0),
                  priority=5)
    finished = []
    while e.has_unfinished():
        finished += [o.request_id for o in e.step() if o.finished]
    assert finished == ["high", "low"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt_token_ids=[1] * 250, params=SamplingParams(max_tokens=10)), "prompt"),
    (dict(prompt="hi", params=SamplingParams(max_tokens=0)), "max_tokens"),
    (dict(prompt="hi", params=SamplingParams(top_p=1.5)), "top_p"),
    (dict(prompt="hi", params=SamplingParams(top_p=0.0)), "top_p"),
    (dict(prompt="hi", params=SamplingParams(temperature=-0.1)), "temperature"),
    (dict(prompt="hi", params=SamplingParams(min_p=2.0)), "min_p"),
    (dict(prompt_token_ids=[5, 100000]), "prompt_token_ids"),
    (dict(prompt="hi", priority=10**9), "priority"),
])
def test_bad_input_names_the_field_and_the_engine_keeps_serving(kwargs, field):
    e = tiny()
    e.add_request("ok", prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=5, temperature=0))
    e.step()
    with pytest.raises(InvalidRequestError) as err:
        e.add_request("bad", **kwargs)
    assert err.value.field == field
    assert field in str(err.value)
    if field == "prompt" and "prompt_token_ids" in kwargs:
        assert "246" in str(err.value)       # says the limit: max_model_len 256 - max_tokens 10
    done = [o for _ in range(10) for o in e.step() if o.finished]
    assert [o.request_id for o in done] == ["ok"]
    assert e.request_info("bad") is None
    e.check_integrity()


def test_unknown_model_names_the_choices():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        Engine(model="no-such-model")


def test_kv_budget_too_small_for_max_model_len_says_what_to_change():
    with pytest.raises(ValueError, match="kv_cache_gib"):
        tiny(num_blocks=10, max_model_len=256)


def test_stop_token_ids_and_max_tokens_finish_requests(engine):
    p = prompts(1, seed=30)[0]
    free = engine.generate([p], GREEDY)[0]
    stop_at = free.new_token_ids[5]
    first = free.new_token_ids.index(stop_at)
    out = engine.generate([p], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                              stop_token_ids=(stop_at,)))[0]
    assert out.finish_reason == "stop" and out.new_token_ids == free.new_token_ids[:first + 1]
    out = engine.generate([p], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.new_token_ids) == 7


def test_load_snapshot_reports_the_batch():
    engine = tiny(max_num_batched_tokens=256)
    for i, p in enumerate(prompts(3, seed=40)):
        engine.add_request(f"l{i}", prompt_token_ids=p, params=GREEDY)
    before = engine.load()
    assert before.num_waiting == 3 and before.num_running == 0
    assert before.head_demand_blocks > 0 and before.waiting_demand_blocks >= before.head_demand_blocks
    engine.step()
    after = engine.load()
    assert after.num_running == 3 and after.num_waiting == 0
    assert after.used_blocks > 0 and after.free_blocks + after.used_blocks == after.total_blocks
    assert after.running_tokens == sum(len(p) + 1 for p in prompts(3, seed=40))
    assert after.step_time_ms > 0 and after.tokens_per_s > 0
    for i in range(3):
        engine.abort(f"l{i}")
    assert engine.load().free_blocks == engine.load().total_blocks


def test_default_max_model_len_shrinks_to_what_the_kv_cache_holds():
    e = tiny(num_blocks=10, max_model_len=None)     # 10 blocks x 4 tokens
    assert e.max_model_len == 40
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        e.add_request("long", prompt_token_ids=[1] * 39, params=SamplingParams(max_tokens=5))


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_resume_from_streamed_tokens_continues_identically(engine, params):
    """What failover does when an instance dies: another engine re-prefills prompt + streamed tokens."""
    p = prompts(1, seed=60)[0]
    reference = engine.generate([p], params)[0]
    seed = params.seed if params.seed is not None else 0     # greedy ignores the seed
    for cut in (0, 1, 17, 39):
        other = tiny()
        streamed = reference.new_token_ids[:cut]
        detok = Detokenizer(other.tokenizer.token_bytes, params.stop)   # what the client was sent so far
        for t in streamed:
            detok.push(t)
        emitted = detok.delta(False)
        other.resume_from_tokens("r", p, streamed, params, seed=seed, priority=0, text_emitted=len(emitted))
        tokens, text = list(streamed), emitted
        while other.has_unfinished():
            for o in other.step():
                tokens += o.new_token_ids
                text += o.text_delta
        assert tokens == reference.new_token_ids
        assert text == reference.text_delta
        assert other.load().free_blocks == other.load().total_blocks


def test_a_request_resumed_from_its_tokens_goes_on_as_without_the_fault():
    """Failover recompute: prefill of prompt + the tokens the client has, then the same seeded draws. In
    deterministic mode the re-prefilled KV is the decode-computed one bit for bit, so the stream is exactly the
    fault-free one (seed 107 has a draw with margin 1.5e-5 at token 107, which the fast path can flip)."""
    from tests.e2e.helpers import TINY

    e = Engine(**TINY, deterministic=True)
    for seed in (103, 107):
        params = SamplingParams(max_tokens=300, temperature=0.8, top_p=0.95, seed=seed, ignore_eos=True)
        prompt = f"failover request {seed - 100}"
        full = e.generate([prompt], params)[0].new_token_ids
        for cut in (5, 107, 250):
            e.resume_from_tokens("r", e.tokenizer.encode(prompt), full[:cut], params, seed, 0, 0)
            rest = []
            while e.has_unfinished():
                rest += [t for o in e.step() for t in o.new_token_ids]
            assert full[:cut] + rest == full, f"seed {seed} cut {cut}"
    e.check_integrity()
