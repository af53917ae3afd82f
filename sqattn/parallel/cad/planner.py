"""CA-task partition and the communication-aware greedy scheduler (DistCA ``planner.py``, papers/cad.md).

Pure numpy on the host, deterministic (ties go to the lowest index). Vocabulary:

* **piece**: the rows ``[a, b)`` of document ``doc`` that live on device ``home`` (a document longer than a
  device's shard, or cut at a micro-batch edge, has several pieces; every piece keeps its absolute positions).
* **item** (a CA-task): query rows of one piece, assigned to attention server ``server``. Its rows are the
  head/tail offsets ``[lo, hi)`` of the piece, i.e. positions ``a+lo..a+hi-1`` and their mirrors
  ``b-hi..b-lo-1``, plus the centre row ``a + (b-a)//2`` when ``center`` (odd pieces only). An item needs the
  keys ``[0, kvend)`` of its document, ``kvend`` = its last row + 1.
* Initial (naive) placement: one item per piece, ``lo=0, hi=(b-a)//2, center=(b-a)%2``, on its home device.
* A split moves the ``m`` innermost offsets ``[hi-m, hi)`` (the middle rows around the piece's centre) to the
  recipient: cost exactly ``m*(a+b+1)``, and the recipient needs only keys up to ``b-hi+m``. The donor keeps
  the outermost rows (and the centre row).

Scheduler: loads ``F_i = sum of item pairs on server i``, ``surplus = F - mean``, ``thr = eps * mean``. For each
recipient (``surplus < 0``, most negative first), while its need exceeds ``thr``: over every item on a donor
(``surplus > 0``) move ``mv = min(need, surplus[donor], cost)`` pairs — the whole item if it fits, else the
head/tail split with ``m = floor(mv / (a+b+1))`` — choosing the candidate with the fewest bytes per moved pair
(``rows * q_bytes + kvend * kv_bytes``, the KV prefix as an upper bound). Phase 2 (an extension, on by
default) then drains servers still above ``mean + eps * mean`` into the least loaded ones, so that every
server ends within the tolerance also at hundreds of devices. Optional per-(sender, server) row capacities
(static all-to-all slots) shrink or skip moves that would overflow them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sqattn.parallel.cad.cost import CostModel, head_tail_pairs, rows_pairs


# ------------------------------------------------------------------------------------------------ pieces
@dataclasses.dataclass(frozen=True)
class Pieces:
    """Contiguous runs of one document's rows on one device (struct of int64 arrays of equal length)."""
    doc: np.ndarray
    device: np.ndarray
    a: np.ndarray
    b: np.ndarray

    def __len__(self) -> int:
        return int(self.doc.shape[0])

    @staticmethod
    def concat(parts: list["Pieces"]) -> "Pieces":
        if not parts:
            z = np.zeros((0,), np.int64)
            return Pieces(z, z, z, z)
        return Pieces(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("doc", "device", "a", "b")))


def token_pieces(doc: np.ndarray, pos: np.ndarray, device: int) -> Pieces:
    """Pieces of one device's tokens: maximal runs of consecutive positions of one document.

    Args:
      doc: [L] global document id per token (``< 0``: padding, ignored).
      pos: [L] position of each token within its document.
      device: the device these tokens live on.

    Raises:
      ValueError: when a (doc, pos) pair occurs twice.
    """
    doc = np.asarray(doc, np.int64)
    pos = np.asarray(pos, np.int64)
    keep = doc >= 0
    d, p = doc[keep], pos[keep]
    if d.size == 0:
        return Pieces.concat([])
    order = np.lexsort((p, d))
    d, p = d[order], p[order]
    if np.any((d[1:] == d[:-1]) & (p[1:] == p[:-1])):
        raise ValueError(f"device {device}: a (doc, pos) pair occurs twice")
    start = np.ones(d.shape, bool)
    start[1:] = (d[1:] != d[:-1]) | (p[1:] != p[:-1] + 1)
    first = np.flatnonzero(start)
    last = np.append(first[1:], d.size) - 1
    return Pieces(d[first], np.full(first.shape, device, np.int64), p[first], p[last] + 1)


