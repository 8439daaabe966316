"""A replay's results for people (a table that ends with the goodput) and for programs (JSON or CSV)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

from orchestrator.bench.stats import (Distribution, RequestRecord, Summary, e2e_s, itls_s, send_lag_s,
                                      summarize, summarize_by_priority, tpot_s, ttft_s, Slo)

CSV_COLUMNS = ("index", "request_id", "priority", "prompt_tokens", "max_tokens", "scheduled_s", "sent_s",
               "send_lag_ms", "ttft_ms", "tpot_ms", "e2e_ms", "itl_mean_ms", "itl_max_ms", "output_tokens", "status",
               "finish_reason", "error", "instances")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def request_row(r: RequestRecord) -> dict:
    """One request, flat, as the CSV and JSON files hold it (None where a value does not apply)."""
    gaps = itls_s(r)
    return {
        "index": r.index, "request_id": r.request_id, "priority": r.priority, "prompt_tokens": r.prompt_tokens,
        "max_tokens": r.max_tokens, "scheduled_s": round(r.scheduled_s, 6),
        "sent_s": None if math.isnan(r.sent_s) else round(r.sent_s, 6), "send_lag_ms": _ms(send_lag_s(r)),
        "ttft_ms": _ms(ttft_s(r)), "tpot_ms": _ms(tpot_s(r)), "e2e_ms": _ms(e2e_s(r)),
        "itl_mean_ms": _ms(sum(gaps) / len(gaps)) if gaps else None, "itl_max_ms": _ms(max(gaps)) if gaps else None,
        "output_tokens": r.tokens, "status": r.status, "finish_reason": r.finish_reason, "error": r.error,
        "instances": " > ".join(r.instances),
    }


def summary_dict(s: Summary) -> dict:
    d = dataclasses.asdict(s)
    d["slo"] = {"ttft_ms": s.slo.ttft_ms, "tpot_ms": s.slo.tpot_ms, "text": s.slo.describe()}
    for key in ("ttft", "tpot", "itl", "e2e", "send_lag"):
        d[f"{key}_ms"] = d.pop(key)
    return d


def write_results(path: str | Path, records: list[RequestRecord], slo: Slo, run: dict) -> None:
    """JSON (run settings, summary, per-priority summaries, every request with its token arrival times) or CSV
    (one row per request), by the file's suffix."""
    path = Path(path)
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(request_row(r) for r in records)
        return
    doc = {
        "run": run,
        "summary": summary_dict(summarize(records, slo)),
        "by_priority": {str(p): summary_dict(s) for p, s in summarize_by_priority(records, slo).items()},
        "requests": [{**request_row(r), "chunk_times_s": [round(t, 6) for t in r.chunk_times_s],
                      "chunk_tokens": r.chunk_tokens} for r in records],
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")


def format_table(rows: list[tuple[str, ...]], right_align: bool = True) -> str:
    """Rows of cells as aligned columns, two spaces apart: the first column left-aligned, the others
    right-aligned (numbers) unless `right_align` is False. The one table printer of `tidal` and its reports."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i and right_align else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


def _cells(d: Distribution | None) -> tuple[str, ...]:
    if d is None:
        return ("0",) + ("-",) * 5
    return (str(d.count), *(f"{v:.1f}" for v in (d.mean, d.p50, d.p90, d.p99, d.max)))


def format_report(records: list[RequestRecord], slo: Slo, title: str, failures_shown: int = 3) -> str:
    """The printed report; its last line is the goodput."""
    s = summarize(records, slo)
    lines = [f"{title}: {s.requests} requests sent, {s.completed} OK, {s.requests - s.completed} not OK, "
             f"over {s.duration_s:.1f} s", ""]
    rows = [("LATENCY (ms)", "COUNT", "MEAN", "P50", "P90", "P99", "MAX")]
    for name, d in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E", s.e2e), ("send lag", s.send_lag)):
        rows.append((name, *_cells(d)))
    lines.append(format_table(rows))

    classes = summarize_by_priority(records, slo)
    if len(classes) > 1:
        rows = [("PRIORITY", "SENT", "OK", "TTFT P50", "TTFT P99", "TPOT P50", "TPOT P99", "E2E P99", "GOODPUT/S")]
        for p, c in classes.items():
            pick = [(d.p50, d.p99) if d else (math.nan, math.nan) for d in (c.ttft, c.tpot)]
            rows.append((str(p), str(c.requests), str(c.completed), *(f"{v:.1f}" for pair in pick for v in pair),
                         f"{c.e2e.p99:.1f}" if c.e2e else "-", f"{c.goodput:.2f}"))
        lines += ["", format_table(rows)]

    if s.failed:
        lines += ["", "not OK: " + ", ".join(f"{code} {n}" for code, n in sorted(s.failed.items()))]
        for code in sorted(s.failed):
            examples = [r for r in records if r.status == code and r.error][:failures_shown]
            for r in examples:
                lines.append(f"  {code} (request {r.index}): {r.error}")
    lines += ["", f"throughput: {s.request_throughput:.2f} requests/s, {s.token_throughput:.1f} output tokens/s",
              f"SLO: {slo.describe()}",
              f"goodput: {s.goodput:.2f} requests/s ({100.0 * s.slo_attained:.1f}% of requests met the SLO)"]
    return "\n".join(lines)
