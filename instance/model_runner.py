"""Execute one scheduled step: build the flattened batch, run the model, sample.

The runner sees only what it must run: token ids, positions, block ids. It never decides anything.
"""

from __future__ import annotations

import torch

from instance.kv_cache import KVCacheTensors, blocks_for
from instance.model.llama import AttentionBatch, LlamaModel, PrefillChunk
from instance.sampling import SampleRow, sample
from instance.scheduler import ScheduledChunk, SchedulerOutput


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCacheTensors, device: str):
        self.model = model
        self.kv = kv
        self.block_size = kv.block_size
        self.device = torch.device(device)
        self._kv_layers = [kv.layer(i) for i in range(model.arch.num_layers)]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[int]:
        """Run the step; return one sampled token per chunk whose `samples` is true, in chunk order."""
        decodes = [c for c in sched.chunks if c.num_tokens == 1]
        prefills = [c for c in sched.chunks if c.num_tokens > 1]
        ordered = decodes + prefills
        input_ids, positions, slots = [], [], []
        for c in ordered:
            r, first = c.request, c.request.num_computed_tokens
            input_ids += r.token_ids[first:first + c.num_tokens]
            positions += range(first, first + c.num_tokens)
            slots += self._slots(r.block_ids, first, c.num_tokens)
        dev = self.device
        batch = AttentionBatch(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev))
        if decodes:
            self._add_decodes(batch, decodes)
        row = len(decodes)
        sample_rows: list[int] = []
        chunk_of_row: list[ScheduledChunk] = []
        for i, c in enumerate(decodes):
            if c.samples:
                sample_rows.append(i)
                chunk_of_row.append(c)
        for c in prefills:
            r = c.request
            ctx = r.num_computed_tokens + c.num_tokens
            table = torch.tensor(r.block_ids[:blocks_for(ctx, self.block_size)], dtype=torch.long, device=dev)
            batch.prefills.append(PrefillChunk(row, c.num_tokens, ctx, table))
            row += c.num_tokens
            if c.samples:
                sample_rows.append(row - 1)
                chunk_of_row.append(c)

        hidden = self.model(torch.tensor(input_ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev), self._kv_layers, batch)
        if not sample_rows:
            return []
        logits = self.model.logits(hidden[torch.tensor(sample_rows, device=dev)])
        rows = [SampleRow(c.request.params, c.request.seed, c.request.num_output_tokens) for c in chunk_of_row]
        tokens = sample(logits, rows)
        # put the tokens back in the scheduler's chunk order
        by_request = {id(c.request): t for c, t in zip(chunk_of_row, tokens)}
        return [by_request[id(c.request)] for c in sched.chunks if c.samples]

    def _slots(self, block_ids: list[int], first: int, n: int) -> list[int]:
        bs = self.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(first, first + n)]

    def _add_decodes(self, batch: AttentionBatch, decodes: list[ScheduledChunk]) -> None:
        bs = self.block_size
        ctx = [c.request.num_computed_tokens + 1 for c in decodes]
        width = blocks_for(max(ctx), bs)
        tables = [c.request.block_ids[:width] + [0] * (width - min(width, len(c.request.block_ids)))
                  for c in decodes]
        dev = self.device
        batch.num_decodes = len(decodes)
        batch.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=dev)
        lens = torch.tensor(ctx, dtype=torch.long, device=dev)
        batch.decode_mask = (torch.arange(width * bs, device=dev)[None, :] < lens[:, None])[:, None, None, :]
