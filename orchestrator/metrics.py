"""Prometheus metrics of a deployment, exported by each frontend at `/metrics` (prefix `tidal_`).

Two sources, one registry per frontend (never prometheus_client's global one, so a process can hold several):

- what the frontend sees itself: requests by outcome, prompt and generation tokens, TTFT, inter-token and
  end-to-end latency, queue time, failovers, admin commands — `FrontendMetrics`, prometheus_client objects;
- what the scheduler sees: per-instance load (the instance table it already pushes) and its migrations and
  reconcile-loop step times (`ControlMetrics`, plain counts pushed with the table) — turned into metric
  families at scrape time by a collector, so a scrape never makes an RPC.

Histogram buckets and meanings follow vLLM's (`vllm/v1/metrics/loggers.py`): TTFT from arrival to the first
token; inter-token latency between consecutive token chunks of a stream; e2e from arrival to the last token.
Queue time is what the frontend can see: arrival until an instance accepted the request.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
# a migration's downtime is milliseconds (the request is out of every batch); its whole run is longer
DOWNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MIGRATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def migration_kind(reason: str, handoff: bool) -> str:
    """A bounded label for why a migration ran (the reason itself is free text with instance ids)."""
    if handoff:
        return "pd_handoff"
    for prefix, kind in (("operator request", "operator"), ("drain ", "drain"), ("defrag", "defrag"),
                         ("the head of", "queue_delay"), ("queued prompt", "pd_return")):
        if reason.startswith(prefix):
            return kind
    return "rebalance"


@dataclass
class Buckets:
    """A histogram as plain counts (what crosses from the scheduler to the frontends)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)     # per bucket, not cumulative; the last is +Inf
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, count in zip((*(repr(float(b)) for b in self.bounds), "+Inf"), self.counts):
            acc += count
            out.append((bound, acc))
        return out


@dataclass
class ControlMetrics:
    """What the scheduler counts, pushed to the frontends with every instance table (ControlState.metrics)."""

    migrations: dict[tuple[str, str], int] = field(default_factory=dict)     # (kind, outcome) -> count
    downtime: Buckets = field(default_factory=lambda: Buckets(DOWNTIME_BUCKETS))
    duration: Buckets = field(default_factory=lambda: Buckets(MIGRATION_BUCKETS))
    steps: dict[str, Buckets] = field(default_factory=dict)                  # reconcile step -> its times

    def migration_ended(self, kind: str, record) -> None:
        """A migration's final record (migration.protocol.MigrationRecord)."""
        outcome = record.state.value
        self.migrations[(kind, outcome)] = self.migrations.get((kind, outcome), 0) + 1
        if outcome == "committed":
            self.downtime.observe(record.downtime_ms / 1000)
        if record.started_at and record.ended_at >= record.started_at:
            self.duration.observe(record.ended_at - record.started_at)

    def step_took(self, step: str, seconds: float) -> None:
        if step not in self.steps:
            self.steps[step] = Buckets(STEP_BUCKETS)
        self.steps[step].observe(seconds)


