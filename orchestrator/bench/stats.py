"""What a client saw, per request and in summary: pure functions of per-request records.

Definitions (times in seconds on one monotonic clock; the tables and files show milliseconds):

- TTFT: first token's arrival − send time.
- end-to-end (e2e): arrival of the stream's last message − send time.
- TPOT (time per output token): (e2e − TTFT) / (tokens − 1), per request with at least 2 tokens.
- ITL (inter-token latency): the gap between two consecutive messages that carry tokens; a message with several
  tokens counts once (its tokens arrived together). Pooled over requests.
- send lag: send time − scheduled time (how late the generator was).
- Percentiles interpolate linearly between the two nearest ranks (numpy's default method).
- Latencies are taken over the requests that finished OK; failed ones are counted by gRPC status code.
- Goodput: OK requests that met the SLO (TTFT ≤ its bound and TPOT ≤ its bound; a 1-token request has no
  TPOT and meets that half), per second of the run. The run lasts from the first send to the last message.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field

OK = "OK"
CANCELLED = "CANCELLED"     # the generator stopped the stream itself (Ctrl-C)


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds since the run started."""

    index: int
    scheduled_s: float
    prompt_tokens: int
    max_tokens: int
    priority: int = 0
    request_id: str = ""
    sent_s: float = math.nan
    chunk_times_s: list[float] = field(default_factory=list)    # arrival of each message that carried tokens
    chunk_tokens: list[int] = field(default_factory=list)       # tokens in each of those messages
    end_s: float = math.nan                                     # arrival of the last message of any kind
    status: str = OK                                            # OK, or the gRPC status code's name
    error: str = ""                                             # the server's message with a failed status
    finish_reason: str = ""
    instances: list[str] = field(default_factory=list)          # that sent its tokens, in order (a move adds one)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def tokens(self) -> int:
        return sum(self.chunk_tokens)


@dataclass(frozen=True)
class Slo:
    """Service-level objective of one request; None leaves that half out."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def describe(self) -> str:
        parts = [f"TTFT <= {self.ttft_ms:g} ms" if self.ttft_ms is not None else "",
                 f"TPOT <= {self.tpot_ms:g} ms" if self.tpot_ms is not None else ""]
        return " and ".join(p for p in parts if p) or "none (every OK request counts)"


# ----- per request ------------------------------------------------------------------------------------------------

def ttft_s(r: RequestRecord) -> float | None:
    return r.chunk_times_s[0] - r.sent_s if r.chunk_times_s else None


def e2e_s(r: RequestRecord) -> float | None:
    return r.end_s - r.sent_s if not math.isnan(r.end_s) and not math.isnan(r.sent_s) else None


def tpot_s(r: RequestRecord) -> float | None:
    first, total = ttft_s(r), e2e_s(r)
    if first is None or total is None or r.tokens < 2:
        return None
    return (total - first) / (r.tokens - 1)


def itls_s(r: RequestRecord) -> list[float]:
    return [b - a for a, b in zip(r.chunk_times_s, r.chunk_times_s[1:])]


def send_lag_s(r: RequestRecord) -> float | None:
    return None if math.isnan(r.sent_s) else r.sent_s - r.scheduled_s


def meets_slo(r: RequestRecord, slo: Slo) -> bool:
    if not r.ok:
        return False
    first, per_token = ttft_s(r), tpot_s(r)
    if slo.ttft_ms is not None and (first is None or first * 1000.0 > slo.ttft_ms):
        return False
    return slo.tpot_ms is None or per_token is None or per_token * 1000.0 <= slo.tpot_ms


# ----- distributions ----------------------------------------------------------------------------------------------

def median(values) -> float:
    """The median of the values that are numbers (None and nan left out); nan if there are none."""
    numbers = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(numbers) if numbers else math.nan


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the nearest ranks, as numpy.percentile's default."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = q / 100.0 * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency, in milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of_seconds(cls, values: list[float]) -> Distribution | None:
        if not values:
            return None
        ms = [v * 1000.0 for v in values]
        return cls(len(ms), sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99), max(ms))


@dataclass(frozen=True)
class Summary:
    requests: int               # sent
    completed: int              # finished OK
    failed: dict[str, int]      # status code -> count (cancelled ones included under CANCELLED)
    duration_s: float           # first send -> last message
    output_tokens: int          # of OK requests
    request_throughput: float   # OK requests per second
    token_throughput: float     # output tokens of OK requests per second
    goodput: float              # OK requests meeting the SLO per second
    slo_attained: float         # of the requests that ended on their own (not cancelled), the share meeting the SLO
    slo: Slo
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    e2e: Distribution | None
    send_lag: Distribution | None


def run_duration_s(records: list[RequestRecord]) -> float:
    """From the first send to the last message received."""
    sent = [r.sent_s for r in records if not math.isnan(r.sent_s)]
    ends = [r.end_s for r in records if not math.isnan(r.end_s)]
    return max(ends) - min(sent) if sent and ends else 0.0


def summarize(records: list[RequestRecord], slo: Slo, duration_s: float | None = None) -> Summary:
    """The summary of the requests that were sent (records never sent are ignored). Rates are per second of
    `duration_s`, by default the run's duration (`run_duration_s`)."""
    sent = [r for r in records if not math.isnan(r.sent_s)]
    done = [r for r in sent if r.ok]
    ended = [r for r in sent if r.status != CANCELLED]
    duration = run_duration_s(sent) if duration_s is None else duration_s
    met = sum(meets_slo(r, slo) for r in done)
    tokens = sum(r.tokens for r in done)

    def rate(n: float) -> float:
        return n / duration if duration > 0 else 0.0

    def dist(fn) -> Distribution | None:
        return Distribution.of_seconds([v for v in map(fn, done) if v is not None])

    return Summary(
        requests=len(sent), completed=len(done), failed=dict(Counter(r.status for r in sent if not r.ok)),
        duration_s=duration, output_tokens=tokens, request_throughput=rate(len(done)), token_throughput=rate(tokens),
        goodput=rate(met), slo_attained=met / len(ended) if ended else 0.0, slo=slo,
        ttft=dist(ttft_s), tpot=dist(tpot_s), e2e=dist(e2e_s),
        itl=Distribution.of_seconds([g for r in done for g in itls_s(r)]),
        send_lag=Distribution.of_seconds([send_lag_s(r) for r in sent]))


def summarize_by_priority(records: list[RequestRecord], slo: Slo) -> dict[int, Summary]:
    """One summary per priority value, highest first; rates are per second of the whole run."""
    duration = run_duration_s(records)
    classes = sorted({r.priority for r in records if not math.isnan(r.sent_s)}, reverse=True)
    return {p: summarize([r for r in records if r.priority == p], slo, duration) for p in classes}
