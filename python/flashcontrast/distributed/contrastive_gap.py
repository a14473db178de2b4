"""The "contrastive gap" objectives L_CUA / L_CUAXU over a process group, composed of the
process-group terms (no tile math of its own):

    L = clip_loss(X, Y, s) + w_u (uniform_loss(X) + uniform_loss(Y)) / 2
        + w_a align_loss(X, Y) [+ w_x cross_uniform_loss(X, Y)]

each the global batch's (:mod:`.clip`, :mod:`.rows`), so the sum is
:func:`flashcontrast.contrastive_gap_loss` of the concatenated batch on every rank (the
formula and its sources: ``objectives/contrastive_gap.py``). One metadata all-gather
first checks that every rank passes the same variant, t and weights (a different variant
would run different collectives), then each term makes its own (7 int64 per rank each).

Bytes per rank ("gather"; notation of :mod:`flashcontrast.distributed`): CLIP's, plus
twice the uniformity's (W - 1) n (D e + (D + 2) f) (the features gathered as given, the
(D + 2)-column gradients reduce-scattered in float32, float64 for float64 features), plus
as much again for L_XUniform, plus ar(2 f) for the alignment.
"""

from __future__ import annotations

import struct

from torch import Tensor

from .._keywords import Unpack
from .._validation import check_pair
from ..objectives.contrastive_gap import VARIANTS, GapOptions, gap_options, gap_sum, gap_weights
from . import _comm
from .clip import clip_loss
from .rows import align_loss, cross_uniform_loss, uniform_loss

__all__ = ["contrastive_gap_loss"]


def _bits(v: float) -> int:
    """A float's IEEE-754 float64 bits as an int64 (compared across ranks)."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _float(i: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(i)))[0]


_FIELDS = [
    ("variant", VARIANTS.__getitem__),
    ("t", _float),
    ("uniformity_weight", _float),
    ("alignment_weight", _float),
    ("cross_uniformity_weight", _float),
]


class DistributedGapOptions(GapOptions, _comm.ProcessGroupOptions, total=False):
    """The keywords of :func:`contrastive_gap_loss` here: the single-process function's
    weighting options (:class:`flashcontrast.objectives.contrastive_gap.GapOptions`: t,
    uniformity_weight, alignment_weight, cross_uniformity_weight, its defaults) and the
    process-group ones (:class:`ProcessGroupOptions`)."""


def contrastive_gap_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    *,
    variant: str = "cua",
    **options: Unpack[DistributedGapOptions],
) -> Tensor:
    """L_CUA / L_CUAXU (:func:`flashcontrast.contrastive_gap_loss`, which takes the same
    ``variant`` and weighting keywords) of the global batch of a process group: each rank
    passes its paired (n_r, D) image and text shards (n_r may differ, and be 0; N >= 2
    globally) and gets the single-process loss of the concatenation. Gradients as
    :func:`flashcontrast.distributed.clip_loss`: features W x the single-process ones of
    the rank's rows with ``grad_scaling="ddp"`` (1x with "sum"), ``logit_scale``'s equal
    on every rank. ``strategy`` "gather" only (the uniformity terms have no ring). The
    options must agree on every rank (checked)."""
    name = "contrastive_gap_loss"
    weighting = {k: v for k, v in options.items() if k in GapOptions.__annotations__}
    process = {k: v for k, v in options.items() if k not in weighting}
    group, strategy, backend, grad_scaling = _comm.options(name, process)

    def check():
        gap = gap_options(name, variant, weighting)
        w = gap_weights(**gap)
        x = _comm.check_shard("image_features", image_features)
        y = _comm.check_shard("text_features", text_features)
        check_pair("image_features", x, "text_features", y)
        values = [VARIANTS.index(variant), _bits(gap["t"]), *map(_bits, w)]
        return (x, y, gap["t"], w), *x.shape, x.dtype, x.device, values

    lay, (x, y, t, w) = _comm.setup_checked(
        "contrastive_gap_loss", group, strategy, grad_scaling, backend, _FIELDS, check,
        ring=False, backends=_comm.ENGINE_BACKENDS,
    )  # fmt: skip
    if lay.total < 2:
        raise ValueError(f"contrastive_gap_loss needs N >= 2 samples, got N = {lay.total}")
    kw = dict(group=group, strategy=strategy, backend=backend, grad_scaling=grad_scaling)
    clip = clip_loss(x, y, logit_scale, **kw)
    unif = (uniform_loss(x, t, **kw), uniform_loss(y, t, **kw))
    align = align_loss(x, y, 2.0, group=group, grad_scaling=grad_scaling)
    xunif = cross_uniform_loss(x, y, t, **kw) if variant == "cuaxu" else None
    return gap_sum(clip, unif, align, xunif, w)
