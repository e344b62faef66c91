"""Streaming statistics of unit activations, one small class each.

Every class keeps a bounded summary of what it has seen, in torch tensors on one device:

- :class:`RunningMaxActivation`: the max over positions of each unit on each patch (the
  units x patches matrix ``a`` of the dissection), keyed by patch id.
- :class:`RunningTopK`: the k patches with the highest max activation per unit, ties broken by
  the lower patch id.
- :class:`RunningTailQuantile`: the EXACT upper quantile per unit, through a running buffer of each
  unit's largest ``m`` values, where ``m`` is fixed by the total count known in advance.
- :class:`RunningQuantileSketch`: a deterministic compactor sketch (the MRL / KLL family with
  equal level capacities) for when the exact buffer does not fit; it counts the weight of every
  compaction, which is a proven worst-case bound on the rank error of any quantile it reports.

Each class has ``add(...)``, a result accessor, ``state_dict()`` / ``load_state_dict(state)``,
``to_(device)`` and ``merge(other)``: two partial states (two shards of the patches, in any order)
merge into exactly the state one pass over the whole would have reached (for the sketch: into a
state whose error bound is stated). All are tested against brute-force numpy references.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from workspace.base.errors import MammoError


class StatisticsError(MammoError):
    """Statistics that cannot be combined or finished (mismatched shards, wrong counts)."""


def _as_float32(values: torch.Tensor) -> torch.Tensor:
    values = torch.as_tensor(values)
    if values.dtype != torch.float32:
        values = values.float()
    if values.numel():
        low, high = torch.aminmax(values)       # one pass; NaN propagates into both
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            raise StatisticsError("activations contain NaN or infinite values")
    return values


# ---------------------------------------------------------------------------------------------
# The definition of the quantile: numpy's default ("linear", Hyndman & Fan type 7), reproduced
# with the same floating-point operations so the result equals ``numpy.quantile`` bit for bit.
# ---------------------------------------------------------------------------------------------
def quantile_ranks(n: int, q: float, dtype: np.dtype = np.float32) -> tuple[int, int, np.ndarray]:
    """The 0-based ranks (ascending) that ``numpy.quantile(values, q)`` interpolates between for
    ``n`` values of ``dtype``, and the interpolation weight (a 0-d array), computed as numpy does
    (numpy casts a Python float q to the values' dtype, so float32 values get float32 arithmetic)."""
    if n < 1:
        raise StatisticsError("a quantile of no values is undefined")
    if not 0.0 <= q <= 1.0:
        raise StatisticsError(f"quantile must be in [0, 1], got {q}")
    qa = np.asanyarray(q, dtype=dtype)
    virtual = np.asanyarray((n - 1) * qa)   # numpy's virtual index for method='linear'
    if virtual >= n - 1:
        return n - 1, n - 1, np.asanyarray(virtual - np.floor(virtual))
    if virtual < 0:
        return 0, 0, np.asanyarray(virtual - np.floor(virtual))
    previous = int(np.floor(virtual))
    gamma = np.asanyarray(virtual - np.floor(virtual))
    return previous, previous + 1, gamma


def numpy_lerp(below: np.ndarray, above: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """numpy's quantile interpolation between the two neighbouring order statistics (same ops)."""
    below = np.asarray(below)
    above = np.asarray(above)
    diff = np.subtract(above, below)
    out = np.asanyarray(np.add(below, diff * gamma))
    np.subtract(above, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe",
                dtype=type(out.dtype))
    return out.astype(below.dtype, copy=False)


def tail_size(n: int, q: float) -> int:
    """How many of the largest values decide the q-quantile of n values (the exact buffer width)."""
    below, _above, _gamma = quantile_ranks(n, q)
    return n - below


# ---------------------------------------------------------------------------------------------
class RunningMaxActivation:
    """The max over spatial positions of every unit on every patch: ``a`` (units x patches).

    Keeps one float32 column per patch seen and its patch id, in arrays that grow geometrically
    (``capacity`` presizes them: one small long-lived allocation per batch would pin every freed
    batch-sized block of glibc's heap and grow the process by a batch per batch). ``result()``
    returns the columns in ascending patch-id order (a canonical order, so shards merged in any
    order give the same matrix). Patch ids must be unique across everything added and merged.
    """

    def __init__(self, device: torch.device | str = "cpu", capacity: int = 0):
        self.device = torch.device(device)
        self.capacity = int(capacity)
        self._values: torch.Tensor | None = None   # (units, capacity)
        self._ids = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.count = 0

    def add(self, maxima: torch.Tensor, patch_ids: torch.Tensor) -> None:
        """maxima: (units, B) max activation of each unit on each of B patches; patch_ids: (B,)."""
        maxima = _as_float32(maxima).to(self.device)
        ids = torch.as_tensor(patch_ids, dtype=torch.int64).to(self.device).reshape(-1)
        need = self.count + ids.numel()
        if self._values is None or need > self._values.shape[1]:
            size = max(need, self.capacity, 2 * (0 if self._values is None else self._values.shape[1]), 16)
            grown = torch.empty((maxima.shape[0], size), device=self.device)
            grown_ids = torch.empty(size, dtype=torch.int64, device=self.device)
            if self._values is not None:
                grown[:, :self.count] = self._values[:, :self.count]
                grown_ids[:self.count] = self._ids[:self.count]
            self._values, self._ids = grown, grown_ids
        self._values[:, self.count:need] = maxima
        self._ids[self.count:need] = ids
        self.count = need

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (units, n) float32, patch_ids (n,) int64), columns ordered by patch id."""
        if self._values is None or self.count == 0:
            raise StatisticsError("no patches were added")
        ids = self._ids[:self.count]
        order = torch.argsort(ids, stable=True)
        ids, values = ids[order], self._values[:, :self.count][:, order]
        if ids.numel() > 1 and bool((ids[1:] == ids[:-1]).any()):
            raise StatisticsError("the same patch id was added twice (overlapping shards?)")
        return values, ids

    def merge(self, other: RunningMaxActivation) -> RunningMaxActivation:
        if other.count:
            self.add(other._values[:, :other.count], other._ids[:other.count])
        return self

    def state_dict(self) -> dict[str, Any]:
        if not self.count:
            return {"values": None, "ids": None}
        return {"values": self._values[:, :self.count].cpu().clone(), "ids": self._ids[:self.count].cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._values, self.count = None, 0
        self._ids = torch.zeros(0, dtype=torch.int64, device=self.device)
        if state["ids"] is not None:
            self.add(state["values"], state["ids"])

    def to_(self, device: torch.device | str) -> RunningMaxActivation:
        self.device = torch.device(device)
        if self._values is not None:
            self._values = self._values.to(self.device)
        self._ids = self._ids.to(self.device)
        return self


# ---------------------------------------------------------------------------------------------
def _top_by_value_then_id(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the k largest values, ties broken by the lower id. values/ids: (units, n)."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    values = torch.gather(values, 1, by_id)
    ids = torch.gather(ids, 1, by_id)
    order = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return torch.gather(values, 1, order), torch.gather(ids, 1, order)


class RunningTopK:
    """The k patches with the highest max activation for every unit.

    Keeps, per unit, at most k (value, patch id) pairs, best first; equal values are ordered by
    the lower patch id (so the result does not depend on the order patches arrive in).
    """

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        if k < 1:
            raise StatisticsError(f"top-k needs k >= 1, got {k}")
        self.k = int(k)
        self.device = torch.device(device)
        self.values: torch.Tensor | None = None   # (units, <=k) float32
        self.ids: torch.Tensor | None = None      # (units, <=k) int64

    def add(self, maxima: torch.Tensor, patch_ids: torch.Tensor) -> None:
        """maxima: (units, B); patch_ids: (B,)."""
        maxima = _as_float32(maxima).to(self.device)
        ids = torch.as_tensor(patch_ids, dtype=torch.int64).to(self.device).expand(maxima.shape[0], -1)
        self._absorb(maxima, ids)

    def _absorb(self, values: torch.Tensor, ids: torch.Tensor) -> None:
        if self.values is not None:
            values = torch.cat([self.values, values], dim=1)
            ids = torch.cat([self.ids, ids], dim=1)
        self.values, self.ids = _top_by_value_then_id(values, ids, self.k)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (units, min(k, n)), patch_ids (units, min(k, n))), best first."""
        if self.values is None:
            raise StatisticsError("no patches were added")
        return self.values, self.ids

    def merge(self, other: RunningTopK) -> RunningTopK:
        if other.k != self.k:
            raise StatisticsError(f"cannot merge top-{other.k} into top-{self.k}")
        if other.values is not None:
            self._absorb(other.values.to(self.device), other.ids.to(self.device))
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k,
                "values": None if self.values is None else self.values.cpu(),
                "ids": None if self.ids is None else self.ids.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k = int(state["k"])
        self.values = None if state["values"] is None else state["values"].to(self.device)
        self.ids = None if state["ids"] is None else state["ids"].to(self.device)

    def to_(self, device: torch.device | str) -> RunningTopK:
        self.device = torch.device(device)
        if self.values is not None:
            self.values, self.ids = self.values.to(self.device), self.ids.to(self.device)
        return self


# ---------------------------------------------------------------------------------------------
class RunningTailQuantile:
    """The exact q-quantile of every unit's values, for a total count ``n_total`` known in advance.

    ``numpy.quantile(values, q)`` (linear) only looks at the two order statistics around rank
    ``(n - 1) q``; both are among the ``m = tail_size(n, q)`` largest values. So the state is, per
    unit, the m largest values seen so far (padded with -inf until m have been seen) plus values
    still waiting to be folded in. A new value at or below a unit's current m-th largest can never
    change the result and is only counted. Merging two shards: the m largest of the union are among
    the union of each shard's m largest, so concatenating and keeping m is exact.

    Memory: one preallocated float32 work array ``(units, m + pending)`` (the buffer, then room for
    pending candidates), folded with a fixed-shape topk, so allocations repeat exactly and the
    process's memory stays flat (varying-size temporaries fragment glibc's heap: measured 20 MB/batch
    of growth before this layout).
    """

    BLOCK = 1024    # candidate widths are rounded up to this, so temporaries come in few sizes

    def __init__(self, n_units: int, n_total: int, q: float, device: torch.device | str = "cpu"):
        self.n_units, self.n_total, self.q = int(n_units), int(n_total), float(q)
        self.m = tail_size(self.n_total, self.q)
        self.device = torch.device(device)
        self.count = 0
        self.pending_room = 0                     # set on first use: room for m or one batch, whichever is more
        self._work: torch.Tensor | None = None   # (units, m + pending_room), allocated on first use
        self._pending = 0                         # columns of the pending area in use
        self._floor: torch.Tensor | None = None   # (units, 1) min of the folded buffer

    @staticmethod
    def estimate_bytes(n_units: int, n_total: int, q: float, batch_values: int = 8192) -> int:
        """Peak bytes: the work array (buffer + room for max(m, a batch)), a fold's topk values and
        int64 indices, and one batch's candidates."""
        m = tail_size(n_total, q)
        room = max(m, batch_values) + 2 * RunningTailQuantile.BLOCK
        return int(n_units * (4 * (m + room) + 12 * m + 4 * batch_values))

    def _ensure(self, batch_width: int = 0) -> torch.Tensor:
        if self._work is None:
            room = max(self.m, batch_width)
            self.pending_room = -(-room // self.BLOCK) * self.BLOCK + self.BLOCK
            self._work = torch.full((self.n_units, self.m + self.pending_room), -math.inf, device=self.device)
        return self._work

    @property
    def buffer(self) -> torch.Tensor:
        """(units, m): the m largest values seen so far, in no particular order (-inf padding)."""
        self._fold()
        return self._ensure()[:, :self.m]

    def add(self, values: torch.Tensor) -> None:
        """values: (units, n) activations (any layout flattened per unit)."""
        values = _as_float32(values).to(self.device).reshape(self.n_units, -1)
        self._count(values.shape[1])
        self._ensure(values.shape[1])
        self._absorb_rows(values, None)

    def add_patches(self, acts: torch.Tensor, unit_max: torch.Tensor | None = None, *, checked: bool = False) -> None:
        """acts: (B, units, ...) maps of B patches, as a layer outputs them. ``unit_max`` (units,), the
        max of each unit over the batch, if the caller has it. Units whose batch max is not above their
        current floor have no candidate (the common case once the buffer is warm): only the others are
        gathered and transposed, so a warm pass costs about one comparison per unit per batch."""
        acts = acts.to(self.device)
        if not checked:
            acts = _as_float32(acts)
        elif acts.dtype != torch.float32:
            acts = acts.float()
        x = acts.reshape(acts.shape[0], self.n_units, -1)
        per_unit = x.shape[0] * x.shape[2]
        self._count(per_unit)
        self._ensure(per_unit)
        if unit_max is None:
            unit_max = x.amax(dim=(0, 2))
        floor = self._floor
        if floor is None:
            rows, idx = x.transpose(0, 1).reshape(self.n_units, -1), None
        else:
            active = unit_max.to(self.device) > floor[:, 0]
            idx = torch.nonzero(active).reshape(-1)
            if idx.numel() == 0:
                return
            if idx.numel() == self.n_units:
                rows, idx = x.transpose(0, 1).reshape(self.n_units, -1), None
            else:
                rows = x.index_select(1, idx).transpose(0, 1).reshape(idx.numel(), -1)
        self._absorb_rows(rows, idx)

    def _count(self, n: int) -> None:
        self.count += n
        if self.count > self.n_total:
            raise StatisticsError(f"more values ({self.count}) than the announced total ({self.n_total})")

    def _absorb_rows(self, values: torch.Tensor, idx: torch.Tensor | None) -> None:
        for start in range(0, values.shape[1], self.pending_room):
            self._absorb(values[:, start:start + self.pending_room], idx)

    def _absorb(self, values: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Fold candidates of rows ``idx`` (all rows when None) into the pending area."""
        work = self._ensure()
        if self._floor is None:
            width = values.shape[1]
        else:
            floor = self._floor if idx is None else self._floor.index_select(0, idx)
            width = int((values > floor).sum(dim=1).max())   # floor: m-th largest folded so far
        if width == 0:
            return
        width = min(values.shape[1], -(-width // self.BLOCK) * self.BLOCK)
        if width < values.shape[1]:
            # every candidate is among its row's `width` largest (extra non-candidates are harmless)
            values = torch.topk(values, width, dim=1, sorted=False).values
        if self._pending + width > self.pending_room:
            self._fold()
        cols = slice(self.m + self._pending, self.m + self._pending + width)
        if idx is None:
            work[:, cols] = values
        else:
            work[idx, cols] = values           # rows not in idx keep -inf there
        self._pending += width

    def _fold(self) -> None:
        if not self._pending:
            return
        work = self._ensure()
        top = torch.topk(work, self.m, dim=1, sorted=False).values    # always the same shape
        work[:, :self.m] = top
        work[:, self.m:] = -math.inf
        self._pending = 0
        self._floor = top.amin(dim=1, keepdim=True)

    def result(self) -> torch.Tensor:
        """(units,) float32: equal to ``numpy.quantile(all values of the unit, q)``."""
        if self.count != self.n_total:
            raise StatisticsError(f"saw {self.count} values per unit, expected {self.n_total}")
        buffer = torch.sort(self.buffer, dim=1, descending=True).values
        below, above, gamma = quantile_ranks(self.n_total, self.q)
        # ascending rank r is the (n - 1 - r)-th largest: column (n - 1 - r) of the descending buffer
        lo = buffer[:, self.n_total - 1 - below].cpu().numpy()
        hi = buffer[:, self.n_total - 1 - above].cpu().numpy()
        return torch.from_numpy(numpy_lerp(lo, hi, gamma).astype(np.float32))

    def merge(self, other: RunningTailQuantile) -> RunningTailQuantile:
        if (other.n_units, other.n_total, other.q) != (self.n_units, self.n_total, self.q):
            raise StatisticsError("cannot merge exact quantile buffers with different units, totals or q")
        if self.count + other.count > self.n_total:
            raise StatisticsError("merged shards hold more values than the announced total")
        theirs = other.buffer.to(self.device)
        self.count += other.count
        self._ensure()
        for start in range(0, self.m, self.pending_room):
            self._absorb(theirs[:, start:start + self.pending_room])
        self._fold()
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "exact", "n_units": self.n_units, "n_total": self.n_total, "q": self.q,
                "count": self.count, "buffer": self.buffer.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(state["n_units"], state["n_total"], state["q"], self.device)
        self.count = int(state["count"])
        self._ensure()[:, :self.m] = state["buffer"].to(self.device)
        self._floor = self._work[:, :self.m].amin(dim=1, keepdim=True)

    def to_(self, device: torch.device | str) -> RunningTailQuantile:
        self.device = torch.device(device)
        if self._work is not None:
            self._work = self._work.to(self.device)
        if self._floor is not None:
            self._floor = self._floor.to(self.device)
        return self


# ---------------------------------------------------------------------------------------------
class RunningQuantileSketch:
    """A mergeable quantile sketch with a computed worst-case rank error (for when m does not fit).

    Level h holds items of weight 2**h (per unit; every unit receives the same number of values, so
    all units compact in lockstep and share one error bound). When a level holds ``capacity`` items
    or more, it is sorted and every other item (alternating offsets) moves up one level with double
    weight; an odd item out stays. One compaction of weight-w items moves any item's estimated rank
    by at most w, so ``rank_error`` = the sum of the weights of all compactions is a deterministic
    bound: the reported value at rank r is a true value of rank within r +- rank_error. Merging adds
    the two bounds (plus any compaction the merge itself needs).
    """

    def __init__(self, n_units: int, q: float, capacity: int, device: torch.device | str = "cpu"):
        if capacity < 2:
            raise StatisticsError("sketch capacity must be at least 2")
        self.n_units, self.q, self.capacity = int(n_units), float(q), int(capacity)
        self.device = torch.device(device)
        self.levels: list[torch.Tensor] = []
        self.count = 0
        self.rank_error = 0
        self._offsets: list[int] = []

    @staticmethod
    def capacity_for_budget(n_units: int, n_total: int, budget_bytes: int) -> int:
        """The largest power-of-two capacity whose levels (and a sort's working copy) fit the budget."""
        capacity = 1 << 20
        while capacity >= 16:
            levels = max(1, math.ceil(math.log2(max(n_total / capacity, 1)))) + 2
            if n_units * capacity * levels * 4 * 3 <= budget_bytes:
                return capacity
            capacity //= 2
        raise StatisticsError(f"memory budget of {budget_bytes / 2**20:.1f} MB is too small for "
                              f"a quantile sketch of {n_units} units")

    def _level(self, h: int) -> torch.Tensor:
        while len(self.levels) <= h:
            self.levels.append(torch.empty((self.n_units, 0), device=self.device))
            self._offsets.append(0)
        return self.levels[h]

    def add(self, values: torch.Tensor) -> None:
        values = _as_float32(values).to(self.device).reshape(self.n_units, -1)
        self.count += values.shape[1]
        self.levels[0:1] = [torch.cat([self._level(0), values], dim=1)]
        self._compact()

    def _compact(self) -> None:
        h = 0
        while h < len(self.levels):
            items = self.levels[h]
            if items.shape[1] >= self.capacity:
                items = torch.sort(items, dim=1).values
                even = items.shape[1] - items.shape[1] % 2
                offset = self._offsets[h]
                self._offsets[h] = 1 - offset
                promoted = items[:, offset:even:2]
                self.levels[h] = items[:, even:]          # the odd one out (largest) stays
                self.levels[h + 1:h + 2] = [torch.cat([self._level(h + 1), promoted], dim=1)]
                self.rank_error += 1 << h
            h += 1

    def _weighted_sorted(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.cat(self.levels, dim=1)
        weights = torch.cat([torch.full((lv.shape[1],), 1 << h, dtype=torch.int64, device=self.device)
                             for h, lv in enumerate(self.levels)])
        order = torch.argsort(values, dim=1, stable=True)
        values = torch.gather(values, 1, order)
        cumulative = torch.cumsum(weights[order], dim=1)
        return values, cumulative

    def value_at_ranks(self, ranks: list[int]) -> torch.Tensor:
        """(units, len(ranks)): the estimated value of each 0-based ascending rank."""
        values, cumulative = self._weighted_sorted()
        target = torch.as_tensor(ranks, dtype=torch.int64, device=self.device).expand(self.n_units, -1)
        index = torch.searchsorted(cumulative, target.contiguous(), right=True)
        index = index.clamp(max=values.shape[1] - 1)
        return torch.gather(values, 1, index)

    def result(self) -> torch.Tensor:
        """(units,) float32: the q-quantile, rank within +- ``rank_error`` of numpy's."""
        if self.count == 0:
            raise StatisticsError("no values were added")
        below, above, gamma = quantile_ranks(self.count, self.q)
        pair = self.value_at_ranks([below, above]).cpu().numpy()
        return torch.from_numpy(numpy_lerp(pair[:, 0], pair[:, 1], gamma).astype(np.float32))

    def merge(self, other: RunningQuantileSketch) -> RunningQuantileSketch:
        if (other.n_units, other.q, other.capacity) != (self.n_units, self.q, self.capacity):
            raise StatisticsError("cannot merge sketches with different units, q or capacity")
        for h, items in enumerate(other.levels):
            self.levels[h:h + 1] = [torch.cat([self._level(h), items.to(self.device)], dim=1)]
        self.count += other.count
        self.rank_error += other.rank_error
        self._compact()
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sketch", "n_units": self.n_units, "q": self.q, "capacity": self.capacity,
                "count": self.count, "rank_error": self.rank_error, "offsets": list(self._offsets),
                "levels": [lv.cpu() for lv in self.levels]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(state["n_units"], state["q"], state["capacity"], self.device)
        self.count, self.rank_error = int(state["count"]), int(state["rank_error"])
        self._offsets = list(state["offsets"])
        self.levels = [lv.to(self.device) for lv in state["levels"]]

    def to_(self, device: torch.device | str) -> RunningQuantileSketch:
        self.device = torch.device(device)
        self.levels = [lv.to(self.device) for lv in self.levels]
        return self


__all__ = ["StatisticsError", "quantile_ranks", "numpy_lerp", "tail_size", "RunningMaxActivation",
           "RunningTopK", "RunningTailQuantile", "RunningQuantileSketch"]
