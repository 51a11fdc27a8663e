"""The value rule's replay: a preallocated ring of the newest base rollouts, bounded by a
rollout count and by bytes, written in place and saved with the training checkpoint.

Base rollouts are i.i.d. draws of a fixed chain (h is defined by the base model, not the
policy), so the oldest are worth exactly as much as the newest: what does not fit is dropped,
oldest first. Dropping rather than spilling to disk keeps the bound in bytes a bound on the
learner's memory *and* on every checkpoint, which holds the whole replay so that a resumed run
continues exactly; more data is one key away (``replay_bytes``).
"""

from __future__ import annotations

import torch

FIELDS = ("states", "log_targets", "contexts")
ROW_AXIS = {"states": 1}   # states are (S+1, N, ...): the rollout is the second axis


class Replay:
    """The newest rollouts within ``max_rollouts`` and ``max_bytes`` (states (S+1, N, ...),
    targets (N, J), contexts (N, ...) and the held-out flag together; the latest batch is kept
    whole even when it alone is larger). Every ``heldout_every``-th rollout ever added (in
    arrival order) is held out of the fit: the data on which the head's early stopping is
    judged. Rows live in ring slots; ``slots()`` lists them in arrival order."""

    def __init__(self, max_rollouts: int, heldout_every: int = 0,
                 max_bytes: int | None = None):
        self.max_rollouts, self.max_bytes, self.heldout_every = max_rollouts, max_bytes, \
            heldout_every
        self.added = 0          # rollouts ever added (their arrival numbers decide held-out)
        self.count = 0          # rollouts held
        self.next = 0           # the slot the next rollout goes to
        self.buffers: dict[str, torch.Tensor | None] = {}
        self.heldout_buffer: torch.Tensor | None = None

    @property
    def settings(self) -> tuple[int, int | None, int]:
        return self.max_rollouts, self.max_bytes, self.heldout_every

    @property
    def capacity(self) -> int:
        return 0 if self.heldout_buffer is None else self.heldout_buffer.shape[0]

    def bound(self, row_bytes: int) -> int:
        """The most rollouts of ``row_bytes`` each that both bounds allow (``max_bytes`` None:
        the count alone)."""
        if self.max_bytes is None:
            return self.max_rollouts
        return min(self.max_rollouts, self.max_bytes // max(1, row_bytes))

    def add(self, payloads: list[dict]) -> None:
        """Append the payloads' rollouts in order, dropping the oldest beyond the bounds."""
        if not payloads:
            return
        new = sum(p["log_targets"].shape[0] for p in payloads)
        order = torch.arange(self.added, self.added + new)
        heldout = order % self.heldout_every == 0 if self.heldout_every else \
            torch.zeros(new, dtype=torch.bool)
        rows = {"states": torch.cat([p["states"] for p in payloads], 1),
                "log_targets": torch.cat([p["log_targets"] for p in payloads]),
                "contexts": None if payloads[0]["contexts"] is None else
                torch.cat([p["contexts"] for p in payloads])}
        self._write(rows, heldout)
        self.added += new

    def slots(self) -> torch.Tensor:
        """The slots of the held rollouts, oldest first."""
        return (self.next - self.count + torch.arange(self.count)) % max(1, self.capacity)

    def ordered(self, name: str) -> torch.Tensor | None:
        """A copy of one field (or ``heldout``) in arrival order; ``states`` is (S+1, N, ...)."""
        buffer = self.heldout_buffer if name == "heldout" else self.buffers.get(name)
        return None if buffer is None else _rows(buffer, name)[self.slots()].movedim(
            0, ROW_AXIS.get(name, 0))

    states = property(lambda self: self.ordered("states"))
    log_targets = property(lambda self: self.ordered("log_targets"))
    contexts = property(lambda self: self.ordered("contexts"))
    heldout = property(lambda self: self.ordered("heldout"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The held rollouts in arrival order and the arrival count (for a checkpoint)."""
        fields = {name: self.ordered(name) for name in (*FIELDS, "heldout")}
        state = {name: values.contiguous() for name, values in fields.items()
                 if values is not None}
        return {**state, "added": torch.tensor([self.added], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Hold exactly the rollouts of a ``state_dict()`` (the newest that fit these bounds)."""
        self.count = self.next = 0
        self.buffers, self.heldout_buffer = {}, None
        if "heldout" in state:
            self._write({name: state.get(name) for name in FIELDS}, state["heldout"])
        self.added = int(state["added"][0])

    def _write(self, rows: dict[str, torch.Tensor | None], heldout: torch.Tensor) -> None:
        """Put ``rows`` (in arrival order) into the next slots, growing the ring only when a
        batch is larger than it (its first batch, or a larger one)."""
        new = heldout.shape[0]
        row_bytes = 1 + sum(_rows(t, name)[:1].numel() * t.element_size()
                            for name, t in rows.items() if t is not None)
        keep = max(new, self.bound(row_bytes))
        if new > self.capacity:
            self._allocate(rows, keep, keep_old=min(self.count, keep - new))
        slots = (self.next + torch.arange(new)) % self.capacity
        for name, values in rows.items():
            if values is not None:
                _rows(self.buffers[name], name)[slots] = _rows(values, name)
        self.heldout_buffer[slots] = heldout
        self.next = (self.next + new) % self.capacity
        self.count = min(self.count + new, keep)

    def _allocate(self, rows: dict[str, torch.Tensor | None], capacity: int,
                  keep_old: int) -> None:
        """New buffers of ``capacity`` rollouts that hold the newest ``keep_old`` ones."""
        old = {name: self.ordered(name) for name in (*FIELDS, "heldout")} if keep_old else {}
        self.buffers = {}
        for name, values in rows.items():
            if values is not None:
                shape = list(_rows(values, name).shape)
                shape[0] = capacity
                self.buffers[name] = _rows(torch.empty(shape, dtype=values.dtype), name,
                                           back=True)
        self.heldout_buffer = torch.zeros(capacity, dtype=torch.bool)
        for name, buffer in (*self.buffers.items(), ("heldout", self.heldout_buffer)):
            if name in old:
                _rows(buffer, name)[:keep_old] = _rows(old[name], name)[-keep_old:]
        self.count = self.next = keep_old


def _rows(tensor: torch.Tensor, name: str, back: bool = False) -> torch.Tensor:
    """A view of ``tensor`` with its rollout axis first (``back``: the stored layout again)."""
    axis = ROW_AXIS.get(name, 0)
    return tensor.movedim(0, axis) if back else tensor.movedim(axis, 0)
