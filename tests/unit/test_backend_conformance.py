"""What every engine backend must do, whatever engine is behind it: the contract of `EngineBackend` that the
instance actor, the migration ports and the frontend rely on. A new backend joins by adding a factory to
BACKENDS; the suite uses only the interface (no engine internals), so it runs unchanged against each."""

import random

import pytest

from instance.backend import EngineBackend, UnknownRequestError
from instance.engine import Engine
from instance.kv_cache import OutOfBlocksError, blocks_for
from instance.request import Detokenizer
from instance.sampling import InvalidRequestError, SamplingParams


def native(**overrides) -> EngineBackend:
    return Engine(**{**dict(model="tiny-llama", num_blocks=160, block_size=4, max_model_len=256,
                            max_num_batched_tokens=64), **overrides})


_turn = 0


def vllm(**overrides) -> EngineBackend:
    """SmolLM2 on vLLM: two shared engines handed out in turn (loading one takes seconds to a minute), so two
    backends made one after the other in a test are distinct engines."""
    from tests.vllm_engines import pooled_backend

    global _turn
    assert not overrides, "the shared vLLM engines take no overrides"
    _turn += 1
    return pooled_backend(_turn % 2)


BACKENDS = {"native": native, "vllm": vllm}

GREEDY = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, seed=77, ignore_eos=True)


@pytest.fixture(params=sorted(BACKENDS))
def make(request):
    return BACKENDS[request.param]


def prompt(seed: int, n: int = 37) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 200) for _ in range(n)]


def run(backend: EngineBackend, steps: int | None = None) -> dict[str, tuple[list[int], str, str | None]]:
    """Step (to the end, or `steps` times), checking integrity after each; per request: tokens, text, reason."""
    got: dict[str, tuple[list[int], str, str | None]] = {}
    n = 0
    while backend.has_unfinished() and (steps is None or n < steps):
        for out in backend.step():
            tokens, text, _ = got.get(out.request_id, ([], "", None))
            got[out.request_id] = (tokens + out.new_token_ids, text + out.text_delta, out.finish_reason)
        backend.check_integrity()
        n += 1
    return got


def assert_empty(backend: EngineBackend) -> None:
    backend.check_integrity()
    load = backend.load()
    assert load.free_blocks == load.total_blocks and load.reserved_blocks == 0
    assert not backend.list_requests() and not backend.has_unfinished()


def reference(make, p: list[int], params: SamplingParams) -> tuple[list[int], str]:
    backend = make()
    backend.add_request("ref", prompt_token_ids=p, params=params)
    tokens, text, _ = run(backend)["ref"]
    return tokens, text


def test_it_declares_what_it_serves(make):
    b = make()
    assert b.model_name and b.max_model_len > 0 and b.block_size > 0 and b.vocab_size > 0
    ids = b.tokenizer.encode("The tide comes in.")
    assert ids and all(0 <= t < b.vocab_size for t in ids)
    assert b.validate(ids, GREEDY) == ids


def test_a_request_streams_its_tokens_and_text_and_frees_everything(make):
    b = make()
    p = prompt(1)
    b.add_request("r", prompt_token_ids=p, params=GREEDY)
    tokens, text, reason = run(b)["r"]
    assert len(tokens) == GREEDY.max_tokens and reason == "length"
    detok = Detokenizer(b.tokenizer.token_bytes, ())
    for t in tokens:
        detok.push(t)
    detok.flush()
    assert text == detok.text                      # the deltas add up to the whole text, UTF-8 safe
    assert_empty(b)


def test_the_same_requests_give_the_same_tokens_greedy_and_seeded(make):
    outs = []
    for _ in range(2):
        b = make()
        for i, params in enumerate((GREEDY, SEEDED, GREEDY)):
            b.add_request(f"r{i}", prompt_token_ids=prompt(10 + i), params=params)
        outs.append({rid: t for rid, (t, _, _) in run(b).items()})
    assert outs[0] == outs[1]


def test_load_and_request_info_agree_with_what_it_holds(make):
    b = make()
    for i in range(3):
        b.add_request(f"r{i}", prompt_token_ids=prompt(20 + i), params=GREEDY, priority=i % 2)
    run(b, steps=3)
    load, infos = b.load(), b.list_requests()
    assert load.free_blocks + load.used_blocks + load.reserved_blocks == load.total_blocks
    assert load.block_size == b.block_size
    assert load.num_running == sum(r.status == "running" for r in infos) > 0
    assert load.num_waiting == sum(r.status == "waiting" for r in infos)
    assert load.num_high_priority == 1
    info = b.request_info("r0")
    assert info.num_prompt_tokens == 37 and info.num_tokens == 37 + info.num_output_tokens
    assert info.max_tokens == GREEDY.max_tokens and info.num_computed_tokens <= info.num_tokens
    assert b.request_info("nobody") is None


