"""Shared communication helpers for ``flashcontrast.distributed``.

Every public loss starts with :func:`setup_checked` (:func:`setup` for the two-tower
losses): this rank's local input checks, then ONE small all-gather of per-rank metadata,
7 + F int64 per rank: check status, n_r, D, dtype, strategy, grad_scaling and backend
codes, then F objective-specific fields (logit_bias / groups given or not, the number of
views, K, M, label_smoothing, the permutations' checksum, ...). Whatever this rank's
checks raise, the exchange still happens, so a bad setup on one rank (a failed check, or
arguments the ranks disagree on) fails on EVERY rank with a clear error instead of
hanging in a later collective. The shard sizes learned there let ranks hold uneven
shards, empty ones included (the global batch must not be empty).

Byte accounting: each helper adds to a per-process counter what this rank puts on the
wire under the bandwidth-optimal (ring) algorithm for that collective: all-gather of a
c-byte chunk: (W - 1) c; reduce-scatter of W chunks of c bytes: (W - 1) c; all-reduce of
M bytes: 2 (W - 1) / W * M; point-to-point: the bytes sent; all-to-all
(:func:`all_to_all_rows`): the bytes of the chunks this rank sends to OTHER ranks (its
chunk for itself is a local copy and is not counted; what it receives is counted by the
senders). The metadata all-gather is (W - 1) 8 (7 + F) bytes. Read the counter with
:func:`comm_bytes`, reset it with :func:`reset_comm_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, TypedDict, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _dispatch
from .._amp import autocast_off
from .._keywords import check_keywords
from .._validation import FEATURE_DTYPES, as_scalar_tensor, check_features, check_pair
from ..backends.blockwise import block_rows
from ..objectives.clip import _check_groups

_SENT = {"bytes": 0}


class ProcessGroupOptions(TypedDict, total=False):
    """The keywords every process-group loss takes (``**options``), defaults in
    :class:`Options`:

    group: the torch.distributed process group; None: the default group.
    strategy: "gather" (all-gather the columns) or "ring" (pass them around the ring);
        the losses that only gather say so.
    backend: the local tiles' backend, as the single-process functions take it: "auto",
        "torch", "triton", "cuda" or "reference" (the same on every rank).
    grad_scaling: "ddp" (each rank's feature gradients are W x the single-process ones,
        so that DDP's averaging over W ranks gives them) or "sum" (1 x).
    """

    group: Optional[dist.ProcessGroup]
    strategy: str
    backend: str
    grad_scaling: str


class Options(NamedTuple):
    """A process-group loss's options with their defaults (:class:`ProcessGroupOptions`)."""

    group: Optional[dist.ProcessGroup] = None
    strategy: str = "gather"
    backend: str = "auto"
    grad_scaling: str = "ddp"


def options(name: str, given: dict) -> Options:
    """``given`` (a loss's ``**options``) with the defaults filled in; a keyword that is
    not an option raises the TypeError Python raises for a ``def``'s unknown keyword."""
    check_keywords(name, given, Options._fields)
    return Options(**given)


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


# ----------------------------------------------------------------------------- local checks
# The distributed versions of the single-process input checks: the same errors, except
# that a shard may be empty (n_r = 0 rows: the last, uneven batch of an epoch), which the
# single-process losses reject. Layouts other than dense strided (sparse, mkldnn, nested)
# are rejected here too, before the exchange, instead of failing in a later collective
# on one rank only.


def check_dense(name: str, x: Tensor) -> Tensor:
    """Raise a TypeError unless the tensor ``x`` is dense (strided layout, not nested)."""
    if x.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    return x


def check_shard(name: str, x: object) -> Tensor:
    """``x`` if it is a dense floating (n_r, D) tensor with D >= 1, else raise: the
    single-process ``check_features``, with n_r = 0 (an empty shard) allowed."""
    return check_features(name, x, dense=check_dense, empty_ok=True)


def scalar(name: str, value: object, like: Tensor, required: bool = True) -> Optional[Tensor]:
    """``as_scalar_tensor`` with dense tensors only."""
    if isinstance(value, Tensor):
        check_dense(name, value)
    return as_scalar_tensor(name, value, like, required=required)


def exchange_backward(fn: Callable) -> staticmethod:
    """The decorators of a process-group ``autograd.Function``'s backward: a staticmethod
    run with autocast off and ``once_differentiable`` (a double backward raises: the
    exchanges are not differentiable)."""
    return staticmethod(once_differentiable(autocast_off(fn)))


def tile_rows(n: int, m: int, device: torch.device, max_elements: Optional[int] = None) -> int:
    """Rows per (rows x m) block for n local rows against m columns (the blockwise
    backend's budget); m = 0 (a visiting empty shard): one block of all n rows, which
    holds no elements."""
    return block_rows(m, device, max_elements) if m > 0 else max(n, 1)


# ----------------------------------------------------------------------------- setup

STRATEGIES = ("gather", "ring")
GRAD_SCALINGS = ("ddp", "sum")
# Every backend name the setup exchange can carry (its index is the code); each loss
# accepts a subset: CLIP, SigLIP, the multi-view losses and Symile run their tiles on the
# pair engine of any backend (ENGINE_BACKENDS, "reference" meaning the float64-capable
# "torch" tiles; Symile "n_squared" any of them too, on its own symile_n2 tiles), GRAM as
# blockwise PyTorch (TORCH_BACKENDS).
BACKENDS = ("auto", "torch", "triton", "cuda", "reference")
ENGINE_BACKENDS = BACKENDS
TORCH_BACKENDS = ("auto", "torch")
_MESSAGE_BYTES = 1024  # per rank, exchanged only when some rank's checks failed

Field = Union[str, tuple]


def _check_modes(
    name: str, strategy: object, grad_scaling: object, backend: object, ring: bool,
    backends: Sequence[str],
):  # fmt: skip
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be 'gather' or 'ring', got {strategy!r}")
    if grad_scaling not in GRAD_SCALINGS:
        raise ValueError(f"grad_scaling must be 'ddp' or 'sum', got {grad_scaling!r}")
    if backend not in backends:
        if tuple(backends) == TORCH_BACKENDS:
            raise ValueError(
                f"backend must be 'auto' or 'torch' ({name} runs its tiles as blockwise "
                f"PyTorch), got {backend!r}"
            )
        raise ValueError(
            f"backend must be 'auto', 'torch', 'triton', 'cuda' or 'reference', got {backend!r}"
        )
    if strategy == "ring" and not ring:
        raise NotImplementedError(
            f'strategy="ring" is not implemented for {name}; use strategy="gather"'
        )


def _all_gather_host(row: Tensor, group: Optional[dist.ProcessGroup], world: int) -> list:
    """Every rank's ``row`` (1-D, same shape on every rank), as host lists in rank order."""
    if world == 1:
        return [row.cpu().tolist()]
    parts = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(parts, row, group=group)
    _SENT["bytes"] += (world - 1) * row.numel() * row.element_size()
    return torch.stack(parts).cpu().tolist()


def _exchange_messages(
    err: Optional[BaseException], group: Optional[dist.ProcessGroup], world: int, device
) -> list:
    """Every rank's error text ("" where its checks passed; the first
    ``_MESSAGE_BYTES`` bytes of "Type: message"), so that every rank's error names the
    failed argument. Run (by every rank) only when some rank's checks failed."""
    text = "" if err is None else f"{type(err).__name__}: {err}"
    data = text.encode("utf-8", "replace")[:_MESSAGE_BYTES]
    buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    rows = _all_gather_host(buf.to(device), group, world)
    return [bytes(r).rstrip(b"\0").decode("utf-8", "replace") for r in rows]


def _reraise(err: BaseException, prefix: str, rank: int):
    """Raise this rank's failed-check error again, prefixed with the loss's name (the
    same exception type; the original itself when that type cannot take a message)."""
    msg = f"{prefix}{err} (rank {rank}; every rank of the group raises)"
    try:
        new = type(err)(msg)
    except Exception:
        raise err from None
    raise new from err


def _label(field: Field) -> str:
    return field if isinstance(field, str) else field[0]


def _decoded(field: Field, vals: list) -> list:
    return vals if isinstance(field, str) else [field[1](v) for v in vals]


def setup_checked(
    name: str,
    group: Optional[dist.ProcessGroup],
    strategy: str,
    grad_scaling: str,
    backend: str,
    fields: Sequence[Field],
    check: Callable[[], tuple],
    ring: bool = True,
    backends: Sequence[str] = TORCH_BACKENDS,
) -> tuple:
    """Check this rank's arguments, exchange metadata, and raise the same error on every
    rank if any rank's arguments are bad or the ranks disagree. Returns (layout, payload).

    ``check()`` validates this rank's inputs and returns ``(payload, n, d, dtype,
    device, values)``: ``values`` one int per entry of ``fields``, which must agree
    across ranks. A field is a label (``"number of views V"``), or (label, decode) where
    ``decode(int)`` shows the value in the error; a label ending in " given" is a
    presence flag ("logit_bias given": 1 or 0). One all-gather of 7 + F int64 per rank
    (status, n, d, dtype code, strategy, grad_scaling and backend codes, *values), also
    when ``check`` (or the strategy / grad_scaling / backend checks) raised ANY
    exception: then this rank re-raises it and every other rank raises a RuntimeError
    naming the failed rank(s) and their errors (a second, failure-only all-gather of
    the error texts). Disagreeing D, dtype (TypeError), strategy, grad_scaling, backend
    or ``fields`` raise on every rank (ValueError), as does an empty global batch (every
    rank's n = 0; one rank's n = 0 is an empty shard, allowed). ``ring=False``:
    strategy="ring" raises NotImplementedError. ``backends``: the backend names this loss
    accepts (others fail the local checks)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"flashcontrast.distributed.{name} needs an initialized default process group "
            f"(torch.distributed.init_process_group); use flashcontrast.{name} in one process"
        )
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    err: Optional[Exception] = None
    payload, device = None, None
    try:
        _check_modes(name, strategy, grad_scaling, backend, ring, backends)
        payload, n, d, dtype, device, values = check()
        _check_served(group, device)
        values = [int(v) for v in values]
        if len(values) != len(fields):
            raise RuntimeError(f"internal: {len(values)} values for {len(fields)} fields")
        codes = [STRATEGIES.index(strategy), GRAD_SCALINGS.index(grad_scaling)]
        row = [0, int(n), int(d), FEATURE_DTYPES.index(dtype), *codes, BACKENDS.index(backend)]
        row += values
    except Exception as e:  # any exception: the exchange must still happen
        err, payload, device = e, None, None
        row = [1] + [0] * (6 + len(fields))
    meta_dev = _meta_device(group, device)
    table = _all_gather_host(torch.tensor(row, dtype=torch.int64, device=meta_dev), group, world)
    prefix = f"flashcontrast.distributed.{name}: "
    bad = [q for q, r in enumerate(table) if r[0] != 0]
    if bad:
        texts = _exchange_messages(err, group, world, meta_dev)
        if err is not None:
            _reraise(err, prefix, rank)
        detail = "; ".join(f"rank {q}: {texts[q]}" for q in bad)
        raise RuntimeError(
            f"{prefix}the inputs on rank(s) {bad} failed their checks (the error is raised "
            f"there); every rank of the group raises. {detail}"
        )
    columns: list = [
        "feature dimension D",
        ("dtype", FEATURE_DTYPES.__getitem__),
        ("strategy", STRATEGIES.__getitem__),
        ("grad_scaling", GRAD_SCALINGS.__getitem__),
        ("backend", BACKENDS.__getitem__),
        *fields,
    ]
    for col, field in enumerate(columns, start=2):
        vals = [r[col] for r in table]
        if len(set(vals)) == 1:
            continue
        label = _label(field)
        if label == "dtype":
            raise TypeError(
                f"{prefix}every rank must pass features of the same dtype; got "
                f"{_decoded(field, vals)} on ranks 0..W-1"
            )
        if label.endswith(" given"):
            what = label[: -len(" given")]
            raise ValueError(
                f"{prefix}{what} must be given on every rank or on none; given on ranks "
                f"{[q for q, x in enumerate(vals) if x]}"
            )
        shown = "D = " if label == "feature dimension D" else ""
        raise ValueError(
            f"{prefix}every rank must pass the same {label}; got {shown}"
            f"{_decoded(field, vals)} on ranks 0..W-1"
        )
    sizes = [r[1] for r in table]
    if sum(sizes) == 0:
        raise ValueError(
            f"{prefix}the global batch is empty: every rank passed 0 rows (N = 0), the loss "
            "is undefined (every rank of the group raises)"
        )
    return Layout(group, rank, world, sizes, device), payload


def engine_backend(
    objective: str, backend: str, like: Tensor, variant: Optional[str] = None
) -> str:
    """The pair-engine backend ("torch", "triton" or "cuda") the local tiles of
    ``objective`` ("clip", "siglip", "multiview", "symile": the names
    ``flashcontrast._dispatch`` knows) run on for features like ``like``:
    ``flashcontrast._dispatch.resolve`` of ``backend`` ("reference" runs the
    float64-capable "torch" tiles). Raises as the single-process losses do: RuntimeError
    (with the reason) for an explicit backend that cannot run there, TypeError for
    "triton" / "cuda" with float64 features. ``variant``: the call variant
    (``_dispatch.VARIANTS``) the backend must run."""
    chosen = _dispatch.resolve(
        objective, like.device, "torch" if backend == "reference" else backend, like.dtype,
        variant,
    )  # fmt: skip
    return "torch" if chosen == "reference" else chosen


def setup_pair(
    name: str,
    image_features: object,
    text_features: object,
    logit_scale: object,
    logit_bias: object,
    opts: Options,
    groups: object = None,
    objective: Optional[str] = None,
    ring: bool = True,
) -> tuple:
    """:func:`setup_checked` for the two-tower losses (CLIP, SigLIP): image and text
    shards (n_r, D) (n_r = 0 allowed), the scale, the optional bias and ``groups``
    (optional (n_r,) int32/int64 ids of this rank's samples, checked like
    :func:`flashcontrast.clip_loss`'s against this rank's n_r; the caller uses it as
    given once this returns). F = 2 fields: logit_bias given, groups given (given on some
    ranks only raises on every rank), so the metadata is 9 int64 (72 bytes) per rank,
    with or without bias and groups. ``opts``: the loss's process-group options.
    ``objective`` ("clip" / "siglip"): the loss runs on the pair engine, the backend is
    one of ENGINE_BACKENDS and is resolved among this
    rank's checks (:func:`engine_backend`: a backend that cannot run on one rank fails
    on every rank); None: TORCH_BACKENDS, resolved to "torch". ``ring=False``: the loss
    has no "ring" strategy (it raises on every rank). Returns (layout, a, b, scale, bias,
    the resolved backend)."""

    def check():
        a = check_shard("image_features", image_features)
        b = check_shard("text_features", text_features)
        check_pair("image_features", a, "text_features", b)
        scale = scalar("logit_scale", logit_scale, a)
        bias = scalar("logit_bias", logit_bias, a, required=False)
        if isinstance(groups, Tensor):
            check_dense("groups", groups)
        _check_groups(groups, a)
        chosen = "torch" if objective is None else engine_backend(objective, opts.backend, a)
        n, d = a.shape
        flags = [bias is not None, groups is not None]
        return (a, b, scale, bias, chosen), n, d, a.dtype, a.device, flags

    fields = ["logit_bias given", "groups given"]
    backends = TORCH_BACKENDS if objective is None else ENGINE_BACKENDS
    lay, payload = setup_checked(
        name, opts.group, opts.strategy, opts.grad_scaling, opts.backend, fields, check, ring,
        backends,
    )  # fmt: skip
    return (lay, *payload)


def setup(name: str, *args: object, **kwargs: object) -> tuple:
    """:func:`setup_pair` without the engine (backend "auto" or "torch"): its arguments
    but ``objective`` (image_features, text_features, logit_scale, logit_bias, opts,
    groups=None); returns (layout, a, b, scale, bias)."""
    return setup_pair(name, *args, objective=None, **kwargs)[:5]


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
    left one; returns the requests to wait on. Empty tensors (an empty shard, or its
    accumulator) are neither sent nor received: both ends know the shard sizes, so they
    skip the same transfers (tags stay those of the full lists)."""
    right = lay.global_rank((lay.rank + 1) % lay.world)
    left = lay.global_rank((lay.rank - 1) % lay.world)
    ops = [
        dist.P2POp(dist.isend, t, right, lay.group, tag + i)
        for i, t in enumerate(send)
        if t.numel() > 0
    ]
    ops += [
        dist.P2POp(dist.irecv, t, left, lay.group, tag + i)
        for i, t in enumerate(recv)
        if t.numel() > 0
    ]
    _SENT["bytes"] += sum(t.numel() * t.element_size() for t in send)
    return dist.batch_isend_irecv(ops) if ops else []


