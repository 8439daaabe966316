"""The EP autoscaling rule (and the reconcile step that runs it): grows after the step time stays high for the
up window, shrinks after it stays low for the longer down window, resets in the band, waits out the cooldown,
keeps min/max, never shrinks for a lost worker, and does nothing unless enabled."""

import asyncio
from dataclasses import dataclass, field

from instance.backend import LoadSnapshot
from instance.messages import ExpertStatus, InstanceStatus
from orchestrator.ep_scaling import ExpertAutoscaler
from orchestrator.fleet import SERVING
from orchestrator.policies.ep_autoscale import EPAutoscaleConfig, EPMemory, EPObservation, decide_ep
from rpc import BackgroundTasks

CFG = EPAutoscaleConfig(enabled=True, high_step_ms=40, low_step_ms=10, up_window_s=5, down_window_s=30,
                        cooldown_s=20, min_ep=1, max_ep=3)


def run(samples, cfg=CFG, ep=1, memory=EPMemory(), target=None):
    """samples: (time, step_ms, running); returns [(time, new size)] applying each decision at once."""
    changes = []
    for t, ms, running in samples:
        d, memory = decide_ep(EPObservation(ep, target or ep, ms, running), memory, cfg, t)
        if d is not None:
            ep = d.ep_size
            changes.append((t, ep))
    return changes


def test_grows_only_after_the_up_window_and_shrinks_after_the_longer_down_window():
    high = [(t, 60.0, 8) for t in range(0, 8)]
    assert run(high) == [(5, 2)]
    low = [(t, 5.0, 2) for t in range(0, 40)]
    assert run(low, ep=2) == [(30, 1)]


def test_a_step_time_inside_the_band_resets_the_clock():
    samples = [(0, 60.0, 8), (1, 60.0, 8), (2, 60.0, 8), (3, 60.0, 8), (4, 20.0, 8), (5, 60.0, 8), (6, 60.0, 8)]
    assert run(samples) == []


def test_cooldown_then_max():
    samples = [(t, 80.0, 8) for t in range(0, 60)]
    assert run(samples) == [(5, 2), (25, 3)]          # 20 s cooldown, then stops at max_ep 3


def test_min_and_max_are_restored_at_once():
    assert run([(0, 20.0, 1)], ep=5) == [(0, 3)]
    assert run([(0, 20.0, 1)], cfg=CFG.model_copy(update=dict(min_ep=2))) == [(0, 2)]


def test_a_lost_worker_is_never_a_scale_down_and_an_idle_instance_never_shrinks():
    low = [(t, 1.0, 2) for t in range(0, 60)]
    assert run(low, ep=2, target=3) == []             # repairing 2 -> 3: no decision
    assert run([(t, 1.0, 0) for t in range(0, 60)], ep=2) == []


def test_off_by_default():
    assert EPAutoscaleConfig().enabled is False
    assert run([(t, 999.0, 8) for t in range(0, 60)], cfg=EPAutoscaleConfig()) == []


def test_bad_bounds_are_refused_with_a_sentence():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must be below high_step_ms"):
        EPAutoscaleConfig(low_step_ms=50, high_step_ms=40)
    with pytest.raises(ValidationError, match="exceeds max_ep"):
        EPAutoscaleConfig(min_ep=4, max_ep=2)


# ----- the reconcile step around the rule -------------------------------------------------------------------



def status(iid: str, step_ms: float, ep: int, target: int | None = None, moe: bool = True) -> InstanceStatus:
    load = LoadSnapshot(total_blocks=100, free_blocks=50, used_blocks=50, reserved_blocks=0, block_size=16,
                        num_running=4, num_waiting=0, num_preempted=0, num_suspended=0, head_demand_blocks=0,
                        waiting_demand_blocks=0, running_tokens=400, step_time_ms=step_ms, tokens_per_s=100.0,
                        num_preemptions_total=0)
    experts = ExpertStatus(ep, target or ep, 3, (), 1) if moe else None
    return InstanceStatus(iid, load, 10, 4, experts=experts)


@dataclass
class Member:
    status: InstanceStatus
    state: str = SERVING

    @property
    def client(self):
        return type("C", (), {"instance_id": self.status.instance_id})()


@dataclass
class Fleet:
    members: dict = field(default_factory=dict)


class Admin:
    def __init__(self):
        self.calls = []

    async def scale_experts(self, iid, n, dry_run=False):
        self.calls.append((iid, n))


def test_the_reconcile_step_scales_only_the_moe_instance_whose_step_time_stays_high():
    async def scenario():
        clock = [0.0]
        fleet, admin = Fleet(), Admin()
        fleet.members = {"slow": Member(status("slow", 80.0, 1)), "fast": Member(status("fast", 20.0, 1)),
                         "dense": Member(status("dense", 500.0, 1, moe=False)),
                         "repairing": Member(status("repairing", 80.0, 1, target=2))}
        scaler = ExpertAutoscaler(CFG.model_copy(update=dict(interval_s=1)), fleet, admin,
                                  BackgroundTasks("test"), clock=lambda: clock[0])
        for t in range(0, 8):
            clock[0] = float(t)
            scaler.step()
            await asyncio.sleep(0)
        return admin.calls

    assert asyncio.run(scenario()) == [("slow", 2)]


def test_the_reconcile_step_does_nothing_when_off():
    async def scenario():
        fleet, admin = Fleet({"slow": Member(status("slow", 80.0, 1))}), Admin()
        scaler = ExpertAutoscaler(EPAutoscaleConfig(), fleet, admin, BackgroundTasks("test"), clock=lambda: 100.0)
        scaler.step()
        await asyncio.sleep(0)
        return admin.calls

    assert asyncio.run(scenario()) == []