def test_bad_input_names_the_field_and_serving_goes_on(make):
    b = make()
    b.add_request("ok", prompt_token_ids=prompt(2), params=GREEDY)
    bad = [(dict(prompt_token_ids=[1] * b.max_model_len, params=GREEDY), "prompt"),
           (dict(prompt_token_ids=[b.vocab_size], params=GREEDY), "prompt_token_ids"),
           (dict(prompt_token_ids=[1, 2], params=SamplingParams(max_tokens=0)), "max_tokens"),
           (dict(prompt_token_ids=[1, 2], params=SamplingParams(top_p=2.0)), "top_p")]
    for kwargs, field in bad:
        with pytest.raises(InvalidRequestError) as err:
            b.add_request("bad", **kwargs)
        assert err.value.field == field
    with pytest.raises(InvalidRequestError) as err:
        b.add_request("ok", prompt_token_ids=[1, 2], params=GREEDY)
    assert err.value.field == "request_id"
    assert set(run(b)) == {"ok"}
    assert_empty(b)


def test_abort_stops_a_request_anywhere_and_frees_its_blocks(make):
    b = make()
    b.add_request("running", prompt_token_ids=prompt(3), params=GREEDY)
    b.add_request("suspended", prompt_token_ids=prompt(4), params=GREEDY)
    run(b, steps=2)
    b.suspend("suspended")
    assert b.abort("running") and b.abort("suspended")
    assert not b.abort("running") and not b.abort("never-here")
    assert_empty(b)


def test_suspend_and_resume_leave_the_tokens_unchanged(make):
    p = prompt(5)
    expected, _ = reference(make, p, SEEDED)
    b = make()
    b.add_request("r", prompt_token_ids=p, params=SEEDED)
    first = run(b, steps=6)["r"][0]
    state = b.suspend("r")
    assert state.num_computed_tokens > 0 and not b.has_unfinished() and b.step() == []
    assert b.load().used_blocks > 0                       # it keeps its blocks while suspended
    b.resume("r")
    assert first + run(b)["r"][0] == expected
    assert_empty(b)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_moved_in_stages_to_another_backend_goes_on_with_the_same_tokens_and_text(make, params):
    p = prompt(6, n=61)
    expected, expected_text = reference(make, p, params)
    src, dst = make(), make()
    src.add_request("r", prompt_token_ids=p, params=params)
    tokens, text, _ = run(src, steps=5)["r"]
    # pre-copy: the full blocks computed so far, while the request keeps running on the source
    staged = src.request_info("r").num_computed_tokens // src.block_size
    first = dst.reserve_import("m1", staged)
    dst.write_import("m1", first, src.export_blocks("r", 0, staged))
    more, more_text, _ = run(src, steps=2)["r"]
    # last stage: out of the batch, the rest of its blocks and its state
    state = src.suspend("r")
    needed = blocks_for(state.num_computed_tokens, src.block_size)
    rest = dst.reserve_import("m1", needed - staged)
    assert rest == staged
    dst.write_import("m1", rest, src.export_blocks("r", staged, needed))
    dst.commit_import("m1", state)
    src.free_suspended("r")
    assert_empty(src)
    after, after_text, reason = run(dst)["r"]
    assert tokens + more + after == expected and text + more_text + after_text == expected_text
    assert reason == "length"
    assert_empty(dst)


def test_an_import_holds_only_what_it_reserved_and_cancelling_gives_it_back(make):
    b = make()
    load = b.load()
    assert b.reserve_import("m", 3) == 0 and b.reserve_import("m", 2) == 3
    assert b.load().reserved_blocks == 5 and b.load().free_blocks == load.free_blocks - 5
    b.check_integrity()
    src = make()
    src.add_request("r", prompt_token_ids=prompt(7), params=GREEDY)
    run(src, steps=2)
    with pytest.raises(ValueError):
        b.write_import("m", 4, src.export_blocks("r", 0, 2))          # blocks 4..5: only 0..4 reserved
    with pytest.raises(OutOfBlocksError):
        b.reserve_import("greedy", load.total_blocks)
    b.cancel_import("m")
    b.cancel_import("m")                                            # twice: no error
    b.cancel_import("never")
    assert_empty(b)
    with pytest.raises(UnknownRequestError):
        src.export_blocks("nobody", 0, 1)


def test_a_request_resumed_from_its_streamed_tokens_goes_on_identically(make):
    """What failover does: re-prefill prompt + the tokens the client has, draw on from there."""
    p = prompt(8)
    expected, expected_text = reference(make, p, GREEDY)
    for cut in (0, 1, 13):
        b = make()
        detok = Detokenizer(b.tokenizer.token_bytes, ())
        for t in expected[:cut]:
            detok.push(t)
        emitted = detok.delta(False)
        b.resume_from_tokens("r", p, expected[:cut], GREEDY, seed=0, priority=0, text_emitted=len(emitted))
        tokens, text, _ = run(b)["r"]
        assert expected[:cut] + tokens == expected and emitted + text == expected_text
        assert_empty(b)
    b = make()
    b.add_request("here", prompt_token_ids=p, params=GREEDY)
    with pytest.raises(InvalidRequestError) as err:              # the frontend's sign that it is already here
        b.resume_from_tokens("here", p, [], GREEDY, seed=0, priority=0, text_emitted=0)
    assert err.value.field == "request_id"
