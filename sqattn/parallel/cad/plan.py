"""From per-token (doc, pos) to a static-shape execution plan: which local rows each device sends where.

Every device holds ``L`` tokens, split into ``N`` contiguous nano-batches (ping-pong). For each nano-batch the
scheduler places CA-tasks; the plan then lists, per device ``d`` (all int32, ``-1`` = padding slot):

* ``keep[d, i, :]``          local query rows of nano-batch ``i`` that ``d`` computes itself,
* ``send_q[d, i, e, :]``     local query rows ``d`` sends to server ``e != d`` (outputs come back in this order),
* ``send_kv[d, i, e, :]``    local key rows ``d`` sends to server ``e != d``: for every document ``e`` computes,
  the rows ``[0, kvend)`` it needs, minus the rows ``e`` already holds; each key row reaches a server at most
  once, so the server's fused batch has every needed key exactly once.

Slot counts are static: bucketed to powers of two from the plan (host-planned path; bounded recompiles), or
fixed capacities that the scheduler respects (in-graph path, shapes known at trace time).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sqattn.parallel.cad import planner
from sqattn.parallel.cad.cost import CostModel


@dataclasses.dataclass(frozen=True)
class ExecPlan:
    """Static-shape all-to-all plan over ``n`` devices and ``N`` nano-batches (see the module docstring).

    Attributes:
      keep: [n, N, cap_keep] int32.  send_q: [n, N, n, cap_q] int32.  send_kv: [n, N, n, cap_kv] int32.
      loads_before, loads_after: [N, n] causal pairs per server, naive placement and scheduled.
      q_rows, kv_rows: [N, n, n] rows sent sender -> server (exact traffic of this plan).
      num_moves: scheduler moves over all nano-batches.
    """
    keep: np.ndarray
    send_q: np.ndarray
    send_kv: np.ndarray
    loads_before: np.ndarray
    loads_after: np.ndarray
    q_rows: np.ndarray
    kv_rows: np.ndarray
    num_moves: int

    @property
    def num_devices(self) -> int:
        return int(self.keep.shape[0])

    @property
    def nano_batches(self) -> int:
        return int(self.keep.shape[1])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.keep, self.send_q, self.send_kv

    def bytes_moved(self, cost: CostModel) -> float:
        return float(self.q_rows.sum() * cost.q_bytes + self.kv_rows.sum() * cost.kv_bytes)

    @property
    def caps(self) -> tuple[int, int, int]:
        return int(self.keep.shape[-1]), int(self.send_q.shape[-1]), int(self.send_kv.shape[-1])

    def padded(self, caps: tuple[int, int, int]) -> "ExecPlan":
        """The same plan with larger slot counts (so several plans share one compiled program)."""
        if any(c < have for c, have in zip(caps, self.caps)):
            raise ValueError(f"padded: caps {caps} below the plan's {self.caps}")

        def pad(x, cap):
            return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, cap - x.shape[-1])], constant_values=-1)

        return dataclasses.replace(self, keep=pad(self.keep, caps[0]), send_q=pad(self.send_q, caps[1]),
                                   send_kv=pad(self.send_kv, caps[2]))


def nano_bounds(length: int, nano_batches: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) local row ranges of the nano-batches (sizes differ by at most one)."""
    if nano_batches < 1 or nano_batches > max(length, 1):
        raise ValueError(f"need 1 <= nano_batches <= local tokens ({length}), got {nano_batches}")
    edges = np.linspace(0, length, nano_batches + 1).round().astype(int)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(nano_batches)]


def bucket(n: int, minimum: int = 8) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


class _Lookup:
    """(device, doc, pos) -> local row index, by binary search over each device's sorted keys."""

    def __init__(self, doc: np.ndarray, pos: np.ndarray):
        self.stride = int(pos.max(initial=0)) + 1
        self.keys, self.order = [], []
        for d in range(doc.shape[0]):
            key = np.where(doc[d] >= 0, doc[d].astype(np.int64) * self.stride + pos[d], -1)
            order = np.argsort(key, kind="stable")
            self.keys.append(key[order])
            self.order.append(order)

    def __call__(self, device: int, doc: int, positions: np.ndarray) -> np.ndarray:
        want = doc * self.stride + positions
        k = np.searchsorted(self.keys[device], want)
        if np.any(k >= len(self.keys[device])) or np.any(self.keys[device][np.minimum(k, len(self.keys[device]) - 1)]
                                                          != want):
            raise ValueError(f"plan: doc {doc} rows {positions[:4]}... are not on device {device}")
        return self.order[device][k]


