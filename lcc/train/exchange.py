"""The few collectives a refresh needs, for one process or for ``torch.distributed``.

:meth:`lcc.train.loop.Regularisation.start_epoch` takes an exchange and runs the same lines for
every process count: each rank collects the latents of its shard, the main rank gathers them,
computes the refresh and broadcasts the states, every rank installs them.
:class:`SingleProcess` is the identity; :class:`TorchDistributed` uses the initialised process
group (gloo on CPU tensors, nccl on the current CUDA device). :func:`current_exchange` picks one.

>>> import numpy as np
>>> exchange = current_exchange()  # no process group here: a single process
>>> exchange.rank, exchange.world, exchange.is_main
(0, 1, True)
>>> [part.tolist() for part in exchange.gather_rows(np.arange(3))]
[[0, 1, 2]]
>>> exchange.broadcast({"k": 5}), exchange.all_reduce_sum([1.0, 2.0])
({'k': 5}, [1.0, 2.0])
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from lcc.errors import LCCInputError

T = TypeVar("T")

__all__ = [
    "Exchange",
    "SingleProcess",
    "TorchDistributed",
    "check_identical",
    "compute_on_main",
    "current_exchange",
    "states_digest",
]


class Exchange(Protocol):
    """Collectives over the processes of one run (rank 0 is the main one)."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool: ...

    def gather_rows(self, array: np.ndarray) -> list[np.ndarray]:
        """Every rank's ``array`` (same trailing shape and dtype, any number of rows)."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """The main rank's picklable ``obj`` on every rank."""
        ...

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of ``values`` over the ranks."""
        ...

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Give every rank the main rank's buffers of ``module`` (BatchNorm statistics)."""
        ...


class SingleProcess:
    """The exchange of a run in one process: every collective is the identity."""

    rank = 0
    world = 1

    @property
    def is_main(self) -> bool:
        return True

    def gather_rows(self, array: np.ndarray) -> list[np.ndarray]:
        return [array]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        return [float(value) for value in values]

    def broadcast_buffers(self, module: nn.Module) -> None:
        pass


class TorchDistributed:
    """The exchange of an initialised ``torch.distributed`` process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = int(dist.get_rank())
        self.world = int(dist.get_world_size())
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        return self.device if self.device is not None else torch.device("cpu")

    def gather_rows(self, array: np.ndarray) -> list[np.ndarray]:
        device = self._device()
        count = torch.tensor([array.shape[0]], dtype=torch.int64, device=device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        self.dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        padded = np.zeros((max(sizes), *array.shape[1:]), dtype=array.dtype)
        padded[: array.shape[0]] = array
        tensor = torch.from_numpy(padded).to(device)
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        self.dist.all_gather(parts, tensor)
        return [part[:size].cpu().numpy() for part, size in zip(parts, sizes, strict=True)]

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._device())
        self.dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def broadcast_buffers(self, module: nn.Module) -> None:
        for buffer in module.buffers():
            self.dist.broadcast(buffer.data, src=0)


def current_exchange() -> Exchange:
    """The exchange of this process: :class:`TorchDistributed` in a process group, else
    :class:`SingleProcess`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return TorchDistributed()
    return SingleProcess()


def compute_on_main(compute: Callable[[], T], exchange: Exchange) -> T:
    """``compute()`` run on the main rank only, its result (or its error) on every rank.

    >>> compute_on_main(lambda: {"k": 5}, SingleProcess())
    {'k': 5}
    """
    if exchange.world == 1:
        return compute()
    outcome: Any = None
    if exchange.is_main:
        try:
            outcome = compute()
        except Exception as error:  # every rank must leave the broadcast below
            outcome = ("error", type(error).__name__, str(error))
    outcome = exchange.broadcast(outcome)
    if isinstance(outcome, tuple) and outcome and outcome[0] == "error":
        kind, message = outcome[1], outcome[2]
        if kind == "LCCInputError":
            raise LCCInputError(message)
        raise RuntimeError(f"the refresh failed on rank 0: {kind}: {message}")
    return outcome


def check_identical(states: Mapping[str, Any], exchange: Exchange) -> None:
    """Raise unless every rank holds the same ``states`` (by :func:`states_digest`)."""
    if exchange.world == 1:
        return
    digests = exchange.gather_rows(np.frombuffer(states_digest(states).encode(), np.uint8))
    if any(not np.array_equal(d, digests[0]) for d in digests):
        raise RuntimeError("ranks installed different refresh states; please report this")


def states_digest(states: Mapping[str, Any]) -> str:
    """A digest of refresh states: their arrays' bytes and plain values, walked in order (equal
    states give equal digests on every rank; pickles may differ in their memo layout).

    >>> states_digest({"a": np.zeros(2)}) == states_digest({"a": np.zeros(2)})
    True
    >>> states_digest({"a": np.zeros(2)}) == states_digest({"a": np.ones(2)})
    False
    """
    digest = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, np.ndarray):
            digest.update(f"{value.dtype}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, Tensor):
            walk(value.detach().cpu().numpy())
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for item in dataclasses.fields(value):
                digest.update(item.name.encode())
                walk(getattr(value, item.name))
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        else:
            digest.update(repr(value).encode())

    walk(dict(states))
    return digest.hexdigest()
