"""A short chaos soak (benchmarks/chaos_soak.py): a few hundred streams while instances, the scheduler and the
state store (redis-server) are SIGKILLed every 1.5 s. Nothing may come out wrong or hang."""

from benchmarks.chaos_soak import FAULTS, run_soak


def test_a_short_chaos_soak_gives_no_wrong_token_no_broken_stream_and_no_hang(ray_local):
    report = run_soak(n=300, interval=1.5, concurrency=8, max_tokens=32, instances=3, faults=list(FAULTS), seed=1)
    assert report.fault_free_errors == 0
    assert sum(report.kills.values()) >= 3, f"the chaos did not happen: {dict(report.kills)}"
    assert report.total == 300
    assert report.outcomes["different"] == 0, report.examples
    assert report.outcomes["hung"] == 0
    assert report.identical_pct >= 90, (report.outcomes, report.errors)
    assert all(what.split(":")[0] in ("UNAVAILABLE", "RESOURCE_EXHAUSTED") and len(what) > 20
               for what in report.errors), report.errors          # a clear status with a message
    assert report.recovered_s < 60, report.recovered_s