def plan_tokens(doc: np.ndarray, pos: np.ndarray, *, nano_batches: int = 2, eps: float = 0.1,
                cost: CostModel = CostModel(), min_rows: int = 1, balance: bool = True,
                two_sided: bool = True, caps: tuple[int, int, int] | None = None) -> ExecPlan:
    """Schedules CA-tasks for every nano-batch and compiles the all-to-all plan.

    Args:
      doc: [n, L] global document id of each token on each device (``< 0``: padding, neither query nor key).
      pos: [n, L] position of each token within its document (absolute: pieces of a split document keep
        their positions).
      nano_batches: N, the ping-pong split of each device's tokens (contiguous local ranges).
      eps, cost, min_rows, two_sided: scheduler settings (``planner.schedule``).
      balance: False gives the naive placement (every query row computed at home; key rows of documents that
        cross devices are still sent where needed).
      caps: fixed (cap_keep, cap_q, cap_kv) slot counts, respected by the scheduler; None buckets the
        counts of the plan to powers of two.

    Returns:
      The ``ExecPlan``.
    """
    doc = np.asarray(doc)
    pos = np.asarray(pos)
    if doc.shape != pos.shape or doc.ndim != 2:
        raise ValueError(f"doc and pos must both be [devices, tokens], got {doc.shape} and {pos.shape}")
    n, length = doc.shape
    bounds = nano_bounds(length, nano_batches)
    residency = planner.Residency.from_pieces(
        planner.Pieces.concat([planner.token_pieces(doc[d], pos[d], d) for d in range(n)]))
    lookup = _Lookup(doc, pos)
    keep = [[[] for _ in bounds] for _ in range(n)]
    send_q = [[[[] for _ in range(n)] for _ in bounds] for _ in range(n)]
    send_kv = [[[[] for _ in range(n)] for _ in bounds] for _ in range(n)]
    loads_before = np.zeros((nano_batches, n))
    loads_after = np.zeros((nano_batches, n))
    q_rows = np.zeros((nano_batches, n, n), np.int64)
    kv_rows = np.zeros((nano_batches, n, n), np.int64)
    moves = 0
    for i, (lo, hi) in enumerate(bounds):
        pieces = planner.Pieces.concat([planner.token_pieces(doc[d, lo:hi], pos[d, lo:hi], d) for d in range(n)])
        items = planner.Items.from_pieces(pieces)
        if balance:
            kw = {} if caps is None else dict(residency=residency, q_cap=caps[1], kv_cap=caps[2])
            res = planner.schedule(items, n, eps=eps, cost=cost, min_rows=min_rows, two_sided=two_sided, **kw)
            items, moves = res.items, moves + res.num_moves
        loads_before[i] = planner.pieces_pairs(pieces, n)
        loads_after[i] = planner.server_loads(items, n)
        tr = planner.traffic(items, residency, n)
        q_rows[i], kv_rows[i] = tr.q_rows, tr.kv_rows
        need: dict[tuple[int, int], int] = {}
        for j in range(len(items)):
            d, e, dj = int(items.home[j]), int(items.server[j]), int(items.doc[j])
            rows = lookup(d, dj, items.rows(j))
            (keep[d][i] if d == e else send_q[d][i][e]).append(rows)
            need[(e, dj)] = max(need.get((e, dj), 0), int(items.kvend[j]))
        for (e, dj), end in sorted(need.items()):
            k = int(np.searchsorted(residency.doc_ids, dj))
            for p in range(residency.ptr[k], residency.ptr[k + 1]):
                src = int(residency.pieces.device[p])
                a, b = int(residency.pieces.a[p]), min(int(residency.pieces.b[p]), end)
                if src != e and b > a:
                    send_kv[src][i][e].append(lookup(src, dj, np.arange(a, b)))
    flat = lambda lists: [np.concatenate(x) if x else np.zeros((0,), np.int64) for x in lists]  # noqa: E731
    keep = [flat(k) for k in keep]
    send_q = [[flat(x) for x in s] for s in send_q]
    send_kv = [[flat(x) for x in s] for s in send_kv]
    need_keep = max(len(x) for k in keep for x in k)
    need_q = max(len(x) for s in send_q for t in s for x in t)
    need_kv = max(len(x) for s in send_kv for t in s for x in t)
    if caps is None:
        cap_keep, cap_q, cap_kv = bucket(need_keep), bucket(need_q), bucket(need_kv)
    else:
        cap_keep, cap_q, cap_kv = caps
        if need_keep > cap_keep or need_q > cap_q or need_kv > cap_kv:
            raise ValueError(f"plan needs ({need_keep}, {need_q}, {need_kv}) (keep, query, key) slots, over the "
                             f"capacities {caps}")

    def pad(rows: np.ndarray, cap: int) -> np.ndarray:
        out = np.full((cap,), -1, np.int32)
        out[:len(rows)] = rows
        return out

    keep_a = np.stack([np.stack([pad(x, cap_keep) for x in k]) for k in keep])
    send_q_a = np.stack([np.stack([np.stack([pad(x, cap_q) for x in t]) for t in s]) for s in send_q])
    send_kv_a = np.stack([np.stack([np.stack([pad(x, cap_kv) for x in t]) for t in s]) for s in send_kv])
    return ExecPlan(keep_a, send_q_a, send_kv_a, loads_before, loads_after, q_rows, kv_rows, moves)