def ring_pass(
    lay: Layout,
    travel: Sequence[Tensor],
    visit: Callable[[int, Sequence[Tensor]], Optional[Tensor]],
    combine: Callable[[Tensor, Tensor], Tensor],
) -> Optional[Tensor]:
    """Visit every rank's shard of ``travel`` (own first), passing shards to the right.

    ``travel``: this rank's tensors (n_r, ...) that every rank must see (rank q's arrive
    with n_q rows; n_q = 0 for an empty shard, whose transfers are skipped, and whose
    visit gets (0, ...) tensors). ``visit(q, tensors)`` computes with rank q's shard and returns a
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


def round_grads(
    dx: Tensor, like: Tensor, dscale: Tensor, scale: Tensor, lay: Layout, grad_scaling: str
) -> tuple:
    """A backward's last step from its accumulation-dtype sums: ``dscale`` (1,) summed over
    ranks (all-reduce, in place), the features' gradient ``dx`` times W for
    ``grad_scaling="ddp"``. Returns (dx in ``like``'s dtype, d scale (0-d) in ``scale``'s
    dtype), each rounded once."""
    all_reduce(dscale, lay)
    factor = lay.world if grad_scaling == "ddp" else 1
    return (dx * factor).to(like.dtype), dscale[0].to(scale.dtype)


def pair_all_reduce(mx: Tensor, sm: Tensor, extra: Tensor, lay: Layout) -> tuple:
    """Merge every rank's partial (max, sum) logsumexp pairs (m,) exactly (``merge_lse``
    over the ranks) and sum ``extra`` (k,) along: all-reduce the max (MAX, m elements),
    rescale this rank's sums to it, all-reduce the sums with ``extra`` (SUM, m + k).
    A rank's empty set (max -inf, sum 0) adds 0. Returns (max (m,), sum (m,), extra (k,))."""
    gmax = all_reduce(mx.clone(), lay, dist.ReduceOp.MAX)
    safe = torch.where(torch.isneginf(gmax), torch.zeros_like(gmax), gmax)
    packed = all_reduce(torch.cat([sm * torch.exp(mx - safe), extra]), lay)
    m = mx.shape[0]
    return gmax, packed[:m], packed[m:]


def lse_all_reduce(part: Tensor, extra: Tensor, lay: Layout) -> tuple:
    """Combine partial logsumexps ``part`` (m,) over ranks (max, then the sum of
    exponentials) and sum ``extra`` (k,) along in the second all-reduce. Returns
    (lse (m,), summed extra (k,))."""
    mx = all_reduce(part.clone(), lay, dist.ReduceOp.MAX)
    packed = torch.cat([(part - mx).exp_(), extra])
    all_reduce(packed, lay)
    m = part.shape[0]
    return mx + packed[:m].log(), packed[m:]
