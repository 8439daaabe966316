"""Fuzzed requests through the frontend's parsing and validation (hypothesis): random fields and sizes, chat
messages with odd roles and Unicode, token ids at and past the vocabulary, hostile request ids. Never a crash
or a hang: a request is accepted, or refused with INVALID_ARGUMENT naming the field. A short, bounded run;
benchmarks/fuzz.py runs a longer campaign."""

import asyncio
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instance.config import EngineConfig
from instance.messages import InstanceInfo
from orchestrator.fleet import SERVING, InstanceView
from orchestrator.frontend import Frontend, RpcError
from tidal.v1 import generation_pb2

VOCAB, MAX_LEN = 260, 1024
FIELDS = {"prompt", "token_ids", "chat", "prompt_token_ids", "max_tokens", "temperature", "top_k", "top_p", "min_p",
          "seed", "stop", "stop_token_ids", "priority", "request_id"}
SLOW_PARSE_S = 1.0

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0, 1e-9, 2.0]))
ints32 = st.integers(min_value=-2**31, max_value=2**31 - 1)
text = st.text(st.characters(codec="utf-8"), max_size=300)


@st.composite
def requests(draw) -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest()
    kind = draw(st.sampled_from(["prompt", "token_ids", "chat", "none"]))
    if kind == "prompt":
        req.prompt = draw(st.one_of(text, st.just(""), st.text(max_size=5000)))
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(st.integers(-5, VOCAB + 5) | ints32, max_size=1200)))
    elif kind == "chat":
        for role, content in draw(st.lists(st.tuples(st.one_of(st.sampled_from(["user", "assistant", "system"]),
                                                                text), text), max_size=6)):
            req.chat.messages.add(role=role, content=content)
    if draw(st.booleans()):
        req.max_tokens = draw(st.one_of(st.integers(1, 64), ints32))
    for name in ("temperature", "top_p"):
        if draw(st.booleans()):
            setattr(req.sampling, name, draw(floats))
    req.sampling.top_k = draw(st.one_of(st.just(0), st.integers(0, 100), ints32))
    req.sampling.min_p = draw(st.one_of(st.just(0.0), floats))
    req.sampling.ignore_eos = draw(st.booleans())
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**64 - 1))
    req.stop.extend(draw(st.one_of(st.lists(text, max_size=3), st.lists(text, max_size=20))))
    req.stop_token_ids.extend(draw(st.one_of(st.lists(st.integers(0, VOCAB - 1), max_size=3),
                                             st.lists(ints32, max_size=5))))
    req.priority = draw(st.one_of(st.just(0), st.integers(-1000, 1000), ints32))
    req.request_id = draw(st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9._:@/-]{1,128}", fullmatch=True), text, st.text(min_size=100, max_size=2000),
                                    st.sampled_from(["ok-1", "a\nb", "nul\x00id", "x" * 129])))
    return req


class Quiet:
    """An instance that takes nothing: a valid request gets as far as dispatch, which then fails (no instance)."""

    instance_id, actor = "instance-0", object()


@pytest.fixture(scope="module")
def frontend() -> Frontend:
    fe = Frontend({"engine": EngineConfig(model="tiny-llama").model_dump()}, "fuzz")
    fe.accepting = True
    info = InstanceInfo("instance-0", "node", "10.0.0.1", "tiny-llama", MAX_LEN, VOCAB)
    fe.views = {"instance-0": InstanceView("instance-0", Quiet(), SERVING, info, None, time.time())}
    return fe


def outcome(fe: Frontend, req) -> tuple[str, str]:
    """("accepted", "") if the request passed validation, ("refused", message) if it was refused."""
    async def first():
        gen = fe.generate(req, None)
        try:
            await gen.__anext__()
        finally:
            await gen.aclose()

    try:
        asyncio.run(first())
    except RpcError as e:
        if e.code == grpc.StatusCode.INVALID_ARGUMENT:
            return "refused", str(e)
        assert e.code == grpc.StatusCode.UNAVAILABLE and "no instance" in str(e), e     # past validation
        return "accepted", ""
    raise AssertionError("a request without an instance to run on did not end")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(req=requests())
def test_any_request_is_accepted_or_refused_naming_the_field(frontend, req):
    started = time.monotonic()
    kind, message = outcome(frontend, req)
    assert time.monotonic() - started < SLOW_PARSE_S
    if kind == "refused":
        assert message.split(":")[0].strip() in FIELDS, message
        assert "\n" not in message.split(":", 1)[0] and "\x00" not in message


def test_regressions_found_by_hand_and_by_the_fuzzer(frontend):
    long_id = generation_pb2.GenerateRequest(prompt="hi", request_id="x" * 1_000_000)
    kind, message = outcome(frontend, long_id)
    assert kind == "refused" and message.startswith("request_id:") and len(message) < 300
    for rid in ("a\nb", "nul\x00id", "sp ace"):
        assert outcome(frontend, generation_pb2.GenerateRequest(prompt="hi", request_id=rid))[0] == "refused"
    huge = generation_pb2.GenerateRequest(prompt="hi", max_tokens=2147483647)
    kind, message = outcome(frontend, huge)
    room = MAX_LEN - len(frontend.tokenizer.encode("hi"))          # says the largest max_tokens that fits
    assert kind == "refused" and message.startswith("max_tokens:") and f"at most {room} fit" in message
