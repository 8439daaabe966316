"""The replay's statistics on records with known timings, and its schedules (orchestrator/bench)."""

import random
import statistics

import numpy as np
import pytest

from orchestrator.bench.traces import TraceRequest
from instance.tokenizer import ByteTokenizer
from orchestrator.bench.replay import PromptSource
from orchestrator.bench.report import format_report
from orchestrator.bench.schedule import arrival_gaps, build_schedule, parse_priority_mix
from orchestrator.bench.stats import (RequestRecord, Slo, e2e_s, itls_s, meets_slo, percentile, summarize,
                                      summarize_by_priority, tpot_s, ttft_s)


def record(index, sent, chunks, end, status="OK", priority=0, scheduled=None):
    """chunks: [(arrival, tokens)]"""
    return RequestRecord(index=index, scheduled_s=sent if scheduled is None else scheduled, prompt_tokens=10,
                         max_tokens=sum(n for _, n in chunks) or 4, priority=priority, sent_s=sent,
                         chunk_times_s=[t for t, _ in chunks], chunk_tokens=[n for _, n in chunks], end_s=end,
                         status=status)


@pytest.fixture
def records():
    return [
        # A: 4 one-token messages; TTFT 200 ms, e2e 400 ms, TPOT 200/3 ms, gaps 50, 50, 100 ms; sent 10 ms late
        record(0, 1.0, [(1.2, 1), (1.25, 1), (1.30, 1), (1.40, 1)], 1.40, scheduled=0.99),
        # B: 2 tokens together, then 1, then a token-less last message; TTFT 500, e2e 650, TPOT 150/2, gap 100
        record(1, 2.0, [(2.5, 2), (2.6, 1)], 2.65, priority=1),
        # C: one token; TTFT = e2e = 100 ms, no TPOT, no gap
        record(2, 3.0, [(3.1, 1)], 3.1, priority=1),
        # D: rejected; E: cancelled by the user after one token
        record(3, 3.5, [], 3.52, status="RESOURCE_EXHAUSTED"),
        record(4, 3.6, [(3.7, 1)], 3.8, status="CANCELLED"),
    ]


def test_per_request_latencies(records):
    a, b, c, d, _ = records
    assert ttft_s(a) == pytest.approx(0.2) and e2e_s(a) == pytest.approx(0.4)
    assert tpot_s(a) == pytest.approx(0.2 / 3) and itls_s(a) == pytest.approx([0.05, 0.05, 0.1])
    assert b.tokens == 3 and ttft_s(b) == pytest.approx(0.5) and e2e_s(b) == pytest.approx(0.65)
    assert tpot_s(b) == pytest.approx(0.075) and itls_s(b) == pytest.approx([0.1])
    assert ttft_s(c) == pytest.approx(0.1) and tpot_s(c) is None and itls_s(c) == []
    assert ttft_s(d) is None and tpot_s(d) is None


def test_summary_percentiles_throughput_and_goodput(records):
    s = summarize(records, Slo(ttft_ms=300, tpot_ms=70))
    assert (s.requests, s.completed) == (5, 3)
    assert s.failed == {"RESOURCE_EXHAUSTED": 1, "CANCELLED": 1}
    # TTFT of the OK ones: 100, 200, 500 ms
    assert (s.ttft.count, s.ttft.p50, s.ttft.p90, s.ttft.p99, s.ttft.max) == pytest.approx((3, 200, 440, 494, 500))
    assert s.ttft.mean == pytest.approx(800 / 3)
    # TPOT: 66.67 and 75 ms (C has one token)
    a_tpot = 200 / 3
    assert (s.tpot.count, s.tpot.p50, s.tpot.p99) == pytest.approx((2, (a_tpot + 75) / 2, a_tpot + 0.99 * (75 - a_tpot)))
    # ITL pooled: 50, 50, 100, 100
    assert (s.itl.count, s.itl.p50, s.itl.p90, s.itl.max) == pytest.approx((4, 75, 100, 100))
    assert (s.e2e.p50, s.e2e.max) == pytest.approx((400, 650))
    assert s.send_lag.max == pytest.approx(10) and s.send_lag.p50 == pytest.approx(0)
    # the run: first send 1.0 s to last message 3.8 s
    assert s.duration_s == pytest.approx(2.8)
    assert s.output_tokens == 8 and s.token_throughput == pytest.approx(8 / 2.8)
    assert s.request_throughput == pytest.approx(3 / 2.8)
    # A and C meet TTFT <= 300 ms and TPOT <= 70 ms (C has no TPOT); B's TTFT is 500 ms
    assert s.goodput == pytest.approx(2 / 2.8)
    assert s.slo_attained == pytest.approx(2 / 4)           # of the 4 that ended on their own


def test_each_half_of_the_slo_counts(records):
    a, b, c, d, _ = records
    assert [meets_slo(r, Slo(ttft_ms=600)) for r in (a, b, c, d)] == [True, True, True, False]
    assert [meets_slo(r, Slo(tpot_ms=70)) for r in (a, b, c)] == [True, False, True]
    assert [meets_slo(r, Slo(ttft_ms=150, tpot_ms=1000)) for r in (a, b, c)] == [False, False, True]
    assert summarize(records, Slo()).goodput == pytest.approx(3 / 2.8)
    assert summarize(records, Slo(ttft_ms=50)).goodput == 0.0


