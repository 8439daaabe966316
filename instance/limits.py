"""Tidal's fixed limits, and the bounds of what each process remembers, in one place.

Settings an operator tunes live in the config models (`instance/config.py`, `orchestrator/config.py`); these
are the numbers behind them that nobody should need to change. Each bounds a wait or a memory, so that no
process waits forever and no map grows without end.
"""

# ----- requests ---------------------------------------------------------------------------------------------
MAX_MODEL_LEN_CAP = 8192            # default max_model_len: the model's context, at most this many tokens
DEFAULT_MAX_TOKENS = 256            # a request without max_tokens generates at most this (or what still fits)
MAX_REQUEST_ID_CHARS = 128          # a client's request_id: at most this many of [A-Za-z0-9._:@/-] (it is echoed
                                    # in every chunk and log line)

# ----- what a process remembers -----------------------------------------------------------------------------
RECENT_MIGRATIONS_PER_INSTANCE = 64     # finished migration records an instance keeps for `tidal status`
RECENT_MIGRATIONS_PER_SCHEDULER = 200   # ... and the scheduler
COMMITTED_MIGRATION_MEMORY_S = 300.0    # a destination remembers a committed migration id (abort-after-commit)
ORPHANS_REMEMBERED = 4096               # request ids a frontend already aborted as orphans
MOVED_REQUEST_MEMORY_S = 30.0           # a committed move is left out of planning until its source reports

# ----- waits ------------------------------------------------------------------------------------------------
BETWEEN_STEPS_TIMEOUT_S = 60.0      # a command waits at most one (long) step plus the commands before it
REAP_INTERVAL_S = 1.0               # an instance looks for stale migrations and dead frontends this often
SINK_PING_TIMEOUT_S = 5.0           # a frontend that does not answer a ping this fast is asked again later
SCHEDULER_SILENCE_S = 2.0           # no table pushed for this long: the scheduler may have restarted
FAILOVER_BOUND_S = 30.0             # a stream whose instance died is resumed elsewhere within this, or ends
STREAM_IDLE_MARGIN_S = 30.0         # a stream with no progress (no token, not listed by its instance) for
DEFAULT_PREFILL_TOKENS_PER_S = 200.0  # ... the margin + the longest prompt's prefill at this rate (or the
                                      # fastest rate observed) ends with UNAVAILABLE
DRAIN_RETRIES = 3                   # a drain tries to move one request at most this many times
