"""Step times of the native engine on SmolLM2-135M, and the cost model the simulator fits to them.

    flock /tmp/tidal-bench.lock python -m benchmarks.step_costs [--reps 5] [--out orchestrator/sim/step_costs.json]

What one `engine.step()` costs depends on what it computes. Measured here, on one torch thread, CPU time of
the step (on one thread that is the wall time the step takes on an idle machine; this box is shared):
- decode steps: B in 1..64 requests each decoding one token at context C in 64..1024 (B x C <= 32k);
- prefill chunks: P in 32..512 prompt tokens after C in 0..1024 tokens already in the cache;
- mixed steps: B decodes at context C beside one prefill chunk of P tokens.
Requests with a context are put in place through the engine's migration entry (`reserve_blocks`,
`admit_migrated`) with zeroed KV blocks: a step's work does not depend on the values in the cache, so no
prefill has to run first. Each point is the median of `--reps` steps after two warm-up steps.

The model (orchestrator/sim/cost_model.py) is linear in the work of a step:
    t = c_step + c_token * tokens computed + c_sample * tokens sampled
        + c_decode_attn * decodes x padded context (decode attention gathers every request's blocks up to the
          longest context of the batch) + c_prefill_attn * sum over prefill chunks of chunk tokens x context end
fitted by least squares on relative error (coefficients kept non-negative by dropping a term that comes out
negative and refitting). The JSON file records the coefficients, the points, the fit's error, the machine, the
date and the command. The last line is the fit's median relative error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from instance.engine import Engine
from instance.request import RequestState
from instance.sampling import SamplingParams
from instance.kv_cache import blocks_for
from orchestrator.sim.cost_model import FEATURES, StepCostModel, StepWork, step_work

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "orchestrator" / "sim" / "step_costs.json"
DECODE_GRID = [(b, c) for b in (1, 4, 16, 32, 64) for c in (64, 256, 1024) if b * c <= 32768]
PREFILL_GRID = [(p, c) for p in (32, 128, 256, 512) for c in (0, 256, 1024)]
MIXED_GRID = [(8, 256, 128), (16, 256, 256), (32, 512, 64), (16, 1024, 512)]
BLOCK_SIZE = 16


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)


class Stepper:
    """Puts requests with a given context into an engine and times one step over them."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.n = 0

    def place(self, context: int, new_tokens: int) -> str:
        """A running request with `context` tokens of KV in the cache and `new_tokens` still to compute
        (1: it decodes; more: the rest of its prompt is a prefill chunk)."""
        self.n += 1
        rid = f"cost-{self.n}"
        if context == 0:
            self.engine.add_request(rid, prompt_token_ids=[1] * new_tokens, params=_params())
            return rid
        decoding = new_tokens == 1
        tokens = [1] * (context + new_tokens)
        prompt = len(tokens) - 1 if decoding else len(tokens)
        state = RequestState(request_id=rid, token_ids=tokens, num_prompt_tokens=prompt,
                             num_computed_tokens=context, params=_params(), seed=self.n,
                             sample_index=len(tokens) - prompt, priority=0, arrival_time=time.monotonic(),
                             text="", text_emitted=0, pending_bytes=b"")
        self.engine.reserve_import(rid, blocks_for(context, BLOCK_SIZE))
        self.engine.commit_import(rid, state)
        return rid

    def time_step(self, decodes: tuple[int, int] | None, prefill: tuple[int, int] | None
                  ) -> tuple[float, StepWork]:
        """CPU seconds of one step with `decodes` = (batch, context) and `prefill` = (tokens, context)."""
        ids = []
        if decodes:
            ids += [self.place(decodes[1], 1) for _ in range(decodes[0])]
        if prefill:
            ids.append(self.place(prefill[1], prefill[0]))
        sched = self.engine.core.schedule()
        work = step_work(sched.chunks)
        start = time.process_time()
        sampled = self.engine.runner.execute(sched)
        seconds = time.process_time() - start
        expected = (decodes[0] if decodes else 0) + (1 if prefill else 0)
        if len(sampled) != expected:
            raise RuntimeError(f"expected {expected} sampled tokens, got {len(sampled)}")
        for rid in ids:
            self.engine.abort(rid)
        self.engine.check_integrity()
        return seconds, work


def measure(reps: int) -> list[dict]:
    engine = Engine(model="smollm2-135m", max_model_len=2048, num_blocks=2200, block_size=BLOCK_SIZE,
                    max_num_batched_tokens=2048, max_num_seqs=128)
    stepper = Stepper(engine)
    points = []
    shapes = ([((b, c), None) for b, c in DECODE_GRID] + [(None, (p, c)) for p, c in PREFILL_GRID]
              + [((b, c), (p, c)) for b, c, p in MIXED_GRID])
    for i, (dec, pre) in enumerate(shapes):
        for _ in range(2):
            stepper.time_step(dec, pre)
        runs = [stepper.time_step(dec, pre) for _ in range(reps)]
        seconds = statistics.median(s for s, _ in runs)
        work = runs[0][1]
        points.append({"decode_batch": dec[0] if dec else 0, "decode_context": dec[1] if dec else 0,
                       "prefill_tokens": pre[0] if pre else 0, "prefill_context": pre[1] if pre else 0,
                       "work": work.as_dict(), "seconds": seconds})
        print(f"[{i + 1:2d}/{len(shapes)}] decodes {dec or '-'!s:>12}  prefill {pre or '-'!s:>12}  "
              f"{1000 * seconds:8.1f} ms", flush=True)
    return points


def fit(points: list[dict]) -> StepCostModel:
    """Least squares on relative error; a term that comes out negative is dropped and the rest refitted."""
    x = np.array([[p["work"][f] for f in FEATURES] for p in points], dtype=float)
    x = np.hstack([np.ones((len(points), 1)), x])
    y = np.array([p["seconds"] for p in points])
    keep = list(range(x.shape[1]))
    while True:
        w = x[:, keep] / y[:, None]
        coef, *_ = np.linalg.lstsq(w, np.ones(len(y)), rcond=None)
        if (coef >= 0).all():
            break
        keep.pop(int(np.argmin(coef)))
    full = np.zeros(x.shape[1])
    full[keep] = coef
    return StepCostModel(step_s=float(full[0]), **{f"{f}_s": float(c) for f, c in zip(FEATURES, full[1:])})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="timed steps per point (median), after 2 warm-up steps")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the fitted model is written (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    points = measure(args.reps)
    model = fit(points)
    errors = [abs(model.work_seconds(StepWork(**p["work"])) - p["seconds"]) / p["seconds"] for p in points]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    record = {
        "model": "smollm2-135m", "backend": "native", "device": "cpu", "torch_threads": 1,
        "block_size": BLOCK_SIZE,
        "coefficients": model.to_dict(),
        "fit": {"median_relative_error": statistics.median(errors), "max_relative_error": max(errors),
                "method": "least squares on relative error, non-negative by dropping terms"},
        "machine": {"cpu": cpu, "cores": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "flock /tmp/tidal-bench.lock .venv/bin/python -m benchmarks.step_costs "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "measure_seconds": round(time.time() - started, 1),
        "points": points,
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print("\n" + "  ".join(f"{k}={v:.3g}" for k, v in model.to_dict().items()))
    print(f"points {len(points)}, max relative error {max(errors):.1%}, written to {args.out}")
    print(f"median_relative_error={statistics.median(errors):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