def test_priority_classes_share_the_runs_duration(records):
    classes = summarize_by_priority(records, Slo(ttft_ms=300, tpot_ms=70))
    assert list(classes) == [1, 0]
    high, low = classes[1], classes[0]
    assert (high.requests, high.completed, low.requests, low.completed) == (2, 2, 3, 1)
    assert high.ttft.p50 == pytest.approx(300) and low.ttft.p50 == pytest.approx(200)
    assert high.duration_s == low.duration_s == pytest.approx(2.8)
    assert high.goodput == pytest.approx(1 / 2.8) and low.goodput == pytest.approx(1 / 2.8)


def test_report_ends_with_the_goodput_and_names_failures(records):
    text = format_report(records, Slo(ttft_ms=300, tpot_ms=70), "replay of t")
    lines = text.splitlines()
    assert lines[0] == "replay of t: 5 requests sent, 3 OK, 2 not OK, over 2.8 s"
    assert lines[-1] == "goodput: 0.71 requests/s (50.0% of requests met the SLO)"
    assert "SLO: TTFT <= 300 ms and TPOT <= 70 ms" in text
    assert "not OK: CANCELLED 1, RESOURCE_EXHAUSTED 1" in text
    ttft_row = next(line for line in lines if line.startswith("TTFT"))
    assert ttft_row.split() == ["TTFT", "3", "266.7", "200.0", "440.0", "494.0", "500.0"]
    assert "PRIORITY" in text


@pytest.mark.parametrize("seed", range(5))
def test_percentile_matches_numpy(seed):
    rng = random.Random(seed)
    values = [rng.expovariate(1.0) for _ in range(rng.randint(1, 200))]
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError):
        percentile([], 50)


# ----- schedules --------------------------------------------------------------------------------------------------

ROWS = [TraceRequest(float(i), 100 + i, 10 + i) for i in range(100)]


def test_trace_timestamps_scaled_and_cut():
    plan = build_schedule(ROWS, rate_scale=4.0, duration_s=5.0)
    assert [p.at_s for p in plan] == [i / 4 for i in range(20)]         # 0 .. 4.75 s: before 5 s
    assert [(p.index, p.prompt_tokens, p.output_tokens) for p in plan[:2]] == [(0, 100, 10), (1, 101, 11)]
    assert len(build_schedule(ROWS, num_requests=7)) == 7
    assert len(build_schedule(ROWS, rate_scale=0.5, duration_s=10, num_requests=50)) == 5


def test_poisson_and_gamma_arrivals_have_the_asked_rate_and_cv():
    gaps = arrival_gaps(20000, rate=50.0, cv=3.0, rng=random.Random(1))
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.1)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(3.0, rel=0.1)
    gaps = arrival_gaps(20000, rate=50.0, cv=1.0, rng=random.Random(2))
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)
    plan = build_schedule(ROWS, arrivals="poisson", rate=10.0, seed=3)
    assert plan[0].at_s == 0.0 and all(b.at_s >= a.at_s for a, b in zip(plan, plan[1:]))
    assert len(plan) == 100 and plan[-1].at_s == pytest.approx(99 / 10, rel=0.3)
    assert [p.output_tokens for p in plan] == [r.output_tokens for r in ROWS]      # lengths from the trace
    assert build_schedule(ROWS, arrivals="gamma", rate=10.0, cv=2.0, seed=3) == \
        build_schedule(ROWS, arrivals="gamma", rate=10.0, cv=2.0, seed=3)
    assert build_schedule(ROWS, arrivals="gamma", rate=10.0, cv=2.0, seed=3) != \
        build_schedule(ROWS, arrivals="gamma", rate=10.0, cv=2.0, seed=4)
    with pytest.raises(ValueError, match="needs --rate"):
        build_schedule(ROWS, arrivals="gamma")


def test_priority_mix():
    assert parse_priority_mix("0.1:1") == [(0.1, 1)]
    assert parse_priority_mix("0.1:2, 0.3:1") == [(0.1, 2), (0.3, 1)]
    assert parse_priority_mix("") == []
    for bad in ("0.1", "x:1", "0.6:1,0.6:2", "1.5:1"):
        with pytest.raises(ValueError, match="--priority-mix"):
            parse_priority_mix(bad)
    rows = [TraceRequest(float(i), 10, 10) for i in range(4000)]
    prios = [p.priority for p in build_schedule(rows, priority_mix=[(0.1, 2), (0.3, 1)], seed=5)]
    assert prios.count(2) / 4000 == pytest.approx(0.1, abs=0.02)
    assert prios.count(1) / 4000 == pytest.approx(0.3, abs=0.03)
    assert prios.count(0) + prios.count(1) + prios.count(2) == 4000


def test_prompts_have_the_exact_length_and_differ():
    tok = ByteTokenizer()
    source = PromptSource(tok, longest=300, seed=0)
    prompts = [source.ids(i, n) for i, n in enumerate((1, 2, 50, 300, 300))]
    assert [len(p) for p in prompts] == [1, 2, 50, 300, 300]
    assert all(p[0] == tok.bos_token_id for p in prompts)
    assert prompts[3] != prompts[4]
    assert source.ids(4, 300) == prompts[4]                                 # seeded