@dataclasses.dataclass(frozen=True)
class Residency:
    """Where each document's rows (keys) live: pieces sorted by document, with CSR offsets ``ptr``."""
    pieces: Pieces
    doc_ids: np.ndarray     # sorted unique document ids
    ptr: np.ndarray         # pieces of doc_ids[j] are pieces[ptr[j]:ptr[j+1]]

    @staticmethod
    def from_pieces(pieces: Pieces) -> "Residency":
        order = np.lexsort((pieces.a, pieces.doc))
        p = Pieces(*(getattr(pieces, f)[order] for f in ("doc", "device", "a", "b")))
        ids, first = np.unique(p.doc, return_index=True)
        return Residency(p, ids, np.append(first, len(p)).astype(np.int64))

    def rows_on(self, doc: int, end: int, exclude: int) -> dict[int, int]:
        """Rows ``[0, end)`` of ``doc`` per device, leaving out device ``exclude``: {device: rows}."""
        j = int(np.searchsorted(self.doc_ids, doc))
        out: dict[int, int] = {}
        if j == len(self.doc_ids) or self.doc_ids[j] != doc:
            return out
        for i in range(self.ptr[j], self.ptr[j + 1]):
            dev = int(self.pieces.device[i])
            n = min(int(self.pieces.b[i]), end) - int(self.pieces.a[i])
            if dev != exclude and n > 0:
                out[dev] = out.get(dev, 0) + n
        return out


# ------------------------------------------------------------------------------------------------ items
_FIELDS = ("doc", "home", "server", "a", "b", "lo", "hi", "center")


