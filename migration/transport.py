"""How KV blocks travel from the source to the destination.

`RayObjectStoreTransport` (the default) hands the blocks to Ray as a numpy array: Ray puts it in the shared
object store and the destination maps it without unpickling Python objects. A torch.distributed transport
(gloo on CPU, NCCL between GPUs) fits the same interface: `send` moves the bytes, `receive` returns them as
a tensor on the destination.
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from migration.protocol import DestinationPeer

# numpy has no bfloat16: such blocks travel as their raw 16-bit patterns
_WIRE_VIEW = {torch.bfloat16: torch.int16}


@dataclass(frozen=True)
class KVPayload:
    dtype: str
    array: np.ndarray

    @staticmethod
    def from_tensor(blocks: torch.Tensor) -> "KVPayload":
        blocks = blocks.detach().contiguous().cpu()
        view = _WIRE_VIEW.get(blocks.dtype)
        array = (blocks.view(view) if view is not None else blocks).numpy()
        return KVPayload(str(blocks.dtype).removeprefix("torch."), array)

    def to_tensor(self) -> torch.Tensor:
        """A tensor over the payload's memory (read-only when it is mapped from the object store: the
        destination only copies out of it into its cache)."""
        dtype = getattr(torch, self.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(self.array)
        return t.view(dtype) if dtype in _WIRE_VIEW else t


class KVTransport(abc.ABC):
    name: str

    @abc.abstractmethod
    async def send(self, peer: "DestinationPeer", migration_id: str, first: int, blocks: torch.Tensor) -> None:
        """Deliver `blocks` ([layers, 2, n, block_size, kv_heads, head_dim]) as blocks first..first+n-1 of the
        request the peer is importing."""

    @abc.abstractmethod
    def receive(self, payload: Any) -> torch.Tensor:
        """On the destination: the tensor a `send` delivered."""


class RayObjectStoreTransport(KVTransport):
    name = "ray"

    async def send(self, peer, migration_id, first, blocks) -> None:
        await peer.receive(migration_id, first, KVPayload.from_tensor(blocks))

    def receive(self, payload: KVPayload) -> torch.Tensor:
        return payload.to_tensor()


TRANSPORTS = {"ray": RayObjectStoreTransport}


def create_transport(name: str) -> KVTransport:
    try:
        return TRANSPORTS[name]()
    except KeyError:
        raise ValueError(f"transport: unknown KV transport {name!r}; choose one of {', '.join(TRANSPORTS)}") \
            from None
