"""Real request traces, as (arrival, prompt length, output length) rows, for replaying against an engine.

The data lives outside the repository, in `../shared/data/` next to the checkout (override with the
environment variable TIDAL_TRACE_DIR); it is never copied in. Each folder's SOURCE.md records where the
files came from, their checksums and licences:

- `azure-conv`: azure_llm_2023/AzureLLMInferenceTrace_conv.csv, GitHub Azure/AzurePublicDataset at
  b469a113, the conversation trace of Splitwise (Patel et al., ISCA 2024), CC-BY 4.0. 19,366 requests over
  ~1 hour; columns TIMESTAMP, ContextTokens, GeneratedTokens.
- `burstgpt`: burstgpt/BurstGPT_1_first400.csv, the first 400 rows of BurstGPT_1.csv from HPMLL/BurstGPT
  (Wang et al., KDD '25), CC-BY 4.0. Columns Timestamp (s), Request tokens, Response tokens; rows with 0
  response tokens are failed requests and are skipped. 400 rows: good for formats, not for statistics.
- `mooncake`: mooncake/conversation_trace.jsonl, kvcache-ai/Mooncake at 3b5a5941, FAST25-release
  (Mooncake, FAST '25), Apache-2.0. 12,031 requests; fields timestamp (ms), input_length, output_length and
  hash_ids (one id per 512-token block of the prompt; equal leading ids = a shared prefix), kept as
  `TraceRequest.hash_ids` so that replays can rebuild the sharing (`hash_block_prompt`).

A path to a file works too: a CSV with the Azure columns (TIMESTAMP as a date-time or as seconds) or the
BurstGPT columns, or JSON lines like Mooncake's.

Lengths of real traces (Azure prompts average 1,155 tokens, Mooncake's 12,035) exceed what a small model
serves on a CPU; `scale_lengths` shrinks them while keeping the distribution's shape, and
`synthetic_prompt` makes token ids of a given length to stand in for the (unpublished) prompt text.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator

from orchestrator.config import TRACE_DIR_ENV, trace_dir_override

DEFAULT_TRACE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
_EPOCH = datetime(1970, 1, 1)


MOONCAKE_BLOCK_TOKENS = 512     # tokens per hash id in the Mooncake traces (FAST25-release/README.md)


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float      # seconds after the first row of the loaded trace
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()    # the prompt's blocks, where the trace has them (Mooncake)
    block_tokens: float = MOONCAKE_BLOCK_TOKENS   # tokens per hash id (scaled with the lengths)


def trace_dir() -> Path:
    """Where the named traces live: $TIDAL_TRACE_DIR, or ../shared/data beside the repository."""
    value = trace_dir_override()
    return Path(value).expanduser() if value else DEFAULT_TRACE_DIR


# ----- parsers: each yields (absolute arrival in seconds, prompt tokens, output tokens) -------------------------

def _parse_time(value: str) -> float:
    """Seconds, from either a number or an Azure date-time ('2023-11-16 18:15:46.6805900')."""
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    whole, _, fraction = value.partition(".")
    stamp = (datetime.fromisoformat(whole) - _EPOCH).total_seconds()   # naive: no time zone, no DST jumps
    return stamp + (float("0." + fraction) if fraction else 0.0)


_CSV_SCHEMAS = {
    # name: (arrival column, prompt column, output column)
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
}


def _read_csv(path: Path) -> Iterator[tuple]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = set(reader.fieldnames or ())
        for columns in _CSV_SCHEMAS.values():
            if set(columns) <= header:
                break
        else:
            wanted = " or ".join(", ".join(c) for c in _CSV_SCHEMAS.values())
            raise ValueError(f"trace {path}: the CSV header {sorted(header)} lacks the columns {wanted}")
        at, prompt, output = columns
        for line, row in enumerate(reader, start=2):
            try:
                yield _parse_time(row[at]), int(row[prompt]), int(row[output])
            except (TypeError, ValueError) as error:
                raise ValueError(f"trace {path}, line {line}: cannot read {row}: {error}") from None


def _read_jsonl(path: Path) -> Iterator[tuple]:
    with path.open() as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                yield (row["timestamp"] / 1000.0, int(row["input_length"]), int(row["output_length"]),
                       tuple(int(h) for h in row.get("hash_ids", ())))
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"trace {path}, line {line}: expected timestamp (ms), input_length and "
                                 f"output_length: {error}") from None


_Reader = Callable[[Path], Iterable[tuple]]   # (arrival s, prompt, output[, hash ids])
NAMED_TRACES: dict[str, tuple[str, _Reader]] = {
    "azure-conv": ("azure_llm_2023/AzureLLMInferenceTrace_conv.csv", _read_csv),
    "burstgpt": ("burstgpt/BurstGPT_1_first400.csv", _read_csv),
    "mooncake": ("mooncake/conversation_trace.jsonl", _read_jsonl),
}


def _resolve(name_or_path: str | os.PathLike) -> tuple[Path, _Reader]:
    name = str(name_or_path)
    if name in NAMED_TRACES:
        relative, reader = NAMED_TRACES[name]
        root = trace_dir()
        if not root.is_dir():
            raise FileNotFoundError(
                f"trace {name!r}: the trace directory {root} does not exist; point {TRACE_DIR_ENV} at the folder "
                f"that holds {', '.join(sorted({r.split('/')[0] for r, _ in NAMED_TRACES.values()}))}")
        path = root / relative
        if not path.is_file():
            raise FileNotFoundError(f"trace {name!r}: {path} is missing; restore it (see {path.parent}/SOURCE.md) "
                                    f"or point {TRACE_DIR_ENV} elsewhere")
        return path, reader
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix in (".jsonl", ".json"):
            return path, _read_jsonl
        if path.suffix == ".csv":
            return path, _read_csv
        raise ValueError(f"trace {name!r}: give a .csv or .jsonl file")
    raise ValueError(f"trace {name!r} is neither a known trace ({', '.join(NAMED_TRACES)}) nor an existing "
                     f".csv / .jsonl file")


def load_trace(name_or_path: str | os.PathLike, limit: int | None = None) -> list[TraceRequest]:
    """The trace's requests in arrival order, arrivals in seconds after the first returned row.

    Rows with 0 prompt or 0 output tokens (failed requests, as in BurstGPT) are skipped; `limit` keeps the
    first `limit` of the remaining rows.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit}")
    path, reader = _resolve(name_or_path)
    rows = [r for r in reader(path) if r[1] > 0 and r[2] > 0]
    rows.sort(key=lambda r: r[0])           # stable: rows that arrive together keep the file's order
    rows = rows[:limit]
    if not rows:
        raise ValueError(f"trace {name_or_path!r} ({path}) has no requests with positive lengths")
    start = rows[0][0]
    return [TraceRequest(r[0] - start, r[1], r[2], *r[3:]) for r in rows]


