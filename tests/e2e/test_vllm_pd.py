"""Prefill/decode disaggregation over vLLM instances: a request is prefilled on one vLLM instance and handed over
with its KV (the migration protocol, one stage) to a vLLM decode instance; the stream is what vLLM gives
directly."""

import pytest

from tests.e2e.helpers import deployment, tokens_of
from tests.e2e.test_vllm_serving import ENGINE
from tests.vllm_engines import pooled_backend, vllm_direct


@pytest.fixture(scope="module")
def client(ray_local):
    with deployment("e2e-vllm-pd", engine=ENGINE, prefill_instances=1, decode_instances=1,
                    rebalance=dict(auto=False), startup_timeout_s=900.0) as c:
        yield c


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=11)],
                         ids=["greedy", "seeded"])
def test_prefill_on_one_vllm_instance_decode_on_the_other(client, params):
    direct = pooled_backend()
    prompt = "Tell me about the tides of the North Sea and the moon that pulls them"
    chunks = client.generate(prompt=prompt, max_tokens=60, ignore_eos=True, timeout=300, **params)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert chunks[0].instance_id == "instance-0" and chunks[-1].instance_id == "instance-1"
    assert tokens_of(chunks) == vllm_direct(direct, direct.tokenizer.encode(prompt), 60, **params)
    client.wait_all_blocks_free(timeout=60)
