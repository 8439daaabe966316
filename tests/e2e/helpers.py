"""Helpers for end-to-end tests: bring a deployment up on the session's Ray and talk to it over gRPC."""

from __future__ import annotations

import contextlib
import time

import grpc

from instance.config import EngineConfig
from orchestrator.config import ServeConfig
from orchestrator.deployment import Deployment
from tidal.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

TINY = dict(model="tiny-llama", num_blocks=256, block_size=16, max_model_len=1024)


@contextlib.contextmanager
def deployment(name: str, instances: int = 2, engine: dict | None = None, **serve):
    cfg = ServeConfig(engine=EngineConfig(**{**TINY, **(engine or {})}), instances=instances, host="127.0.0.1",
                      port=0, http_port=0, deployment=name, namespace="tidal-tests", grace_period_s=2.0, **serve)
    d = Deployment(cfg)
    port = d.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Client(channel, d)
    finally:
        channel.close()
        d.stop()


class Client:
    def __init__(self, channel: grpc.Channel, d: Deployment):
        self.channel = channel
        self.deployment = d
        self.gen = generation_pb2_grpc.GenerationServiceStub(channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(channel)

    def generate(self, timeout: float = 60.0, **fields) -> list:
        return list(self.gen.Generate(request(**fields), timeout=timeout))

    def instances(self) -> dict:
        resp = self.admin.ListInstances(admin_pb2.ListInstancesRequest(), timeout=10)
        return {i.instance_id: i for i in resp.instances}

    def wait_for_load(self, instance_id: str, predicate, timeout: float = 10.0):
        """The instance's load once `predicate(load)` holds (loads are observed every ~50 ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            load = self.instances()[instance_id].load
            if predicate(load):
                return load
            time.sleep(0.02)
        raise AssertionError(f"{instance_id} never reached the expected load: {self.instances()[instance_id]}")

    def wait_until(self, predicate, timeout: float = 10.0) -> dict:
        """Every instance's load (instance id -> load) once `predicate(loads)` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            loads = {i: v.load for i, v in self.instances().items()}
            if predicate(loads):
                return loads
            time.sleep(0.02)
        raise AssertionError(f"the instances never reached the expected loads: {self.instances()}")

    def wait_all_blocks_free(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            loads = [i.load for i in self.instances().values()]
            if all(l.free_blocks == l.total_blocks and l.num_running == 0 and l.num_waiting == 0 for l in loads):
                return
            time.sleep(0.05)
        raise AssertionError(f"blocks still held after {timeout} s: {self.instances()}")


def request(prompt=None, token_ids=None, chat=None, max_tokens=16, temperature=0.0, seed=None, **kw):
    sampling_keys = {"top_p", "top_k", "min_p", "ignore_eos"}
    sampling = generation_pb2.SamplingParams(temperature=temperature,
                                             **{k: kw.pop(k) for k in list(kw) if k in sampling_keys})
    req = generation_pb2.GenerateRequest(sampling=sampling, **kw)
    if max_tokens is not None:
        req.max_tokens = max_tokens
    if seed is not None:
        req.seed = seed
    if prompt is not None:
        req.prompt = prompt
    if token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    for role, content in chat or []:
        req.chat.messages.add(role=role, content=content)
    return req


def tokens_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


# The engine is not batch-invariant: a stream resumed by recompute re-prefills tokens first computed one decode
# step at a time, and a request batched with others (padded decode attention, other matmul shapes) gets logits
# equal to a lone run's only up to float rounding. So seeded draws agree except at a near-tie: a draw whose
# margin (instance.sampling.draw_margin) is below this (seen: 1.5e-5 after recompute; 4.8e-4 for a request
# batched with seven others, tests/e2e/test_pd.py).
NEAR_TIE = 1e-3


def reference_with_margins(engine, prompt: str, params) -> tuple[list[int], list[float]]:
    """The fault-free tokens of `prompt` on an in-process engine, and each draw's margin."""
    import instance.model_runner as runner
    from instance.sampling import draw_margin, sample

    margins: dict[int, float] = {}

    def recording(logits, rows):
        for i, row in enumerate(rows):
            margins[row.index] = draw_margin(logits[i], row)
        return sample(logits, rows)

    runner.sample = recording
    try:
        tokens = engine.generate([prompt], params)[0].new_token_ids
    finally:
        runner.sample = sample
    return tokens, [margins[i] for i in range(len(tokens))]


def assert_resumed_identically(got: list[int], expected: list[int], margins: list[float], what: str) -> None:
    """Identical tokens; or, if they part, the first differing token was a near-tie draw in the reference run
    (a divergence anywhere else is a bug: a lost, repeated or misnumbered token, or wrong KV)."""
    if got == expected:
        return
    assert len(got) == len(expected), f"{what}: {len(got)} tokens, expected {len(expected)}"
    first = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
    assert margins[first] < NEAR_TIE, (f"{what}: token {first} differs ({got[first]} != {expected[first]}) and "
                                       f"its draw was not a near-tie (margin {margins[first]:.2e})")
