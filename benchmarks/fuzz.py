"""A longer fuzz campaign over the frontend's request parsing and validation (the strategy of
tests/unit/test_fuzz_requests.py, many more examples).

    python -m benchmarks.fuzz [--examples 20000] [--seed 0]

Prints the inputs tried, how many were accepted and refused (by field), crashes (anything but a refusal naming
the field, or an acceptance), and the slowest parse. Last line: tried=<n> crashes=<n> slowest_parse_ms=<ms>
Goal (issue 19): crashes = 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from hypothesis import HealthCheck, given, seed, settings

from tests.unit.test_fuzz_requests import FIELDS, VOCAB, outcome, requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import tests.unit.test_fuzz_requests as suite

    frontend = suite.frontend.__wrapped__()            # the fixture's body: a frontend over one quiet instance
    tried, refused, crashes, slowest = [0], Counter(), [], [0.0, None]

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(req=requests())
    def campaign(req):
        tried[0] += 1
        started = time.perf_counter()
        try:
            kind, message = outcome(frontend, req)
            if kind == "refused":
                field = message.split(":")[0].strip()
                if field not in FIELDS:
                    crashes.append(f"refused naming no field: {message[:120]}")
                refused[field] += 1
        except Exception as e:  # noqa: BLE001 - a crash is what we count
            crashes.append(f"{type(e).__name__}: {e}"[:200])
        took = time.perf_counter() - started
        if took > slowest[0]:
            slowest[:] = [took, req]

    started = time.monotonic()
    campaign()
    print(f"{tried[0]} requests in {time.monotonic() - started:.0f} s (vocabulary {VOCAB}); "
          f"accepted {tried[0] - sum(refused.values()) - len(crashes)}, refused {sum(refused.values())}:")
    for field, n in refused.most_common():
        print(f"  {n:>6} x {field}")
    for c in crashes[:10]:
        print(f"  crash: {c}")
    print(f"slowest parse {1000 * slowest[0]:.1f} ms")
    print(f"tried={tried[0]} crashes={len(crashes)} slowest_parse_ms={1000 * slowest[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
