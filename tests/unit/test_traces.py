"""Trace loaders: the real traces in ../shared/data load as arrival-ordered rows and shrink to a small model."""

import pytest

from orchestrator.bench.traces import (NAMED_TRACES, TraceRequest, load_trace, scale_lengths, synthetic_prompt,
                               trace_dir)
from instance.tokenizer import ByteTokenizer

needs_data = pytest.mark.skipif(not trace_dir().is_dir(), reason=f"no trace data at {trace_dir()}")


@pytest.fixture(scope="module")
def traces() -> dict[str, list[TraceRequest]]:
    return {name: load_trace(name) for name in NAMED_TRACES}


@needs_data
@pytest.mark.parametrize("name", sorted(NAMED_TRACES))
def test_named_trace_loads_with_positive_lengths_in_arrival_order(traces, name):
    rows = traces[name]
    assert len(rows) > 100
    assert rows[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(rows, rows[1:]))
    assert all(r.prompt_tokens > 0 and r.output_tokens > 0 for r in rows)


@needs_data
def test_limit_keeps_the_first_rows_and_burstgpt_failures_are_skipped(traces):
    assert load_trace("burstgpt", limit=5) == traces["burstgpt"][:5]
    assert len(traces["burstgpt"]) == 400 - 17   # SOURCE.md: 17 rows have 0 response tokens


def test_a_jsonl_file_path_loads_like_mooncake(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 1500, "input_length": 10, "output_length": 3}\n'
                    '{"timestamp": 1000, "input_length": 7, "output_length": 0}\n'
                    '{"timestamp": 4000, "input_length": 20, "output_length": 5}\n')
    assert load_trace(path) == [TraceRequest(0.0, 10, 3), TraceRequest(2.5, 20, 5)]


def test_a_csv_file_path_with_azure_columns_loads(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 23:59:59.5000000,374,44\n"
                    "2023-11-17 00:00:01.2500000,396,109\n")
    assert load_trace(path) == [TraceRequest(0.0, 374, 44), TraceRequest(1.75, 396, 109)]


def test_scale_lengths_respects_bounds_and_keeps_order_of_lengths():
    rows = [TraceRequest(float(i), p, o) for i, (p, o) in enumerate(
        [(1, 1), (300, 40), (1200, 200), (4000, 600), (9000, 3000), (50, 2)])]
    scaled = scale_lengths(rows, max_prompt=512, max_output=128)
    assert all(1 <= r.prompt_tokens <= 512 and 1 <= r.output_tokens <= 128 for r in scaled)
    assert [r.arrival_s for r in scaled] == [r.arrival_s for r in rows]
    by_length = sorted(range(len(rows)), key=lambda i: rows[i].prompt_tokens)
    shrunk = [scaled[i].prompt_tokens for i in by_length]
    assert shrunk == sorted(shrunk)                     # longer stays longer (ties only at the clamp)
    # one factor for both: prompt:output ratios survive (up to rounding) below the clamp
    assert scaled[2].prompt_tokens / scaled[2].output_tokens == pytest.approx(1200 / 200, rel=0.1)
    assert scale_lengths(rows[:3], max_prompt=2000, max_output=300) == rows[:3]   # already fits: unchanged


def test_unknown_name_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError) as error:
        load_trace("azure-code")
    for name in NAMED_TRACES:
        assert name in str(error.value)


def test_missing_data_dir_says_which_variable_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAL_TRACE_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="TIDAL_TRACE_DIR"):
        load_trace("mooncake")


def test_synthetic_prompt_has_exactly_n_tokens_and_depends_on_the_seed():
    tok = ByteTokenizer()
    for n in (1, 17, 700):
        assert len(synthetic_prompt(tok, n, seed=0)) == n
    assert synthetic_prompt(tok, 300, seed=1) == synthetic_prompt(tok, 300, seed=1)
    assert synthetic_prompt(tok, 300, seed=1) != synthetic_prompt(tok, 300, seed=2)
    assert tok.decode(synthetic_prompt(tok, 200, seed=0)).isprintable()