class FrontendMetrics:
    """The frontend's registry: its own counters and histograms, and a collector over the latest instance
    table and control metrics (`views()` and `control()` are read at scrape time)."""

    def __init__(self, views, control, frontend_streams):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()          # the *_created series only add noise to every scrape

        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tidal_requests", "Requests that ended, by outcome (stop, length, abort, or the "
                                "error status in lower case)", ["outcome"], registry=r)
        self.prompt_tokens = Counter("tidal_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("tidal_generation_tokens", "Tokens generated and streamed to clients",
                                         registry=r)
        self.ttft = Histogram("tidal_time_to_first_token_seconds", "Arrival at the frontend to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tidal_inter_token_latency_seconds", "Time between consecutive token chunks of a "
                             "stream", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("tidal_e2e_request_latency_seconds", "Arrival at the frontend to the last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("tidal_request_queue_time_seconds", "Arrival at the frontend until an instance "
                               "accepted the request", buckets=E2E_BUCKETS, registry=r)
        self.failovers = Counter("tidal_failovers", "Streams whose instance died, by outcome (resumed, "
                                 "no_instance, retries_spent, failed)", ["outcome"], registry=r)
        self.admin = Counter("tidal_admin_operations", "Admin commands forwarded to the scheduler, by op and "
                             "outcome (ok, or the error status in lower case)", ["op", "outcome"], registry=r)
        Gauge("tidal_frontend_streams", "Requests this frontend is streaming now", registry=r).set_function(
            frontend_streams)
        r.register(_ControlCollector(views, control))

    def request_timer(self) -> "RequestTimer":
        return RequestTimer(self)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ControlCollector:
    """Per-instance gauges from the instance table, and the scheduler's counts, as of the last push."""

    def __init__(self, views, control):
        self.views, self.control = views, control

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        labels = ["instance", "role", "node"]
        running = GaugeMetricFamily("tidal_instance_requests_running", "Requests in an instance's batch", labels=labels)
        waiting = GaugeMetricFamily("tidal_instance_requests_waiting", "Requests queued on an instance",
                                    labels=labels)
        kv = GaugeMetricFamily("tidal_instance_kv_cache_usage", "Share of an instance's KV blocks used or reserved "
                               "(0-1)", labels=labels)
        preempt = CounterMetricFamily("tidal_instance_preemptions", "Preemptions on an instance since it started",
                                      labels=labels)
        tps = GaugeMetricFamily("tidal_instance_tokens_per_second", "Tokens an instance computed per second of "
                                "step time, recently", labels=labels)
        up = GaugeMetricFamily("tidal_instance_up", "1 for each instance in the table, by state",
                               labels=[*labels, "state"])
        cached = GaugeMetricFamily("tidal_instance_prefix_cached_blocks", "Free KV blocks of an instance that still "
                                   "hold a cached prefix (evictable)", labels=labels)
        hits = CounterMetricFamily("tidal_instance_prefix_cache_hit_tokens", "Prompt tokens an instance found in its "
                                   "prefix cache, since it started", labels=labels)
        queries = CounterMetricFamily("tidal_instance_prefix_cache_query_tokens", "Prompt tokens an instance "
                                      "admitted with prefix caching on, since it started", labels=labels)
        total_running = total_waiting = 0
        for v in self.views():
            node = v.info.node_id[:12] if v.info is not None else ""
            key = [v.instance_id, v.role, node]
            up.add_metric([*key, v.state], 1)
            if v.status is None:
                continue
            load = v.status.load
            running.add_metric(key, load.num_running)
            waiting.add_metric(key, load.num_waiting)
            kv.add_metric(key, 1 - load.free_blocks / load.total_blocks if load.total_blocks else 0.0)
            preempt.add_metric(key, load.num_preemptions_total)
            tps.add_metric(key, load.tokens_per_s)
            cached.add_metric(key, load.cached_blocks)
            hits.add_metric(key, load.prefix_hit_tokens)
            queries.add_metric(key, load.prefix_query_tokens)
            if v.state != "dead":
                total_running += load.num_running
                total_waiting += load.num_waiting
        yield from (running, waiting, kv, preempt, tps, up, cached, hits, queries)
        yield GaugeMetricFamily("tidal_requests_running", "Requests running on all instances", value=total_running)
        yield GaugeMetricFamily("tidal_requests_waiting", "Requests waiting on all instances", value=total_waiting)

        m = self.control()
        if m is None:
            m = ControlMetrics()
        migrations = CounterMetricFamily("tidal_migrations", "Migrations the scheduler ran, by kind of reason and "
                                         "outcome (committed, aborted_src, aborted_dst, ended)",
                                         labels=["reason", "outcome"])
        for (kind, outcome), n in sorted(m.migrations.items()):
            migrations.add_metric([kind, outcome], n)
        yield migrations
        for name, doc, b in (("tidal_migration_downtime_seconds", "Time a committed migration held its request "
                              "out of every batch", m.downtime),
                             ("tidal_migration_duration_seconds", "A migration from start to its end", m.duration)):
            yield HistogramMetricFamily(name, doc, buckets=b.cumulative(), sum_value=b.total)
        steps = HistogramMetricFamily("tidal_reconcile_step_seconds", "Time of each step of the scheduler's "
                                      "reconcile loop", labels=["step"])
        for step, b in sorted(m.steps.items()):
            steps.add_metric([step], b.cumulative(), b.total)
        yield steps


class RequestTimer:
    """One request's timings, recorded into FrontendMetrics as its chunks pass (vLLM's meanings)."""

    __slots__ = ("m", "arrived", "last", "first_seen", "prompt_tokens")

    def __init__(self, m: "FrontendMetrics"):
        self.m = m
        self.arrived = self.last = time.monotonic()
        self.first_seen = False
        self.prompt_tokens = 0

    def accepted(self) -> None:
        self.m.queue.observe(time.monotonic() - self.arrived)

    def chunk(self, chunk) -> None:
        now = time.monotonic()
        if chunk.token_ids:
            if not self.first_seen:
                self.first_seen = True
                self.m.ttft.observe(now - self.arrived)
            else:
                self.m.itl.observe(now - self.last)
            self.last = now
            self.m.generation_tokens.inc(len(chunk.token_ids))
        if chunk.finish_reason is not None:
            self.prompt_tokens = chunk.prompt_tokens

    def ended(self, outcome: str) -> None:
        self.m.requests.labels(outcome).inc()
        if self.prompt_tokens:
            self.m.prompt_tokens.inc(self.prompt_tokens)
        if outcome in ("stop", "length"):
            self.m.e2e.observe(time.monotonic() - self.arrived)
