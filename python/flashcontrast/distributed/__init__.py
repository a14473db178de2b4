"""Contrastive losses over torch.distributed: every rank passes its shard, the loss is the
global batch's.

    loss = flashcontrast.distributed.clip_loss(img, txt, logit_scale, group=None,
                                               strategy="gather")   # or "ring"
    loss = flashcontrast.distributed.clip_loss(img, txt, logit_scale, groups=ids)  # (n_r,)
    loss = flashcontrast.distributed.siglip_loss(img, txt, logit_scale, logit_bias)
    loss = flashcontrast.distributed.multiview_infonce_loss(views, logit_scale)  # and
    # multiview_dhel_loss, gram_loss(anchor, others, s), symile_loss(reps, s) (see below),
    # cwcl_loss(img, txt, s, weight_features=u) (CLIP's sweep + all-reduced moments)
    loss = flashcontrast.distributed.supcon_loss(views, labels, temperature)  # SupCon

Every loss here takes the same four process-group keywords, ``**options``
(:class:`ProcessGroupOptions`, their defaults in one place, ``_comm.Options``): ``group``
(None: the default group), ``strategy`` ("gather" or "ring"; the row-only losses, the
contrastive gap and SupCon gather only), ``backend`` (the local tiles', as the
single-process functions take it) and ``grad_scaling`` ("ddp" or "sum"); ``align_loss``
takes ``group`` and ``grad_scaling`` only. An unknown keyword raises TypeError.

Semantics
---------
Rank r passes rows [o_r, o_r + n_r) of the global batch (shard sizes may differ; they are
exchanged first; a shard may be empty, n_r = 0, as in the last, uneven batch of an epoch:
its rank then gets (0, D) feature gradients; an empty GLOBAL batch raises on every
rank). Every rank returns the same loss: the single-process loss
(:func:`flashcontrast.clip_loss` / :func:`flashcontrast.siglip_loss`) of the
concatenation of the shards in rank order. Every rank must call the loss and its
backward (both communicate). A bad setup raises on EVERY rank, from one metadata
all-gather made before anything else (check status, n_r, D, dtype, strategy,
grad_scaling and backend codes, then the objective's fields: logit_bias and groups given
or not for CLIP and SigLIP): a rank whose inputs fail their checks (whatever the
exception: that rank raises it, the others a RuntimeError naming the rank and relaying
its error; sparse, mkldnn and nested tensors are rejected there), or ranks that disagree
on D, dtype, strategy, grad_scaling, backend, or bias or groups given. That all-gather
runs on the CPU when the group's backend serves it (gloo, or a mixed
"cpu:gloo,cuda:nccl" group), else (NCCL) on the features' GPU, which also creates the
group's communicator there before any point-to-point batch; features on a device the
backend does not serve (CPU tensors over NCCL) raise on every rank. Double backward
(``create_graph=True``) is not supported: the backward is marked once-differentiable.
``torch.autocast`` is disabled inside the losses' forward and backward: the tiles compute
in float32 (float64 for float64 features) as without it, and 16-bit features still travel
in 16 bits.

``clip_loss(..., groups=ids)``: each rank passes the integer ids (n_r,) of its own
samples; ids are global (equal ids on different ranks are one group). As in
:func:`flashcontrast.clip_loss`, a pair i != j (global indices) with equal ids leaves both
the row and the column logsumexp; the positives stay. The ids travel with the texts
(gathered, or along the ring) and are masked per tile; groups given on some ranks only
raise on every rank.

Gradients, ``grad_scaling="ddp"`` (default): rank r's feature gradients are W times the
single-process gradients of its rows; the gradients of ``logit_scale`` and
``logit_bias`` equal the single-process ones on every rank. DistributedDataParallel
averages parameter gradients over the W ranks, so the model then gets exactly the
single-process gradients of the global batch (the W x on the features cancels DDP's 1/W,
and the scalars, replicated, average to themselves). ``grad_scaling="sum"``: feature
gradients 1x (for users who sum gradients over ranks instead of averaging). The upstream
gradient of the loss is averaged over ranks in the backward (it is identical on every
rank in normal use, e.g. 1 or a GradScaler scale).

Next to OpenCLIP (``open_clip/loss.py``):

* ``ClipLoss(local_loss=False, gather_with_grad=True)``: every rank computes the global
  loss and ``torch.distributed.nn.all_gather`` sums the feature gradients from every
  rank: the same loss and the same gradients as ``clip_loss(..., grad_scaling="ddp")``.
* ``ClipLoss(local_loss=True, gather_with_grad=True)``: each rank's loss is only its
  rows' cross entropies (the mean over ranks equals the global loss for equal shards);
  gradients summed through the gather: again W x the global loss's feature gradients, so
  the same gradients as ``grad_scaling="ddp"`` (for equal shards), while the returned
  loss value differs per rank. Here the returned value is always the global loss.
* ``ClipLoss(gather_with_grad=False)`` (OpenCLIP's default): features gathered without
  gradient, the local ones re-inserted: each rank's feature gradients are 1x the
  single-process gradients of its rows, which is ``grad_scaling="sum"``; under DDP's
  averaging that trains with 1/W of the global-batch gradient (a learning-rate factor).
* ``SigLipLoss(dist_impl="bidir" | "shift" | "reduce" | "gather")``: rank r returns
  (its rows' sum over all N columns) / n_r, the neighbour-exchange result; with equal
  shards the mean over ranks is the global loss, and the exchanges carry gradients, so
  feature gradients are W x those of the global loss: ``siglip_loss(..., "ddp")``, with
  ``strategy="ring"`` the analogue of "shift". Here the returned value is the global
  loss, divided by the global N also for uneven shards.

Strategies
----------
Both compute only the local rows of S against all columns, never an N x N block, with
the same tile math: CLIP, SigLIP, MV-InfoNCE, MV-DHEL and Symile "n" sweep their rows
against each column block with the pair engine (``backends/pair.py``) of the backend
``backend=`` names ("auto" resolved as the single-process losses resolve it, "torch",
"triton", "cuda"; "reference" runs the "torch" tiles; resolved among every rank's setup
checks, so a backend that cannot run on one rank fails every rank), at the rows' and the
columns' global offsets; CLIP's column statistics are (max, sum) pairs merged across
ranks. GRAM sweeps its rows against each column block with the backend's GRAM kernels in
their rectangular form (row_offset; "torch", "triton", "cuda"), the degeneracy floor and
NaN propagation the single-process kernels'. Symile "n_squared" runs the "torch",
"triton" or "cuda" symile_n2 tiles of n_r rows against N columns.

``"gather"``: all-gather the text features once (shards padded to n_max rows, so uneven
sizes work with every backend); memory: all of B, O(N D), kept for the backward. CLIP
combines its column logsumexp statistics with two all-reduces (max, then the sum of
exponentials, carrying the row-LSE and diagonal sums along); SigLIP all-reduces one
scalar. Backward: the column gradients (N, D) go back to their owners by one
reduce-scatter (again over shards padded to n_max rows), then (d scale, d bias) by a
2-element all-reduce.

``"ring"``: the text shards travel around the ring by point-to-point
``batch_isend_irecv`` (to rank r + 1, from rank r - 1), the transfer of the next shard
posted before the compute on the current one, so it overlaps it; a rank holds at most
two foreign shards. CLIP's partial column LSEs (n_q floats) travel behind shard q and
arrive back at its owner after W - 1 hops. Backward: the ring again (texts with their
column LSEs), the column-gradient accumulator (n_q, D) travelling behind its shard back
to the owner. Memory: O((n_r + 2 n_max) D); no rank ever holds all of B.

Communication volume per step (bytes sent per rank)
---------------------------------------------------
Counted by :func:`comm_bytes` for what this code sends, with collectives counted as
their bandwidth-optimal ring algorithms send (all-gather and reduce-scatter of a c-byte
chunk: (W - 1) c; all-reduce of M bytes: 2 (W - 1)/W M). With W ranks, n = n_max rows
per shard, N = sum of shard sizes, D features, e bytes per feature element (4 for
float32), f bytes per statistic (4; 8 for float64 inputs), and the 72-byte metadata
all-gather (W - 1) 72:

* CLIP "gather": forward (W-1) n D e + 2(W-1)/W (N + (N + 2)) f [+ (W-1) n 8 with
  groups: the int64 ids, padded to n_max]; backward (W-1) n D f + 2(W-1)/W 3 f.
  Dominant: (W-1) n D (e + f).
* CLIP "ring" (equal shards): forward (W-1) n D e + (W-1) n f [+ (W-1) n 8] + 2(W-1)/W f;
  backward (W-1) n D e + (W-1) n f [+ (W-1) n 8] + (W-1) n D f + 2(W-1)/W 3 f. Dominant:
  (W-1) n D (2e + f) (the texts, and the ids, are sent twice: nothing O(N D) is kept
  between forward and backward).
* SigLIP "gather": forward (W-1) n D e + 2(W-1)/W f; backward (W-1) n D f + 2(W-1)/W 3 f.
* SigLIP "ring": forward (W-1) n D e + 2(W-1)/W f; backward (W-1) n D (e + f)
  + 2(W-1)/W 3 f.

Measured by tests/test_distributed.py (which checks the counter against these formulas
for W = 1..4): W = 4, n = 256 rows per rank, D = 512, float32, one forward + backward,
bytes sent per rank: CLIP gather 3,158,262; CLIP ring 4,724,976; SigLIP gather
3,145,968; SigLIP ring 4,718,832 (the 1.57 MB of (W-1) n D e is the feature exchange;
the 1.57 MB of (W-1) n D f the column gradients). The other objectives' figures, measured
and checked against the formulas below by tests/test_distributed_bytes.py and
tests/test_distributed_symile_ring.py, are in the README.

Multi-view, GRAM and Symile
---------------------------
``multiview_infonce_loss(views, logit_scale, *, groups=None, ...)``,
``multiview_dhel_loss(...)``, ``gram_loss(anchor, others, logit_scale, *,
label_smoothing=0.0, ...)`` (strategies "gather" and "ring") and
``symile_loss(representations, logit_scale, *, negative_sampling="n", generator=None,
permutations=None, ...)`` ("gather" and "ring"; "ring" first sends each rank, by one
all-to-all, the factor rows of the permuted columns it owns, then the anchor shards travel
the ring, see :mod:`flashcontrast.distributed.symile`; ``negative_sampling="n_squared"``
with M = 3 and "gather": the gathered others' N^2 pairs for every local anchor row;
"ring" or M > 3 raise NotImplementedError on every rank), each with ``group``,
``strategy``, ``backend`` and ``grad_scaling`` as above and the same contract: the loss
on every rank is the single-process loss of the concatenated batch, feature gradients W x
("ddp") or 1x ("sum") the single-process ones of the rank's rows, ``logit_scale``'s
gradient equal. Multi-view ``groups`` ids are global (each rank passes its samples' ids).
Symile "n": group rank 0 draws the (M, M-1, N) permutations over the GLOBAL N exactly as
the single-process call (``generator``, or its default CPU generator) and broadcasts them,
so the loss equals :func:`flashcontrast.symile_loss` of the concatenated batch with rank
0's generator state (other ranks' generators are untouched); explicit ``permutations``
hold global row indices and must be equal on every rank (checksum in the metadata).
Their metadata exchange (``_comm.setup_checked``, the same one) also compares V, K, M,
label_smoothing, groups given or not, permutations given or not (and their checksum) and
Symile's ``negative_sampling`` across ranks. The backward recomputes each (rows x
columns) tile from the saved statistics (the engine's backward; GRAM's and Symile
"n_squared"'s torch tiles likewise), so no block larger than the tile is held.

Bytes sent per rank (notation above; V views, K others, M modalities; ar(x) =
2(W-1)/W x for an all-reduce; metadata (W-1) 8 (7 + F), F = 2 fields for the multi-view
losses and GRAM, 5 for Symile):

* MV-InfoNCE / MV-DHEL "gather": forward (W-1) n V D e [+ (W-1) n 8 with groups]
  + ar(f); backward (W-1) n V D f + 2 ar(f). Dominant: (W-1) n V D (e + f).
* MV-InfoNCE / MV-DHEL "ring": forward (W-1) n V D e [+ (W-1) n 8] + ar(f); backward
  (W-1) n V D e [+ (W-1) n 8] + (W-1) n V D f + 2 ar(f). Dominant: (W-1) n V D (2e + f).
* GRAM "gather": forward (W-1) n K D e + ar(N f) + ar((N + 3) f); backward
  (W-1) n K D f + 2 ar(f).
* GRAM "ring": forward (W-1) n K D e + (W-1) n f + ar(4 f); backward (W-1) n K D e
  + (W-1) n f + (W-1) n K D f + 2 ar(f).
* Symile "gather": forward (W-1) n M D e + ar(f) [+ M (M-1) N 8 for the broadcast
  permutations, counted once on every rank, when they are drawn and W > 1]; backward
  (W-1) n M D f + 2 ar(f). Symile "n_squared" ("gather"): the same, never with
  permutations.
* Symile "ring": forward A_r D e + (N - n_{r+1}) M D e + (N - n_r) M f + ar(f); backward
  ar(f) + (N - n_{r+1}) M (D e + f) + (N - n_r) M D f + B_r D f + ar(f), with A_r / B_r
  the factor rows rank r sends / receives in the all-to-all (an all-to-all counts only
  the chunks sent to other ranks; about M (M-1) n (W-1)/W each for random permutations).
  Dominant: (W-1) n M D (2e + f + (M-1)(e + f)/W): about twice "gather", as for CLIP, since
  the anchors are sent twice, and in exchange no rank holds more than its shard, the
  factor rows of its columns and two visiting anchor shards.

Row-only objectives (``rows.py``, "gather"): ``infonce_loss(q, k, s)`` (paired shards,
query i's positive key i of the global batch), ``uniform_loss(x, t)``,
``cross_uniform_loss(x, y, t)`` and ``align_loss(x, y)`` (no sweep: a global sum);
``contrastive_gap_loss(img, txt, s, variant="cua" | "cuaxu")`` (``contrastive_gap.py``):
CLIP plus those terms, each the process-group one; CWCL
(``cwcl.py``): ``cwcl_loss(img, txt, s, weight_features=u)``, CLIP's sweep plus one
all-reduce of the soft targets' (D, Du) moments; ``supcon_loss`` (``supcon.py``): the
row-only sweep plus all-reduced per-label sums;
``multi_positive_infonce_loss(anchors, candidates (K, n_r, D), s)``: row sweeps against
the gathered candidates and, per candidate batch, the gathered anchors.
"""

from ._comm import ProcessGroupOptions, comm_bytes, reset_comm_bytes
from .clip import clip_loss
from .contrastive_gap import contrastive_gap_loss
from .cwcl import cwcl_loss
from .gram import gram_loss
from .multiview import multiview_dhel_loss, multiview_infonce_loss
from .rows import (
    align_loss,
    cross_uniform_loss,
    infonce_loss,
    multi_positive_infonce_loss,
    uniform_loss,
)
from .siglip import siglip_loss
from .supcon import supcon_loss
from .symile import symile_loss

__all__ = [
    "ProcessGroupOptions",
    "align_loss",
    "clip_loss",
    "comm_bytes",
    "contrastive_gap_loss",
    "cross_uniform_loss",
    "cwcl_loss",
    "gram_loss",
    "infonce_loss",
    "multi_positive_infonce_loss",
    "multiview_dhel_loss",
    "multiview_infonce_loss",
    "reset_comm_bytes",
    "siglip_loss",
    "supcon_loss",
    "symile_loss",
    "uniform_loss",
]
