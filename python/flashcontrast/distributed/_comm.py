"""Shared communication helpers for ``flashcontrast.distributed``.

Every public loss starts with :func:`setup`: local input checks, then one small all-gather
of per-rank metadata (check status, N, D, dtype, flags: bias present | groups present) so
that a bad setup fails on EVERY rank with the same clear error instead of hanging in a
later collective. The shard sizes learned there let ranks hold uneven shards.

Byte accounting: each helper adds to a per-process counter what this rank puts on the
wire under the bandwidth-optimal (ring) algorithm for that collective: all-gather of a
c-byte chunk: (W - 1) c; reduce-scatter of W chunks of c bytes: (W - 1) c; all-reduce of
M bytes: 2 (W - 1) / W * M; point-to-point: the bytes sent; all-to-all
(:func:`all_to_all_rows`): the bytes of the chunks this rank sends to OTHER ranks (its
chunk for itself is a local copy and is not counted; what it receives is counted by the
senders). Read it with :func:`comm_bytes`, reset it with :func:`reset_comm_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .._validation import FEATURE_DTYPES, as_scalar_tensor, check_features, check_pair
from ..objectives.clip import _check_groups

_SENT = {"bytes": 0}


def comm_bytes() -> int:
    """Bytes this process has sent through ``flashcontrast.distributed`` since the last
    :func:`reset_comm_bytes` (ring-algorithm equivalents for collectives, see module doc)."""
    return _SENT["bytes"]


def reset_comm_bytes() -> None:
    """Set the counter read by :func:`comm_bytes` to 0."""
    _SENT["bytes"] = 0


@dataclass
class Layout:
    """Where this rank's shard sits in the global batch."""

    group: Optional[dist.ProcessGroup]
    rank: int
    world: int
    sizes: list
    device: torch.device

    @property
    def offsets(self) -> list:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return out

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return self.offsets[self.rank]

    @property
    def n_max(self) -> int:
        return max(self.sizes)

    def global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)


def check_backend(name: str, backend: str) -> None:
    """The distributed losses run their local tiles as blockwise PyTorch only."""
    if backend not in ("auto", "torch"):
        raise ValueError(
            f"flashcontrast.distributed.{name} runs its tiles as blockwise PyTorch: "
            f"backend must be 'auto' or 'torch', got {backend!r}"
        )


def _backend_devices(group: Optional[dist.ProcessGroup]) -> set:
    """The device types the group's backend serves: {"cuda"} for NCCL ("cuda:nccl"),
    {"cpu", "cuda"} for gloo, both for a mixed "cpu:gloo,cuda:nccl" group."""
    get_config = getattr(dist, "get_backend_config", None)
    config = str(get_config(group) if get_config is not None else dist.get_backend(group))
    if ":" not in config:  # a plain backend name (torch without get_backend_config)
        return {"cuda"} if config == "nccl" else {"cpu", "cuda"}
    return {pair.split(":")[0] for pair in config.split(",")}


def _meta_device(
    group: Optional[dist.ProcessGroup], device: Optional[torch.device]
) -> torch.device:
    """Where the metadata all-gather runs, given this rank's feature ``device`` (None when
    its inputs failed the checks). The CPU whenever the backend serves it (gloo, or a
    mixed "cpu:gloo,cuda:nccl" group: every rank then picks the CPU, whatever its inputs,
    instead of some ranks the CPU and others the GPU); otherwise (NCCL) the features'
    GPU, so that the group's communicator is created on the device every later
    collective and point-to-point batch uses (the current device may differ when
    ``torch.cuda.set_device`` was not called: every rank on cuda:0 fails NCCL's init),
    and the current CUDA device on a rank whose inputs are unusable."""
    served = _backend_devices(group)
    if "cpu" in served:
        return torch.device("cpu")
    if device is not None and device.type in served:
        return device
    if "cuda" in served:
        return torch.device("cuda", torch.cuda.current_device())
    return device if device is not None else torch.device("cpu")


def _check_served(group: Optional[dist.ProcessGroup], device: torch.device) -> None:
    """Raise a ValueError if the group's backend cannot communicate tensors on
    ``device`` (e.g. CPU features over NCCL), before any collective on them."""
    served = _backend_devices(group)
    if device.type not in served:
        raise ValueError(
            f"the features are on {device}, but the process group's backend "
            f"({dist.get_backend(group)}) serves {sorted(served)} tensors only"
        )


