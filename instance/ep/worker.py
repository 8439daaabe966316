"""What an expert worker holds and computes: routed experts of any layers, keyed (layer, expert).

Ray-free: `rpc.expert.ExpertWorkerClient` runs one as a Ray actor (one torch thread, a fraction of a CPU).
A worker starts empty (the warm pool keeps such workers ready) and is given experts with `accept`; it
computes `run(layer, {expert: rows})` with the same module and the same input rows as the leader would, so
its outputs are the leader's bit for bit. Weights travel as `ExpertWeights` (numpy) with a checksum of their
bytes, checked on arrival.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from instance.model.experts import SwiGLU

log = logging.getLogger(__name__)

Key = tuple[int, int]


def checksum(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's SwiGLU: gate_up [2F, H] (gate rows first) and down [H, F], with their checksum."""

    gate_up: np.ndarray
    down: np.ndarray
    checksum: str

    @classmethod
    def of(cls, module: SwiGLU, known_checksum: str | None = None) -> "ExpertWeights":
        """Views of the module's weights (serving never writes them; sending copies them), with their checksum
        (computed here unless the caller already holds it for these very tensors)."""
        gate_up = module.gate_up_proj.weight.detach().numpy()
        down = module.down_proj.weight.detach().numpy()
        return cls(gate_up, down, known_checksum or checksum(gate_up, down))

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


class ChecksumMismatch(ValueError):
    pass


class ExpertWorker:
    def __init__(self, name: str, num_threads: int = 1):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        torch.set_num_threads(num_threads)
        self.name = name
        self.experts: dict[Key, SwiGLU] = {}
        self.sums: dict[Key, str] = {}
        self.tokens = 0                 # rows computed since start
        with torch.inference_mode():    # torch's first ops are slow: pay for them before taking experts
            SwiGLU(8, 8)(torch.zeros(1, 8))

    def ping(self) -> int:
        return os.getpid()

    def accept(self, bundle: dict[Key, ExpertWeights]) -> dict[Key, str]:
        """Hold these experts (replacing any same key). Checks every checksum before keeping any; returns
        the checksums of what it now holds for those keys."""
        built = {}
        for key, w in bundle.items():
            got = checksum(w.gate_up, w.down)
            if got != w.checksum:
                raise ChecksumMismatch(f"expert worker {self.name}: expert {key} arrived with checksum {got}, "
                                       f"sent as {w.checksum}")
            hidden, ffn = w.down.shape
            with torch.device("meta"):          # no random init of weights about to be replaced
                m = SwiGLU(hidden, ffn)
            m.gate_up_proj.weight = torch.nn.Parameter(torch.from_numpy(np.array(w.gate_up)), requires_grad=False)
            m.down_proj.weight = torch.nn.Parameter(torch.from_numpy(np.array(w.down)), requires_grad=False)
            with torch.inference_mode():        # the first call of a module is slower: not in a served step
                m(torch.zeros(1, hidden, dtype=m.down_proj.weight.dtype))
            built[key] = (m, got)
        for key, (m, got) in built.items():
            self.experts[key], self.sums[key] = m, got
        log.info("expert worker %s: took %d experts, holds %d", self.name, len(built), len(self.experts))
        return {k: self.sums[k] for k in bundle}

    def export(self, keys: list[Key]) -> dict[Key, ExpertWeights]:
        """Copies of these experts' weights (for a new owner; this worker keeps serving them)."""
        missing = [k for k in keys if k not in self.experts]
        if missing:
            raise KeyError(f"expert worker {self.name} does not hold experts {missing[:4]}")
        return {k: ExpertWeights.of(self.experts[k], self.sums[k]) for k in keys}

    def drop(self, keys: list[Key]) -> int:
        for k in keys:
            self.experts.pop(k, None)
            self.sums.pop(k, None)
        return len(self.experts)

    def held(self) -> dict[Key, str]:
        return dict(self.sums)

    @torch.inference_mode()
    def run(self, layer: int, inputs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """expert -> its output for the rows given (the same rows, in the same order, the leader routed)."""
        out = {}
        for e, rows in inputs.items():
            m = self.experts.get((layer, e))
            if m is None:
                raise KeyError(f"expert worker {self.name} was sent rows for expert {e} of layer {layer}, "
                               f"which it does not hold")
            out[e] = m(torch.from_numpy(np.array(rows))).numpy()
            self.tokens += len(rows)
        return out