# ----- fitting a trace to a small model ---------------------------------------------------------------------------

def _quantile(values: list[int], q: float) -> float:
    """Nearest rank, not `orchestrator.bench.stats.percentile`'s interpolation: the quantile is a length some
    request really has, so after scaling that request fits its bound exactly."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def length_scale(rows: list[TraceRequest], max_prompt: int, max_output: int, quantile: float = 0.99) -> float:
    """The factor `scale_lengths` divides by: the smallest one (at least 1) that brings the `quantile` of
    prompt lengths under `max_prompt` and that of output lengths under `max_output`."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    return max(1.0,
               _quantile([r.prompt_tokens for r in rows], quantile) / max_prompt,
               _quantile([r.output_tokens for r in rows], quantile) / max_output)


def scale_lengths(rows: list[TraceRequest], max_prompt: int, max_output: int,
                  quantile: float = 0.99, factor: float | None = None) -> list[TraceRequest]:
    """Shrink lengths to fit a small model while keeping the distribution's shape.

    Every prompt and output length is divided by ONE factor f and rounded, then clamped to [1, max]. f is
    `length_scale(rows, ...)` unless given: the smallest f >= 1 such that the `quantile` (default p99) of
    prompt lengths fits `max_prompt` and that of output lengths fits `max_output`. One factor for both keeps
    each marginal distribution's shape (its coefficient of variation, skew, ratios between requests) and each
    request's prompt:output ratio, so the prefill / decode balance of the trace is kept; only the tail above
    the quantile is clamped. Arrivals are unchanged. Lengths already within bounds (f = 1) are kept as is.
    """
    if max_prompt < 1 or max_output < 1:
        raise ValueError(f"max_prompt and max_output must be at least 1, got {max_prompt} and {max_output}")
    if not rows:
        return []
    f = factor if factor is not None else length_scale(rows, max_prompt, max_output, quantile)
    if f <= 0:
        raise ValueError(f"factor must be positive, got {f}")

    def fit(n: int, top: int) -> int:
        return min(top, max(1, round(n / f)))

    return [TraceRequest(r.arrival_s, fit(r.prompt_tokens, max_prompt), fit(r.output_tokens, max_output),
                         r.hash_ids, r.block_tokens / f) for r in rows]


