"""`tidal bench`: load generators that drive a running deployment over gRPC and measure what clients see.

- `schedule`: when each request is sent and with what lengths (a trace's timestamps, or Poisson / gamma arrivals).
- `replay`: sends the schedule as real gRPC streams on one asyncio loop and records every token's arrival; its CLI.
- `stats`: per-request latencies (TTFT, TPOT, ITL, end-to-end), percentiles and goodput, pure functions of records.
- `report`: the printed table and the JSON / CSV files; `plot`: the PNG of latency CDFs.
"""
