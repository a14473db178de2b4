"""OpenCLIP's ``ClipLoss`` and ``SigLipLoss`` (``open_clip/loss.py``), on the fused kernels.

Same constructors, same call signatures, same return values (the loss tensor, or
``{"contrastive_loss": loss}`` with ``output_dict=True``)::

    from flashcontrast.compat.open_clip import ClipLoss   # was: from open_clip.loss import ...

Single process (``world_size == 1``) these call :func:`flashcontrast.clip_loss` and
:func:`flashcontrast.siglip_loss`: the same value and gradients as OpenCLIP without the
N x N logit matrix. With ``world_size > 1`` (the default process group must be
initialized, with that world size and this rank) every rank returns what OpenCLIP returns
on that rank, and every input gets OpenCLIP's gradient on that rank (each class says how):

* ``ClipLoss(local_loss=False)``: the loss of the global batch, by
  :func:`flashcontrast.distributed.clip_loss` (texts all-gathered once; column statistics
  by all-reduce), with the gradient scaling that reproduces ``gather_with_grad``.
* ``ClipLoss(local_loss=True)`` and ``SigLipLoss``: OpenCLIP returns a RANK-LOCAL loss
  (this rank's rows against the global columns, divided by the local n). Here the
  features are exchanged as OpenCLIP exchanges them (all-gather with or without gradient,
  or ring shifts with gradient), and the local rows against the gathered columns run
  through the blockwise kernels, (rows x N) blocks within their element budget: the
  (n x N) logits are never held.

Deliberate differences, all classes:

* 16-bit features: the kernels accumulate in float32 and return a float32 loss; OpenCLIP
  builds the logits and the loss in the features' dtype. Values agree to the 16-bit
  rounding of OpenCLIP's logits (ours are the more accurate).
  Under ``torch.autocast`` too: the rank-local kernels run with autocast disabled
  (OpenCLIP's logits are then bf16 / fp16 GEMMs).
* Shard sizes: OpenCLIP needs equal shards on every rank (its gathers and labels assume
  them). ``ClipLoss(local_loss=True)`` and ``SigLipLoss`` check that first (one small
  all-gather of (status, n, D, dtype)) and raise a ValueError on every rank otherwise;
  ``ClipLoss(local_loss=False)`` also accepts uneven shards and then returns the global
  loss of the concatenated batch. A rank whose inputs fail the checks makes every rank
  raise, instead of hanging in a collective.
* ``use_horovod=True`` raises NotImplementedError (no Horovod path).
* ``cache_labels`` is accepted and ignored: no labels tensor is ever built.
* Double backward (``create_graph=True``) is not supported (the backward passes are
  once-differentiable); OpenCLIP's dense autograd graph supports it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _dispatch, reference
from .. import distributed as fc_dist
from .._module import BackendLoss
from .._validation import accumulation_dtype
from ..distributed import _comm
from ..objectives._pair_op import sweep
from ..objectives.clip import clip_loss
from ..objectives.infonce import infonce_loss
from ..objectives.siglip import PAIR as SIGLIP_PAIR
from ..objectives.siglip import siglip_loss

__all__ = ["ClipLoss", "SigLipLoss"]

_SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _check_world(rank: int, world_size: int, who: str) -> None:
    """With world_size > 1, require an initialized default group that matches."""
    if world_size <= 1:
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            f"{who}(world_size={world_size}) needs torch.distributed initialized "
            "(init_process_group) before the loss is called"
        )
    actual_world = torch.distributed.get_world_size()
    actual_rank = torch.distributed.get_rank()
    if actual_world != world_size or actual_rank != rank:
        raise ValueError(
            f"{who} was built with rank={rank}, world_size={world_size}, but the default "
            f"process group has rank {actual_rank} of {actual_world}"
        )


# ----------------------------------------------------------------------------- process group
# The rank-local losses (ClipLoss(local_loss=True), SigLipLoss): OpenCLIP's exchanges of
# equal shards over the default group, then the local rows against the gathered columns.


def _setup(
    who: str, image_features: object, text_features: object, logit_scale, logit_bias
) -> tuple[Tensor, Optional[Tensor]]:
    """Check the inputs on every rank (:func:`flashcontrast.distributed._comm.setup`: a
    bad input or disagreeing D / dtype on any rank raises on every rank instead of hanging
    in a later collective), then require equal shards, as OpenCLIP's gathers do. Returns
    (scale, bias) as 0-d tensors (autograd flows back to the arguments)."""
    lay, _, _, scale, bias = _comm.setup(
        who, image_features, text_features, logit_scale, logit_bias, _comm.Options()
    )
    if len(set(lay.sizes)) != 1:
        raise ValueError(
            f"{who} with world_size > 1 needs equal shards on every rank (as OpenCLIP); "
            f"got n = {lay.sizes} rows on ranks 0..W-1"
        )
    return scale, bias


class _AllGatherWithGrad(torch.autograd.Function):
    """Every rank's shard concatenated in rank order; backward: the gradient of the whole
    is summed over ranks and each rank gets its own rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        chunks = list(grad.contiguous().chunk(dist.get_world_size()))
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks)
        return out


