"""The learner's data-parallel group: which share of a batch this rank computes on, and the
sums across ranks that make N ranks take the step one rank would.

Every rank holds the same parameters, optimizer state, data and seed; each computes the loss on
its share of every minibatch, weighted by the share's size, and the gradients are summed across
ranks before the (identical) clip and step. Outside a group (one learner, or no
`torch.distributed`) every function is the identity, so the update rules read the same either
way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether this process is one rank of a group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def share_bounds(count: int) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of ``count`` items (as equal as possible)."""
    size, index = world_size(), rank()
    return round(index * count / size), round((index + 1) * count / size)


def share(*columns: Sequence) -> tuple[tuple[Sequence, ...], float]:
    """This rank's rows of ``columns`` (all cut alike) and their weight rows / all rows: a mean
    loss on the share times the weight, summed over ranks, is the mean loss on all rows."""
    count = len(columns[0])
    if not active():
        return columns, 1.0
    start, stop = share_bounds(count)
    return tuple(c[start:stop] for c in columns), (stop - start) / max(1, count)


def total(value: float) -> float:
    """The sum of ``value`` over the ranks (``value`` on one rank)."""
    return _reduce(value, dist.ReduceOp.SUM) if active() else value


def largest(value: float) -> float:
    """The largest ``value`` of the ranks."""
    return _reduce(value, dist.ReduceOp.MAX) if active() else value


def _reduce(value: float, op) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def sum_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace every parameter's ``.grad`` by its sum over the ranks, in one flat all-reduce.
    A parameter a rank's share did not reach counts as zero there; one no rank's share reached
    keeps no gradient (so AdamW skips it, as it would on one rank)."""
    if not active():
        return
    parameters = [p for p in parameters if p.requires_grad]
    reached = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32,
                           device=_device())
    dist.all_reduce(reached)
    parameters = [p for p, hits in zip(parameters, reached.tolist(), strict=True) if hits]
    if not parameters:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    offset = 0
    for parameter in parameters:
        count = parameter.numel()
        parameter.grad.copy_(flat[offset:offset + count].view_as(parameter))
        offset += count


def _device() -> torch.device:
    """Where the group's collectives run: NCCL works on GPU tensors only."""
    return torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")


def join(address: str, index: int, size: int) -> None:
    """Join the group of ``size`` ranks whose rank 0 listens at ``address`` (host:port): gloo
    on CPU, NCCL when this process has a GPU."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=index,
                            world_size=size)
