"""Choosing an instance's engine: `--backend` / `backend:` select it, one deployment runs one backend (a
scheduler that finds instances of another one refuses to start), and a request is never moved between
backends (FAILED_PRECONDITION)."""

import asyncio
import dataclasses

import pytest

from instance.backends import check_same_backend, create_backend
from instance.config import EngineConfig
from orchestrator.config import ConfigError, load_config
from orchestrator.errors import AdminError
from tests.unit.test_reconcile import FakeInstance, FakeInstances, MemoryStore, running, scheduler


def test_the_backend_comes_from_the_flag_or_the_config_file(tmp_path):
    assert load_config(None, {}).engine.backend == "native"
    assert load_config(None, {"backend": "vllm"}).engine.backend == "vllm"
    f = tmp_path / "tidal.yaml"
    f.write_text("backend: vllm\ninstances: 3\n")
    assert load_config(f, {}).engine.backend == "vllm"
    f.write_text("engine:\n  backend: vllm\n")
    assert load_config(f, {"backend": "native"}).engine.backend == "native"      # the flag wins
    with pytest.raises(ConfigError, match="backend: Input should be 'native' or 'vllm'"):
        load_config(None, {"backend": "tensorrt"})


def test_the_vllm_backend_refuses_a_block_size_its_cpu_attention_cannot_take():
    with pytest.raises(ValueError, match="block_size: vLLM's CPU attention needs a multiple of 32"):
        create_backend(EngineConfig(backend="vllm", block_size=16))


def test_instances_of_two_backends_are_named_in_one_sentence():
    check_same_backend({"instance-0": "vllm", "instance-1": "vllm"})
    with pytest.raises(ValueError) as err:
        check_same_backend({"instance-0": "native", "instance-1": "vllm", "instance-2": "vllm"})
    assert str(err.value) == ("backend: one deployment runs one backend, but these instances mix native "
                              "(instance-0) and vllm (instance-1, instance-2); start them all with the same --backend")


class VllmInstance(FakeInstance):
    async def start(self):
        return dataclasses.replace(await super().start(), backend="vllm")


def test_a_scheduler_finding_instances_of_another_backend_refuses_to_start():
    async def scenario():
        store, factory = MemoryStore(), FakeInstances()
        first, _, _ = scheduler(store, factory, instances=2)          # a native deployment
        await first.start()
        second, _, _ = scheduler(store, factory, instances=2,
                                 engine=EngineConfig(model="tiny-llama", backend="vllm").model_dump())
        with pytest.raises(RuntimeError, match=r"mix native \(instance-0, instance-1\) and vllm \(the configuration\)"):
            await second.start()

    asyncio.run(scenario())


def test_moving_a_request_between_backends_is_a_failed_precondition():
    async def scenario():
        sched, factory, _ = scheduler(instances=2)
        factory.alive["instance-1"] = VllmInstance("instance-1")     # as if it had joined running vLLM
        orig = factory.create
        factory.create = lambda iid: factory.alive["instance-1"] if iid == "instance-1" else orig(iid)
        with pytest.raises(RuntimeError, match="mix"):
            await sched.start()                                        # refused at start already
        sched.fleet._check_backends = lambda: None                    # past that guard, the admin one holds
        await sched.start()
        factory.alive["instance-0"].requests["r"] = running("r")
        with pytest.raises(AdminError) as err:
            await sched.migrate("r", "instance-1")
        assert err.value.code == "FAILED_PRECONDITION" and "backend native" in err.value.message
        assert "r" in factory.alive["instance-0"].requests                         # it did not move

    asyncio.run(scenario())