def sample_rows(rows: list[TraceRequest], n: int, seed: int) -> list[TraceRequest]:
    """n rows drawn without replacement with a fixed seed, returned in arrival order."""
    if not 1 <= n <= len(rows):
        raise ValueError(f"cannot draw {n} rows from a trace of {len(rows)}")
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


# ----- prefix structure -------------------------------------------------------------------------------------------

def hash_block_prompt(hash_ids: tuple[int, ...], n_tokens: int, block_tokens: float,
                      block: Callable[[int, int], list[int]], own: Callable[[int], list[int]]) -> list[int]:
    """A prompt of exactly `n_tokens` token ids whose i-th trace block is `block(hash_ids[i], length)`, so that
    equal leading hash ids give equal leading tokens, as the trace means them to. Block i spans tokens
    round(i x block_tokens) .. round((i+1) x block_tokens) (`block_tokens`: 512 in Mooncake, divided by the
    length scale), a length that depends on i alone; the last block is cut at `n_tokens`, and a prompt longer
    than its blocks ends with `own(k)`, k tokens of its own."""
    if block_tokens <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    ids: list[int] = []
    for i, h in enumerate(hash_ids):
        if len(ids) >= n_tokens:
            break
        length = round((i + 1) * block_tokens) - round(i * block_tokens)
        ids += block(h, length)
    if len(ids) < n_tokens:
        ids += own(n_tokens - len(ids))
    return ids[:n_tokens]


def shared_block_fraction(rows: list[TraceRequest]) -> float:
    """The share of all hash-block references that repeat an earlier one: the block hit rate an infinite prefix
    cache could reach on these rows (Mooncake's SOURCE.md: 36.6 % over the conversation trace)."""
    seen: set[int] = set()
    total = repeated = 0
    for r in rows:
        for h in r.hash_ids:
            total += 1
            repeated += h in seen
            seen.add(h)
    return repeated / total if total else 0.0


# ----- prompt text ------------------------------------------------------------------------------------------------

_PASSAGE = (
    "The river rose slowly through the night, and by morning the lower fields were under water.",
    "Farmers moved their animals to the hill behind the church, where the ground stayed dry.",
    "A teacher from the village school wrote down the height of the water every hour.",
    "Her notes later helped engineers decide where to build a new wall along the bank.",
    "In the city, the morning trains ran late because a bridge had been closed for inspection.",
    "Most people waited patiently, reading newspapers or talking about the weather.",
    "The station master explained that safety came first and that the delay would be short.",
    "By noon the sun had come out, and children were already playing beside the puddles.",
    "Scientists say that floods of this kind will become more common as the climate changes.",
    "They recommend planting trees on the hills, which hold water in the soil like a sponge.",
    "The town council has promised to discuss the plan at its next meeting in the spring.",
    "Meanwhile, volunteers are cleaning the library, whose old books were damaged by the water.",
)


def synthetic_prompt(tokenizer, n_tokens: int, seed: int) -> list[int]:
    """Exactly `n_tokens` token ids of English prose, the sentences shuffled by `seed`.

    Real traces publish lengths, not text; this stands in for a prompt of the traced length. The text is a
    passage of plain sentences, repeated as often as needed with each copy shuffled by the seed, then encoded
    and cut. A tokenizer that adds BOS keeps it in front, as a real prompt would have it.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}")
    rng = random.Random(seed)
    sentences: list[str] = []
    ids: list[int] = []
    while len(ids) < n_tokens:
        # double the text each round (one shuffled copy at first), so long prompts take few encodes
        for _ in range(max(1, len(sentences) // len(_PASSAGE))):
            sentences += rng.sample(_PASSAGE, len(_PASSAGE))
        ids = tokenizer.encode(" ".join(sentences))
    return ids[:n_tokens]