@dataclasses.dataclass
class Items:
    """CA-tasks as a struct of arrays (see the module docstring for the meaning of each field)."""
    doc: np.ndarray
    home: np.ndarray
    server: np.ndarray
    a: np.ndarray
    b: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    center: np.ndarray      # bool

    def __len__(self) -> int:
        return int(self.doc.shape[0])

    @staticmethod
    def from_pieces(pieces: Pieces) -> "Items":
        """Naive placement: one item per piece, computed on the device that holds it."""
        n = pieces.b - pieces.a
        z = np.zeros_like(n)
        return Items(pieces.doc.copy(), pieces.device.copy(), pieces.device.copy(), pieces.a.copy(),
                     pieces.b.copy(), z, n // 2, (n % 2).astype(bool))

    def copy(self) -> "Items":
        return Items(*(getattr(self, f).copy() for f in _FIELDS))

    @property
    def center_pos(self) -> np.ndarray:
        return self.a + (self.b - self.a) // 2

    @property
    def cost(self) -> np.ndarray:
        """Causal pairs of each item."""
        return (head_tail_pairs(self.a, self.b, self.hi - self.lo)
                + np.where(self.center, self.center_pos + 1, 0))

    @property
    def num_rows(self) -> np.ndarray:
        return 2 * (self.hi - self.lo) + self.center

    @property
    def kvend(self) -> np.ndarray:
        """Keys ``[0, kvend)`` of the document each item needs."""
        paired = np.where(self.hi > self.lo, self.b - self.lo, 0)
        return np.maximum(paired, np.where(self.center, self.center_pos + 1, 0))

    def rows(self, i: int) -> np.ndarray:
        """Positions (within the document) of item ``i``'s query rows, ascending."""
        a, b, lo, hi = int(self.a[i]), int(self.b[i]), int(self.lo[i]), int(self.hi[i])
        parts = [np.arange(a + lo, a + hi), np.arange(b - hi, b - lo)]
        if self.center[i]:
            parts.insert(1, np.array([a + (b - a) // 2]))
        return np.concatenate(parts).astype(np.int64)


def server_loads(items: Items, num_devices: int) -> np.ndarray:
    """Causal pairs computed on each server, [num_devices] float64."""
    return np.bincount(items.server, weights=items.cost.astype(np.float64), minlength=num_devices)


# ------------------------------------------------------------------------------------------------ capacity
class _Slots:
    """Rows already committed to each (sender, server) slot of the padded all-to-all, and the KV prefix each
    server already receives per document; answers "how many head/tail offsets fit"."""

    def __init__(self, items: Items, residency: Residency, num_devices: int, q_cap: int, kv_cap: int):
        self.res, self.q_cap, self.kv_cap = residency, q_cap, kv_cap
        self.q = np.zeros((num_devices, num_devices), np.int64)
        self.kv = np.zeros((num_devices, num_devices), np.int64)
        self.need: dict[tuple[int, int], int] = {}
        for i in range(len(items)):
            self.commit(int(items.doc[i]), int(items.home[i]), int(items.server[i]), 0, int(items.kvend[i]))
        if self.q.max(initial=0) > q_cap or self.kv.max(initial=0) > kv_cap:
            raise ValueError(f"CAD: the naive placement already needs {self.q.max()} query / {self.kv.max()} "
                             f"key rows in one all-to-all slot, over the capacity {q_cap} / {kv_cap}")

    def _kv_delta(self, doc: int, server: int, kvend: int) -> dict[int, int]:
        old = self.need.get((server, doc), 0)
        if kvend <= old:
            return {}
        new = self.res.rows_on(doc, kvend, exclude=server)
        prev = self.res.rows_on(doc, old, exclude=server)
        return {d: n - prev.get(d, 0) for d, n in new.items() if n - prev.get(d, 0) > 0}

    def fits(self, doc: int, home: int, server: int, rows: int, kvend: int) -> bool:
        if home != server and self.q[home, server] + rows > self.q_cap:
            return False
        return all(self.kv[d, server] + n <= self.kv_cap for d, n in self._kv_delta(doc, server, kvend).items())

    def commit(self, doc: int, home: int, server: int, rows: int, kvend: int) -> None:
        if home != server:
            self.q[home, server] += rows
        for d, n in self._kv_delta(doc, server, kvend).items():
            self.kv[d, server] += n
        self.need[(server, doc)] = max(self.need.get((server, doc), 0), kvend)


# ------------------------------------------------------------------------------------------------ scheduler
@dataclasses.dataclass(frozen=True)
class ScheduleResult:
    items: Items
    loads_before: np.ndarray    # [D] pairs per server under the naive placement
    loads_after: np.ndarray     # [D] pairs per server after scheduling
    num_moves: int


class _Work:
    """Growable item arrays plus cached cost / rows / kvend, so each greedy step is one vector pass.

    ``w.doc``, ``w.server``, ... are views of the first ``n`` entries (``__getattr__``).
    """

    def __init__(self, items: Items):
        self.n = len(items)
        cap = max(16, 2 * self.n)
        self.f = {}
        for name in _FIELDS:
            src = getattr(items, name)
            self.f[name] = np.zeros(cap, src.dtype)
            self.f[name][:self.n] = src
        self.cost = np.zeros(cap, np.float64)
        self.rows = np.zeros(cap, np.int64)
        self.kvend = np.zeros(cap, np.int64)
        self.cost[:self.n] = items.cost
        self.rows[:self.n] = items.num_rows
        self.kvend[:self.n] = items.kvend

    def __getattr__(self, name):
        if name in _FIELDS:
            return self.f[name][:self.n]
        raise AttributeError(name)

    def _refresh(self, i: int) -> None:
        one = Items(*(self.f[name][i:i + 1] for name in _FIELDS))
        self.cost[i], self.rows[i], self.kvend[i] = one.cost[0], one.num_rows[0], one.kvend[0]

    def move(self, i: int, server: int) -> None:
        self.f["server"][i] = server

    def split(self, i: int, m: int, server: int) -> None:
        """Moves the m innermost offsets of item i to ``server`` as a new item."""
        if self.n == self.cost.shape[0]:
            for name in _FIELDS:                                # full: double the capacity
                self.f[name] = np.concatenate([self.f[name], np.zeros_like(self.f[name])])
            self.cost, self.rows, self.kvend = (np.concatenate([x, np.zeros_like(x)])
                                                for x in (self.cost, self.rows, self.kvend))
        j = self.n
        for name in _FIELDS:
            self.f[name][j] = self.f[name][i]
        self.f["server"][j] = server
        self.f["lo"][j] = self.f["hi"][i] - m
        self.f["center"][j] = False
        self.f["hi"][i] -= m
        self.n += 1
        self._refresh(i)
        self._refresh(j)

    def items(self) -> Items:
        return Items(*(self.f[name][:self.n].copy() for name in _FIELDS))


def schedule(items: Items, num_devices: int, *, eps: float = 0.1, cost: CostModel = CostModel(),
             min_rows: int = 1, two_sided: bool = True, residency: Residency | None = None,
             q_cap: int | None = None, kv_cap: int | None = None) -> ScheduleResult:
    """Moves CA-tasks between attention servers until every server is within ``eps * mean`` of the mean load.

    Phase 1 is DistCA's greedy (recipients only). Phase 2 (``two_sided``, an extension) then drains every
    server still above ``mean + eps * mean`` into the least loaded server (filling it up to at most
    ``mean + eps * mean``), with the same move rule and priority. Without it a donor keeps whatever the
    recipients' tolerance left over, which grows with the number of servers (cad.md law, eps = 0.1: max/mean
    1.6-2.7 at 512 servers x 32K tokens).

    Args:
      items: the naive placement (``Items.from_pieces``); not modified.
      num_devices: number of attention servers (= devices; in-place servers).
      eps: tolerance; a recipient stops receiving once ``mean - load <= eps * mean``.
      cost: bytes per moved query / key row (priority = bytes per moved pair).
      min_rows: smallest number of query rows a split-off task may have (a whole small item may still move).
      two_sided: run phase 2.
      residency: where each document's rows live (needed with capacities).
      q_cap, kv_cap: optional capacity of one (sender, server) all-to-all slot in query / key rows.

    Returns:
      The scheduled items, the loads before and after, and the number of moves.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    before = server_loads(items, num_devices)
    if len(items) == 0 or before.sum() == 0:
        return ScheduleResult(items.copy(), before, before.copy(), 0)
    slots = None
    if q_cap is not None or kv_cap is not None:
        if residency is None:
            raise ValueError("schedule: capacities need the residency of every document")
        big = np.iinfo(np.int64).max // 4
        slots = _Slots(items, residency, num_devices, big if q_cap is None else q_cap,
                       big if kv_cap is None else kv_cap)
    w = _Work(items)
    mean = before.mean()
    surplus = before - mean
    thr = eps * mean
    m_min = max(1, -(-min_rows // 2))
    moves = 0

    def apply(pick, r: int) -> None:
        nonlocal moves
        i, m, moved = pick
        d = int(w.server[i])
        if m is None:
            w.move(i, r)
        else:
            w.split(i, m, r)
        surplus[d] -= moved
        surplus[r] += moved
        moves += 1

    # Phase 1 (DistCA): fill each recipient, most negative first, from every donor.
    for r in np.argsort(surplus, kind="stable"):
        r = int(r)
        if surplus[r] >= 0:
            break
        while -surplus[r] > thr:
            srv = w.server
            avail = np.where(surplus[srv] > 0, np.minimum(-surplus[r], surplus[srv]), 0.0)
            pick = _best_move(w, avail, m_min, cost, slots, r)
            if pick is None:
                break
            apply(pick, r)
    # Phase 2: drain each server still above tolerance into the least loaded server.
    if two_sided:
        for d in np.argsort(-surplus, kind="stable"):
            d = int(d)
            while surplus[d] > thr:
                r = int(np.argmin(surplus))
                room = thr - surplus[r]                         # recipients may end up to mean + thr
                avail = np.where(w.server == d, min(surplus[d], room), 0.0)
                pick = _best_move(w, avail, m_min, cost, slots, r)
                if pick is None:
                    break
                apply(pick, r)
    out = w.items()
    return ScheduleResult(out, before, server_loads(out, num_devices), moves)


def _best_move(w: _Work, avail: np.ndarray, m_min: int, cost: CostModel, slots: _Slots | None, r: int):
    """(item index, m or None for a whole move, pairs moved) of the cheapest feasible move, or None.

    ``avail[i]`` is how many pairs item i's server may give to ``r`` now (0: not a candidate).
    """
    cand = np.flatnonzero(avail > 0)
    if cand.size == 0:
        return None
    c = w.cost[cand]
    av = avail[cand]
    a, b, lo, hi = w.a[cand], w.b[cand], w.lo[cand], w.hi[cand]
    whole = (c <= av) & (c > 0)
    width = (a + b + 1).astype(np.float64)
    span = hi - lo
    m = np.minimum(np.floor(np.minimum(av, c) / width), span).astype(np.int64)
    split_ok = (m >= m_min) & (span > 0)
    moved = np.where(whole, c, m * width)
    rows = np.where(whole, w.rows[cand], 2 * m)
    kvend = np.where(whole, w.kvend[cand], b - hi + m)
    feasible = (whole | split_ok) & (moved > 0)
    if not feasible.any():
        return None
    prio = np.where(feasible, (rows * cost.q_bytes + kvend * cost.kv_bytes) / np.maximum(moved, 1.0), np.inf)
    if slots is None:
        k = int(np.argmin(prio))
        return int(cand[k]), (None if whole[k] else int(m[k])), float(moved[k])
    for k in np.argsort(prio, kind="stable")[:int(feasible.sum())]:
        k, i = int(k), int(cand[k])
        doc, home = int(w.doc[i]), int(w.home[i])
        if whole[k] and slots.fits(doc, home, r, int(rows[k]), int(kvend[k])):
            slots.commit(doc, home, r, int(rows[k]), int(kvend[k]))
            return i, None, float(moved[k])
        top = int(span[k]) if whole[k] else int(m[k])
        lo_m, hi_m = 0, top                                   # largest m in [m_min, top] that fits
        while lo_m < hi_m:
            mid = (lo_m + hi_m + 1) // 2
            if mid >= m_min and slots.fits(doc, home, r, 2 * mid, int(b[k] - hi[k]) + mid):
                lo_m = mid
            else:
                hi_m = mid - 1
        if lo_m >= m_min:
            slots.commit(doc, home, r, 2 * lo_m, int(b[k] - hi[k]) + lo_m)
            return i, lo_m, float(lo_m * width[k])
    return None


# ------------------------------------------------------------------------------------------------ traffic
@dataclasses.dataclass(frozen=True)
class Traffic:
    """Rows each device sends to each server (exact: KV deduplicated per (server, document), resident rows
    not sent)."""
    q_rows: np.ndarray      # [D, D] query rows sender -> server (diagonal 0)
    kv_rows: np.ndarray     # [D, D] key rows sender -> server (diagonal 0)

    def bytes(self, cost: CostModel) -> float:
        return float(self.q_rows.sum() * cost.q_bytes + self.kv_rows.sum() * cost.kv_bytes)


def traffic(items: Items, residency: Residency, num_devices: int) -> Traffic:
    """Exact rows moved by a placement: each off-home query row once, and each key row a server needs
    (``[0, max kvend)`` of every document it computes) that it does not already hold."""
    q = np.zeros((num_devices, num_devices), np.int64)
    off = items.home != items.server
    np.add.at(q, (items.home[off], items.server[off]), items.num_rows[off])
    kv = np.zeros((num_devices, num_devices), np.int64)
    if len(items):
        key_order = np.lexsort((items.doc, items.server))
        srv, doc, end = items.server[key_order], items.doc[key_order], items.kvend[key_order]
        first = np.ones(srv.shape, bool)
        first[1:] = (srv[1:] != srv[:-1]) | (doc[1:] != doc[:-1])
        starts = np.flatnonzero(first)
        g_srv, g_doc = srv[starts], doc[starts]
        g_end = np.maximum.reduceat(end, starts)
        j = np.searchsorted(residency.doc_ids, g_doc)
        n_p = residency.ptr[j + 1] - residency.ptr[j]               # pieces per group's document
        g = np.repeat(np.arange(len(starts)), n_p)
        pi = np.repeat(residency.ptr[j], n_p) + (np.arange(n_p.sum()) - np.repeat(np.cumsum(n_p) - n_p, n_p))
        p = residency.pieces
        rows = np.clip(np.minimum(p.b[pi], g_end[g]) - p.a[pi], 0, None)
        dev = p.device[pi]
        remote = dev != g_srv[g]
        np.add.at(kv, (dev[remote], g_srv[g][remote]), rows[remote])
    return Traffic(q, kv)


def pieces_pairs(pieces: Pieces, num_devices: int) -> np.ndarray:
    """Naive per-device CA pairs of pieces (each computed where it lives)."""
    return np.bincount(pieces.device, weights=rows_pairs(pieces.a, pieces.b).astype(np.float64),
                       minlength=num_devices)