def setup(
    name: str,
    image_features: object,
    text_features: object,
    logit_scale: object,
    logit_bias: object,
    group: Optional[dist.ProcessGroup],
    strategy: str,
    grad_scaling: str,
    groups: object = None,
) -> tuple:
    """Check the local inputs, exchange metadata, and raise the same error on every rank
    if any rank's inputs are bad or the ranks disagree. Returns (layout, a, b, scale, bias).

    ``groups``: optional (n_r,) int32/int64 ids of this rank's samples (checked like
    :func:`flashcontrast.clip_loss`'s, against this rank's n_r; the caller uses it as
    given once this returns). Given on some ranks only raises on every rank. Its presence
    shares the flags field with the bias (bit 0 bias, bit 1 groups), so the metadata stays
    5 int64 (40 bytes) per rank with or without groups."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"flashcontrast.distributed.{name} needs an initialized default process group "
            f"(torch.distributed.init_process_group); use flashcontrast.{name} in one process"
        )
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    err: Optional[Exception] = None
    a = b = scale = bias = None
    try:
        if strategy not in ("gather", "ring"):
            raise ValueError(f"strategy must be 'gather' or 'ring', got {strategy!r}")
        if grad_scaling not in ("ddp", "sum"):
            raise ValueError(f"grad_scaling must be 'ddp' or 'sum', got {grad_scaling!r}")
        a = check_features("image_features", image_features)
        b = check_features("text_features", text_features)
        check_pair("image_features", a, "text_features", b)
        scale = as_scalar_tensor("logit_scale", logit_scale, a)
        bias = as_scalar_tensor("logit_bias", logit_bias, a, required=False)
        _check_groups(groups, a)
        _check_served(group, a.device)
    except (TypeError, ValueError) as e:
        err = e
    ok = err is None
    flags = int(bias is not None) | (int(groups is not None) << 1)
    meta = torch.tensor(
        [
            0 if ok else 1,
            a.shape[0] if ok else 0,
            a.shape[1] if ok else 0,
            FEATURE_DTYPES.index(a.dtype) if ok else -1,
            flags if ok else -1,
        ],
        dtype=torch.int64,
        device=_meta_device(group, a.device if ok else None),
    )
    if world > 1:
        parts = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(parts, meta, group=group)
        _SENT["bytes"] += (world - 1) * meta.numel() * meta.element_size()
        table = torch.stack(parts).cpu().tolist()
    else:
        table = [meta.cpu().tolist()]
    prefix = f"flashcontrast.distributed.{name}: "
    if err is not None:
        raise type(err)(f"{prefix}{err} (rank {rank}; every rank of the group raises)") from err
    bad = [q for q, row in enumerate(table) if row[0] != 0]
    if bad:
        raise RuntimeError(
            f"{prefix}the inputs on rank(s) {bad} failed their checks (the error is raised "
            "there); every rank of the group raises"
        )
    dims = [row[2] for row in table]
    if len(set(dims)) != 1:
        raise ValueError(
            f"{prefix}every rank must pass the same feature dimension D; got D = {dims} "
            "on ranks 0..W-1"
        )
    dtypes = [FEATURE_DTYPES[row[3]] for row in table]
    if len(set(dtypes)) != 1:
        raise TypeError(
            f"{prefix}every rank must pass features of the same dtype; got {dtypes} on ranks 0..W-1"
        )
    for bit, what in ((0, "logit_bias"), (1, "groups")):
        given = [(row[4] >> bit) & 1 for row in table]
        if len(set(given)) != 1:
            raise ValueError(
                f"{prefix}{what} must be given on every rank or on none; given on ranks "
                f"{[q for q, x in enumerate(given) if x]}"
            )
    layout = Layout(group, rank, world, [row[1] for row in table], a.device)
    return layout, a, b, scale, bias


def all_gather_rows(x: Tensor, lay: Layout) -> Tensor:
    """The (N, ...) concatenation of every rank's (n_q, ...) ``x`` in rank order. Shards
    are padded to n_max rows for the collective (uneven sizes), then trimmed."""
    if lay.world == 1:
        return x
    pad = x.new_zeros((lay.n_max, *x.shape[1:]))
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(lay.world)]
    dist.all_gather(parts, pad, group=lay.group)
    _SENT["bytes"] += (lay.world - 1) * pad.numel() * pad.element_size()
    return torch.cat([p[:s] for p, s in zip(parts, lay.sizes)])


def reduce_scatter_rows(full: Tensor, lay: Layout) -> Tensor:
    """Sum ``full`` (N, ...) over ranks and return this rank's rows (n_r, ...): a
    reduce-scatter over shards padded to n_max rows (uneven sizes)."""
    if lay.world == 1:
        return full
    chunks = []
    for off, s in zip(lay.offsets, lay.sizes):
        c = full.new_zeros((lay.n_max, *full.shape[1:]))
        c[:s] = full[off : off + s]
        chunks.append(c)
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=lay.group)
    _SENT["bytes"] += (lay.world - 1) * out.numel() * out.element_size()
    return out[: lay.sizes[lay.rank]]


def all_reduce(x: Tensor, lay: Layout, op=dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce of ``x`` (returned)."""
    if lay.world > 1:
        dist.all_reduce(x, op=op, group=lay.group)
        _SENT["bytes"] += int(2 * (lay.world - 1) / lay.world * x.numel() * x.element_size())
    return x


