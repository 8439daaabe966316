"""The vLLM internals the vLLM backend relies on are where it expects them (instance/backends/vllm/internals.py):
a vLLM upgrade that moves one fails here with a sentence naming it, before anything else breaks obscurely."""

import pytest

from tests.vllm_engines import pooled_backend, require_vllm


def test_the_installed_vllm_has_every_class_method_and_signature_the_backend_uses():
    require_vllm()
    from instance.backends.vllm import internals

    assert len(internals.check_installed()) >= 15


def test_a_built_engine_has_every_attribute_path_the_backend_reads():
    backend = pooled_backend()
    from instance.backends.vllm import internals

    backend.add_request("probe", prompt_token_ids=[1, 2, 3])      # so a live vLLM Request is checked too
    try:
        internals.check_engine(backend.llm)
        layers = backend._shared.layers()
        assert len(layers) == 30 and layers[0].shape[backend._shared.block_axis] == backend.num_blocks + 1
    finally:
        backend.abort("probe")


@pytest.mark.parametrize("owner, name, sentence", [
    ("vllm.v1.core.block_pool:BlockPool", "get_num_free_blocks", "BlockPool.get_num_free_blocks is gone"),
    ("vllm.v1.core.kv_cache_manager:KVCacheManager", "get_block_ids", "KVCacheManager.get_block_ids is gone"),
    ("vllm.distributed.kv_transfer.kv_transfer_state:", "_KV_CONNECTOR_AGENT", "_KV_CONNECTOR_AGENT"),
])
def test_a_moved_internal_fails_with_a_sentence_naming_it(monkeypatch, owner, name, sentence):
    require_vllm()
    import importlib

    from instance.backends.vllm import internals

    module, _, cls = owner.partition(":")
    target = importlib.import_module(module)
    monkeypatch.delattr(getattr(target, cls) if cls else target, name)
    with pytest.raises(internals.VllmInternalsChanged) as err:
        internals.check_installed()
    assert sentence in str(err.value) and "internals.py" in str(err.value)


def test_a_moved_attribute_on_a_built_engine_is_named():
    from instance.backends.vllm import internals

    class Engine:                    # an LLMEngine whose in-process client lost its engine core
        engine_core = object()

    with pytest.raises(internals.VllmInternalsChanged) as err:
        internals.check_engine(Engine())
    assert "LLMEngine.engine_core.engine_core.scheduler: no 'engine_core'" in str(err.value)
