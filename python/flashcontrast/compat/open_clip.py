"""OpenCLIP's ``ClipLoss`` and ``SigLipLoss`` (``open_clip/loss.py``), on the fused kernels.

Same constructors, same call signatures, same return values (the loss tensor, or
``{"contrastive_loss": loss}`` with ``output_dict=True``)::

    from flashcontrast.compat.open_clip import ClipLoss   # was: from open_clip.loss import ...

Single process (``world_size == 1``) these call :func:`flashcontrast.clip_loss` and
:func:`flashcontrast.siglip_loss`: the same value and gradients as OpenCLIP without the
N x N logit matrix. With ``world_size > 1`` they call :mod:`flashcontrast.distributed`
over the default process group (which must be initialized, with that world size and this
rank), with the gradient scaling that reproduces OpenCLIP's option (see each class).

Deliberate differences, all classes:

* 16-bit features: the kernels accumulate in float32 and return a float32 loss; OpenCLIP
  builds the logits and the loss in the features' dtype. Values agree to the 16-bit
  rounding of OpenCLIP's logits (ours are the more accurate).
* Distributed: the returned value is always the loss of the GLOBAL batch, the same on
  every rank; OpenCLIP's ``local_loss=True`` and SigLIP's exchanges return each rank's own
  partial loss (whose mean over ranks is the global loss for equal shards). Gradients are
  as documented per class.
* ``use_horovod=True`` raises NotImplementedError (no Horovod path).
* ``cache_labels`` is accepted and ignored: no labels tensor is ever built.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import distributed as fc_dist
from ..objectives.clip import clip_loss
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


def _wrap(loss: torch.Tensor, output_dict: bool):
    return {"contrastive_loss": loss} if output_dict else loss


class ClipLoss(nn.Module):
    """OpenCLIP ``ClipLoss``: symmetric InfoNCE, ``1/2 [CE(S) + CE(S^T)]``, S = s A B^T (+ b).

    Args (OpenCLIP's):
        local_loss: OpenCLIP computes each rank's loss from its own rows only. Here it
            changes nothing about the value (always the global-batch loss, the same on
            every rank) and only selects the gradient scaling, see below.
        gather_with_grad: whether OpenCLIP's all-gather carries gradients.
        cache_labels: accepted, ignored (no labels tensor is built).
        rank, world_size: this process's place in the default process group.
        use_horovod: True raises NotImplementedError.
        backend: flashcontrast's backend for the single-process path ("auto", "cuda",
            "triton", "torch", "reference"); the distributed path runs blockwise torch.

    Call: ``(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` -> the loss (0-d), or ``{"contrastive_loss": loss}``.

    Gradients with ``world_size = W > 1`` (equal shards; rank r's feature gradients):

    * ``gather_with_grad=True`` (with or without ``local_loss``): OpenCLIP's gathered
      features carry gradients back to their owner, so rank r gets W x the single-process
      gradient of its rows; ``flashcontrast.distributed.clip_loss(grad_scaling="ddp")``
      gives exactly that (and the single-process gradient of logit_scale / logit_bias on
      every rank, which DDP's average leaves unchanged; OpenCLIP's local_loss gives
      per-rank scale gradients whose average is the same).
    * ``gather_with_grad=False, local_loss=False`` (OpenCLIP's default): the gathered
      features are constants except this rank's own, re-inserted: 1x the single-process
      gradient of its rows, ``grad_scaling="sum"`` (exactly OpenCLIP's).
    * ``gather_with_grad=False, local_loss=True``: OpenCLIP's gradient reaches rank r's
      features only through its own rows' logits (the paths through the other ranks'
      rows are cut by the no-grad gather and the local rank's features are not
      re-inserted), scaled by 1/n_r: W x the "query" part of the global gradient. No
      exact counterpart exists here; we use ``grad_scaling="ddp"``, the exact global
      gradient at the same scale (after DDP's average: the single-process gradient of the
      global batch). This is a DELIBERATE DIFFERENCE: OpenCLIP drops the "key" part.
    """

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
        super().__init__()
        if use_horovod:
            raise NotImplementedError(
                "flashcontrast.compat.open_clip.ClipLoss has no Horovod path "
                "(use_horovod=True); use torch.distributed (flashcontrast.distributed)"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend

    @property
    def grad_scaling(self) -> str:
        """The flashcontrast.distributed gradient scaling used when world_size > 1."""
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
        if self.world_size > 1:
            _check_world(self.rank, self.world_size, "ClipLoss")
            loss = fc_dist.clip_loss(
                image_features,
                text_features,
                logit_scale,
                logit_bias,
                grad_scaling=self.grad_scaling,
            )
        else:
            loss = clip_loss(
                image_features, text_features, logit_scale, logit_bias, backend=self.backend
            )
        return _wrap(loss, output_dict)

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
            f"rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}"
        )


class SigLipLoss(nn.Module):
    """OpenCLIP ``SigLipLoss``: ``-(1/N) sum_ij log sigmoid(z_ij (s a_i.b_j + b))``.

    Args (OpenCLIP's):
        cache_labels: accepted, ignored.
        rank, world_size: this process's place in the default process group.
        dist_impl: None (= "bidir"), "bidir", "shift", "reduce" or "gather".
        backend: flashcontrast's backend for the single-process path.

    Call: ``(image_features, text_features, logit_scale, logit_bias, output_dict=False)``
    (``logit_bias`` positional and required, as in OpenCLIP; None means no bias).

    With ``world_size = W > 1``: every OpenCLIP ``dist_impl`` exchanges the text features
    WITH gradients, so rank r's feature gradients are W x the single-process gradients of
    the global loss; we use ``flashcontrast.distributed.siglip_loss(grad_scaling="ddp")``,
    which gives exactly those, with ``strategy="ring"`` for "bidir" / "shift" (neighbour
    exchange) and ``"gather"`` for "reduce" / "gather". OpenCLIP returns rank r's partial
    loss (its rows against all columns, / n_r); we return the global loss (their mean
    over ranks for equal shards), divided by the global N also for uneven shards.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in _SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {_SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = backend

    @property
    def strategy(self) -> str:
        """The flashcontrast.distributed strategy used when world_size > 1."""
        return "ring" if self.dist_impl in ("bidir", "shift") else "gather"

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias,
        output_dict: bool = False,
    ):
        if self.world_size > 1:
            _check_world(self.rank, self.world_size, "SigLipLoss")
            loss = fc_dist.siglip_loss(
                image_features,
                text_features,
                logit_scale,
                logit_bias,
                strategy=self.strategy,
                grad_scaling="ddp",
            )
        else:
            loss = siglip_loss(
                image_features, text_features, logit_scale, logit_bias, backend=self.backend
            )
        return _wrap(loss, output_dict)

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
            f"backend={self.backend!r}"
        )