def all_to_all_rows(
    x: Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], lay: Layout
) -> Tensor:
    """Personalized exchange of rows (uneven counts): ``x`` (sum(send_counts), ...) holds
    the rows for group rank 0, then rank 1, ...; returns (sum(recv_counts), ...): the rows
    from rank 0, then rank 1, ... (every rank's ``send_counts[q]`` must equal rank q's
    ``recv_counts[r]``). Counted: the rows sent to the other ranks (module doc)."""
    if lay.world == 1:
        return x
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(
        out, x.contiguous(), list(recv_counts), list(send_counts), group=lay.group
    )
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    _SENT["bytes"] += (sum(send_counts) - send_counts[lay.rank]) * row_bytes
    return out


def _exchange(lay: Layout, send: Sequence[Tensor], recv: Sequence[Tensor], tag: int) -> list:
    """Post sends of ``send`` to the right neighbour and receives of ``recv`` from the
    left one; returns the requests to wait on."""
    right = lay.global_rank((lay.rank + 1) % lay.world)
    left = lay.global_rank((lay.rank - 1) % lay.world)
    ops = [dist.P2POp(dist.isend, t, right, lay.group, tag + i) for i, t in enumerate(send)]
    ops += [dist.P2POp(dist.irecv, t, left, lay.group, tag + i) for i, t in enumerate(recv)]
    _SENT["bytes"] += sum(t.numel() * t.element_size() for t in send)
    return dist.batch_isend_irecv(ops)


def ring_pass(
    lay: Layout,
    travel: Sequence[Tensor],
    visit: Callable[[int, Sequence[Tensor]], Optional[Tensor]],
    combine: Callable[[Tensor, Tensor], Tensor],
) -> Optional[Tensor]:
    """Visit every rank's shard of ``travel`` (own first), passing shards to the right.

    ``travel``: this rank's tensors (n_r, ...) that every rank must see (rank q's arrive
    with n_q rows). ``visit(q, tensors)`` computes with rank q's shard and returns a
    per-shard contribution (n_q, ...) or None. Contributions to a shard are folded with
    ``combine`` while they travel behind it, and arrive back at the owner after W - 1
    hops; the return value is the complete fold for this rank's shard (None when visit
    returns None). At most two foreign shards (the one in use and the one arriving) are
    held at once. Feature transfers are posted before the compute on the current shard,
    so they overlap it; the accumulator, which the compute changes, is sent after it.
    """
    w, r = lay.world, lay.rank
    cur = [t.contiguous() for t in travel]
    own = None
    acc_in: Optional[Tensor] = None
    for k in range(w):
        q = (r - k) % w
        nxt, reqs = None, []
        if k < w - 1:
            src = (r - k - 1) % w
            nxt = [t.new_empty((lay.sizes[src], *t.shape[1:])) for t in cur]
            reqs = _exchange(lay, cur, nxt, tag=0)
        contrib = visit(q, cur)
        if k == 0:
            own = contrib
        elif contrib is not None:
            acc = contrib if k == 1 else combine(acc_in, contrib)
            dst = (r - k - 1) % w  # the shard whose accumulator arrives next (own at the end)
            acc_in = acc.new_empty((lay.sizes[dst], *acc.shape[1:]))
            for req in _exchange(lay, [acc.contiguous()], [acc_in], tag=16):
                req.wait()
        for req in reqs:
            req.wait()
        if nxt is not None:
            cur = nxt
    if own is None or w == 1:
        return own
    return combine(own, acc_in)


# ----------------------------------------------------------------------------- generic setup
# (used by the multi-view, GRAM and Symile losses; clip/siglip keep :func:`setup`)