def _gather(x: Tensor, with_grad: bool) -> Tensor:
    """Every rank's shard of ``x`` (equal shards), in rank order: with gradients summed
    back to the owner, or as constants."""
    if with_grad:
        return _AllGatherWithGrad.apply(x)
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def _own_first(full: Tensor, rank: int) -> Tensor:
    """The gathered rows rotated to start at this rank's shard (the columns of its
    positives first; the losses below do not depend on the order of the other columns)."""
    return torch.roll(full, -rank * (full.shape[0] // dist.get_world_size()), 0)


def _send_recv(x: Tensor, to: int, src: int) -> Tensor:
    """Send ``x`` to rank ``to`` and receive a tensor like it from rank ``src``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, to), dist.P2POp(dist.irecv, out, src)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _ShiftRight(torch.autograd.Function):
    """Receive the left neighbour's tensor while sending ours to the right; the gradient
    travels back the other way."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        ctx.left, ctx.right = (rank - 1) % world, (rank + 1) % world
        return _send_recv(x, ctx.right, ctx.left)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        return _send_recv(grad, ctx.left, ctx.right)


def _ring(x: Tensor) -> list[Tensor]:
    """[own, rank r-1's, rank r-2's, ...]: W - 1 shifts to the right, with gradients."""
    parts = [x]
    for _ in range(dist.get_world_size() - 1):
        parts.append(_ShiftRight.apply(parts[-1]))
    return parts


def _engine_backend(objective: str, x: Tensor, backend: str) -> str:
    """The engine backend the rank-local paths run: ``backend`` resolved for ``x``
    ("reference" has no rectangular form: its blockwise torch reading runs instead)."""
    chosen = _dispatch.resolve(objective, x.device, backend, x.dtype)
    return "torch" if chosen == "reference" else chosen


def _row_cross_entropy(q: Tensor, keys: Tensor, scale: Tensor, bias: Optional[Tensor], backend):
    """mean_i CE(s q_i keys^T + b, i): query i's positive is column i of ``keys``."""
    return infonce_loss(q, keys, scale, bias, backend=_engine_backend("infonce", q, backend))


def _local_clip_loss(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    with_grad: bool,
    rank: int,
    backend: str,
) -> Tensor:
    """OpenCLIP's ``local_loss=True``: 1/2 [CE(s a_r B^T, o_r + i) + CE(s b_r A^T, o_r + i)]
    with A, B gathered with or without gradient (the local shard is not re-inserted)."""
    images = _own_first(_gather(a, with_grad), rank)
    texts = _own_first(_gather(b, with_grad), rank)
    return 0.5 * (
        _row_cross_entropy(a, texts, scale, bias, backend)
        + _row_cross_entropy(b, images, scale, bias, backend)
    )


def _local_siglip_loss(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    dist_impl: str,
    rank: int,
    backend: str,
) -> Tensor:
    """OpenCLIP's rank-local SigLIP loss: the local images against every rank's texts,
    which travel WITH gradients (ring shifts for "bidir" / "shift", an all-gather for
    "reduce" / "gather")."""
    if dist_impl in ("bidir", "shift"):
        texts = torch.cat(_ring(b))
    else:
        texts = _own_first(_gather(b, with_grad=True), rank)
    # (1/n) sum_ij -log sigmoid(z_ij S_ij) over the n local rows and all columns, the
    # positives at (i, i): one "sigmoid" sweep
    chosen = _engine_backend("siglip", a, backend)
    return sweep(a, texts, scale, bias, SIGLIP_PAIR, chosen)["total"] / a.shape[0]


class _OpenClipLoss(BackendLoss):
    """What OpenCLIP's ClipLoss and SigLipLoss share: ``cache_labels`` (accepted,
    ignored), this process's ``rank`` and ``world_size``, and the backend."""

    def __init__(self, cache_labels: bool, rank: int, world_size: int, backend: str) -> None:
        super().__init__(backend)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size

    def _routed_loss(
        self, single, a: Tensor, b: Tensor, logit_scale, logit_bias, output_dict: bool
    ):
        """The loss, as a dict when ``output_dict``: ``single`` (the single-process
        function) with world_size <= 1, else :meth:`_process_group_loss`."""
        if self.world_size <= 1:
            loss = single(a, b, logit_scale, logit_bias, backend=self.backend)
        else:
            _check_world(self.rank, self.world_size, type(self).__name__)
            loss = self._process_group_loss(a, b, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class ClipLoss(_OpenClipLoss):
    """OpenCLIP ``ClipLoss``: symmetric InfoNCE, ``1/2 [CE(S) + CE(S^T)]``, S = s A B^T (+ b).

    Args (OpenCLIP's):
        local_loss: with world_size > 1, each rank's loss is its own rows' cross entropies
            against the global columns (both directions), as in OpenCLIP.
        gather_with_grad: whether the all-gather of the features carries gradients.
        cache_labels: accepted, ignored (no labels tensor is built).
        rank, world_size: this process's place in the default process group.
        use_horovod: True raises NotImplementedError.
        backend: flashcontrast's backend for the single-process path ("auto", "cuda",
            "triton", "torch", "reference"); with local_loss the rank-local sweeps run on it
            too ("reference": the torch engine).

    Call: ``(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` -> the loss (0-d), or ``{"contrastive_loss": loss}``.

    With ``world_size = W > 1`` (rank r, equal shards of n rows, N = W n), per rank, the
    value and the gradients of OpenCLIP's own class:

    * ``local_loss=False``: the global-batch loss on every rank, by
      :func:`flashcontrast.distributed.clip_loss`. ``gather_with_grad=True``: OpenCLIP's
      gathered features carry gradients back to their owner, so rank r gets W x the
      single-process gradients of its rows: ``grad_scaling="ddp"``.
      ``gather_with_grad=False`` (OpenCLIP's default): the gathered features are
      constants except this rank's own, re-inserted: 1x, ``grad_scaling="sum"``. Both
      give the single-process gradients of ``logit_scale`` / ``logit_bias``.
    * ``local_loss=True``: rank r's loss
      ``1/2 [CE(s A_r B^T + b, o_r + i) + CE(s B_r A^T + b, o_r + i)]`` (its n rows,
      divided by n; the mean over ranks is the global loss), and ``logit_scale`` /
      ``logit_bias`` get that local loss's gradients. A and B are all-gathered (with
      gradients when ``gather_with_grad``, the local shard not re-inserted, as OpenCLIP
      does), then the row-only InfoNCE kernels run over the local rows in blocks.
      Feature gradients: ``gather_with_grad=True``: W x the single-process gradients
      (the gradients of every rank's loss summed back through the gather);
      ``gather_with_grad=False``: only the paths through this rank's own rows (its
      queries), at the W x scale, exactly as OpenCLIP.

    The ``logit_bias`` gradient is 0 in exact arithmetic (a constant shift of every
    logit cancels in a softmax cross entropy); OpenCLIP's is 0 up to rounding.
    """

    option_names = ("local_loss", "gather_with_grad", "rank", "world_size")

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(cache_labels, rank, world_size, backend)
        if use_horovod:
            raise NotImplementedError(
                "flashcontrast.compat.open_clip.ClipLoss has no Horovod path "
                "(use_horovod=True); use torch.distributed (flashcontrast.distributed)"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.use_horovod = use_horovod

    @property
    def grad_scaling(self) -> str:
        """The scale of this rank's feature gradients with world_size > 1, in
        :mod:`flashcontrast.distributed`'s terms: "ddp" (W x) or "sum" (1x). It is the
        ``grad_scaling`` passed to ``flashcontrast.distributed.clip_loss`` when
        ``local_loss=False``; with ``local_loss=True`` OpenCLIP's gradients are at the W x
        scale (without ``gather_with_grad``: of the paths through this rank's rows only)."""
        if self.gather_with_grad or self.local_loss:
            return "ddp"
        return "sum"

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias=None,
        output_dict: bool = False,
    ):
        return self._routed_loss(
            clip_loss, image_features, text_features, logit_scale, logit_bias, output_dict
        )

    def _process_group_loss(self, a: Tensor, b: Tensor, logit_scale, logit_bias) -> Tensor:
        if not self.local_loss:
            return fc_dist.clip_loss(a, b, logit_scale, logit_bias, grad_scaling=self.grad_scaling)
        scale, bias = _setup("compat ClipLoss", a, b, logit_scale, logit_bias)
        return _local_clip_loss(a, b, scale, bias, self.gather_with_grad, self.rank, self.backend)


class SigLipLoss(_OpenClipLoss):
    """OpenCLIP ``SigLipLoss``: ``-(1/n) sum_ij log sigmoid(z_ij (s a_i.b_j + b))``.

    Args (OpenCLIP's; both its 3.3.0 release and its main branch's, which added
    ``chunk_size``):
        cache_labels: accepted, ignored.
        rank, world_size: this process's place in the default process group.
        dist_impl: None (= "bidir"), "bidir", "shift", "reduce" or "gather".
        chunk_size: accepted and checked (an int >= 0), otherwise ignored: OpenCLIP's
            ``chunk_size > 0`` computes the logits ``chunk_size`` rows at a time to save
            memory; here they are never materialized, whatever the chunk size, so every
            chunk size gives the same value bit for bit (OpenCLIP's own tests accept a
            1e-5 difference between its chunked and unchunked sums).
        backend: flashcontrast's backend for the single-process path and the rank-local
            sweep of world_size > 1 ("reference" there: the torch engine).

    Call: ``(image_features, text_features, logit_scale, logit_bias, output_dict=False)``
    (``logit_bias`` positional and required, as in OpenCLIP; None means no bias).

    With ``world_size = W > 1`` (equal shards of n rows), per rank, OpenCLIP's value and
    gradients: rank r returns its rows' sum over all N columns divided by n (the mean over
    ranks is the global loss), and ``logit_scale`` / ``logit_bias`` get that local loss's
    gradients. Every OpenCLIP ``dist_impl`` sends the text features WITH gradients, so
    the feature gradients are W x the single-process gradients of the global loss. Here
    the texts travel by W - 1 ring shifts (point to point, to rank r + 1) for "bidir" and
    "shift" (``strategy == "ring"``; OpenCLIP's "bidir" exchanges both ways, in half the
    steps) and by one all-gather for "reduce" and "gather" (``strategy == "gather"``;
    OpenCLIP's "reduce" makes W all-reduces): the same values and gradients, to rounding.
    The local rows against the N columns run through the blockwise SigLIP kernels.

    ``_loss(image_features, text_features, logit_scale, logit_bias=None,
    negative_only=False)`` is OpenCLIP's single-block loss (its tests call it): with
    ``negative_only`` every pair is a negative (z = -1 everywhere, OpenCLIP's term for
    another rank's texts), computed without logits as the loss with positives plus
    mean_i S_ii (softplus(S) - softplus(-S) = S). ``get_ground_truth`` and
    ``get_logits`` are OpenCLIP's helpers, dense by definition (n x n): for inspection,
    not used by the loss.
    """

    option_names = ("rank", "world_size", "dist_impl", "chunk_size")

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
        chunk_size: int = 0,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(cache_labels, rank, world_size, backend)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in _SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {_SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size must be an int >= 0, got {chunk_size!r}")
        self.dist_impl = dist_impl
        self.chunk_size = chunk_size

    def get_ground_truth(
        self, device, dtype, num_logits: int, negative_only: bool = False
    ) -> torch.Tensor:
        """OpenCLIP's (num_logits, num_logits) labels: -1 off the diagonal, +1 on it
        (-1 everywhere with ``negative_only``). Dense; the loss never builds it."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """OpenCLIP's dense (n, m) logits ``logit_scale * a @ b.T + logit_bias``, for
        inspection (the loss never builds them)."""
        return reference.clip_logits(image_features, text_features, logit_scale, logit_bias)

    def _loss(
        self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False
    ) -> torch.Tensor:
        """OpenCLIP's ``_loss``: -(1/n) sum_ij log sigmoid(z_ij S_ij) over this block, with
        z = +1 on the diagonal (-1 everywhere when ``negative_only``); (n, D) and (n, D)
        features, a 0-d float32 (float64 for float64) loss, memory-linear."""
        loss = siglip_loss(
            image_features, text_features, logit_scale, logit_bias, backend=self.backend
        )
        if not negative_only:
            return loss
        # softplus(S_ii) - softplus(-S_ii) = S_ii: the positives turned into negatives.
        acc = accumulation_dtype(image_features.dtype)
        dots = (image_features.to(acc) * text_features.to(acc)).sum(dim=1)
        diag = torch.as_tensor(logit_scale, device=dots.device).reshape(()) * dots
        if logit_bias is not None:
            diag = diag + torch.as_tensor(logit_bias, device=dots.device).reshape(())
        return loss + diag.mean().to(loss.dtype)

    @property
    def strategy(self) -> str:
        """How the texts travel when world_size > 1: "ring" (point-to-point shifts) or
        "gather" (one all-gather)."""
        return "ring" if self.dist_impl in ("bidir", "shift") else "gather"

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias,
        output_dict: bool = False,
    ):
        return self._routed_loss(
            siglip_loss, image_features, text_features, logit_scale, logit_bias, output_dict
        )

    def _process_group_loss(self, a: Tensor, b: Tensor, logit_scale, logit_bias) -> Tensor:
        scale, bias = _setup("compat SigLipLoss", a, b, logit_scale, logit_bias)
        return _local_siglip_loss(a, b, scale, bias, self.dist_impl, self.rank, self.backend)