def setup_checked(
    name: str,
    group: Optional[dist.ProcessGroup],
    strategy: str,
    grad_scaling: str,
    fields: Sequence[str],
    check: Callable[[], tuple],
    ring: bool = True,
) -> tuple:
    """Generic :func:`setup`: ``check()`` validates this rank's inputs and returns
    ``(payload, n, d, dtype, device, values)``, ``values`` one int per name in ``fields``
    (they must agree across ranks, e.g. the number of views). One all-gather of
    (status, n, d, dtype code, strategy code, scaling code, *values); a failed local check
    (TypeError, ValueError, NotImplementedError) raises there and a RuntimeError on every
    other rank; disagreeing D, dtype, strategy, grad_scaling or ``fields`` raise on every
    rank. ``ring=False``: strategy="ring" raises NotImplementedError. Returns
    (layout, payload)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"flashcontrast.distributed.{name} needs an initialized default process group "
            f"(torch.distributed.init_process_group); use flashcontrast.{name} in one process"
        )
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    err: Optional[Exception] = None
    payload, row = None, None
    device = torch.device("cpu")
    try:
        if strategy not in ("gather", "ring"):
            raise ValueError(f"strategy must be 'gather' or 'ring', got {strategy!r}")
        if grad_scaling not in ("ddp", "sum"):
            raise ValueError(f"grad_scaling must be 'ddp' or 'sum', got {grad_scaling!r}")
        if strategy == "ring" and not ring:
            raise NotImplementedError(
                f'strategy="ring" is not implemented for {name}; use strategy="gather"'
            )
        payload, n, d, dtype, device, values = check()
        _check_served(group, device)
        row = [0, n, d, FEATURE_DTYPES.index(dtype), ("gather", "ring").index(strategy)]
        row += [("ddp", "sum").index(grad_scaling), *[int(v) for v in values]]
    except (TypeError, ValueError, NotImplementedError) as e:
        err = e
    if row is None:
        row = [1] + [0] * (5 + len(fields))
    meta_dev = _meta_device(group, device if err is None else None)
    meta = torch.tensor(row, dtype=torch.int64, device=meta_dev)
    if world > 1:
        parts = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(parts, meta, group=group)
        _SENT["bytes"] += (world - 1) * meta.numel() * meta.element_size()
        table = torch.stack(parts).cpu().tolist()
    else:
        table = [meta.cpu().tolist()]
    prefix = f"flashcontrast.distributed.{name}: "
    if err is not None:
        raise type(err)(f"{prefix}{err} (rank {rank}; every rank of the group raises)") from err
    bad = [q for q, r in enumerate(table) if r[0] != 0]
    if bad:
        raise RuntimeError(
            f"{prefix}the inputs on rank(s) {bad} failed their checks (the error is raised "
            "there); every rank of the group raises"
        )
    labels = ["feature dimension D", "dtype", "strategy", "grad_scaling", *fields]
    for col, label in zip(range(2, 6 + len(fields)), labels):
        vals = [r[col] for r in table]
        if len(set(vals)) != 1:
            if label == "dtype":
                shown = [FEATURE_DTYPES[v] for v in vals]
                raise TypeError(
                    f"{prefix}every rank must pass features of the same dtype; got {shown} "
                    "on ranks 0..W-1"
                )
            if label == "feature dimension D":
                raise ValueError(
                    f"{prefix}every rank must pass the same feature dimension D; got D = "
                    f"{vals} on ranks 0..W-1"
                )
            raise ValueError(
                f"{prefix}every rank must pass the same {label}; got {vals} on ranks 0..W-1"
            )
    return Layout(group, rank, world, [r[1] for r in table], device), payload


def broadcast(x: Tensor, lay: Layout, src: int = 0) -> Tensor:
    """In-place broadcast of ``x`` from group rank ``src`` (returned). Counted as M bytes
    on every rank (a pipelined chain: each rank but the last forwards the M bytes)."""
    if lay.world > 1:
        dist.broadcast(x, src=lay.global_rank(src), group=lay.group)
        _SENT["bytes"] += x.numel() * x.element_size()
    return x


def mean_upstream(grad_loss: Tensor, lay: Layout, dtype: torch.dtype) -> Tensor:
    """The upstream gradient averaged over ranks (0-d): every rank differentiates the
    same function."""
    g = all_reduce(grad_loss.detach().to(dtype).reshape(1).clone(), lay)
    return g[0] / lay.world


def lse_all_reduce(part: Tensor, extra: Tensor, lay: Layout) -> tuple:
    """Combine partial logsumexps ``part`` (m,) over ranks (max, then the sum of
    exponentials) and sum ``extra`` (k,) along in the second all-reduce. Returns
    (lse (m,), summed extra (k,))."""
    mx = all_reduce(part.clone(), lay, dist.ReduceOp.MAX)
    packed = torch.cat([(part - mx).exp_(), extra])
    all_reduce(packed, lay)
    m = part.shape[0]
    return mx + packed[:m].log(), packed[m:]
