"""Naive, materializing PyTorch implementations of every objective: the test oracle.

Each function builds the full logit (or volume) tensor and reduces it with stock PyTorch
ops, so that it is easy to read against docs/objectives.md and differentiable by
autograd in any floating dtype (use float64 to get the "true" value a fused backend is
held against). Nothing here is fast or memory-lean: an N x N (or N x N^(M-1)) tensor is
built on purpose. The computation runs in the inputs' dtype, so the same function also
gives the "same-dtype reference" error that the verification rule compares a kernel's
error to (GRAM's determinant, which PyTorch has no 16-bit kernel for, is the one
exception: it is taken in float32 for float16/bfloat16 inputs, as the published code
does).

Conventions shared by all functions:

* Features are used exactly as given: nothing here normalizes them.
* ``logit_scale`` is the multiplier ``s`` (already exponentiated, OpenCLIP style; for the
  temperature-based objectives ``s = 1 / tau``). It may be a python number or a 0-d
  tensor; a tensor keeps its autograd graph, so ``ds`` comes out of ``backward()``.
* Every function returns the mean loss as a 0-d tensor.
* Bad shapes raise ``ValueError`` (never ``assert``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._sampling import symile_negative_permutations
from ._validation import check_symile_modalities

__all__ = [
    "clip_logits",
    "clip_loss",
    "gram_loss",
    "gram_volume",
    "info_nce_loss",
    "multiview_dhel_loss",
    "multiview_infonce_loss",
    "siglip_loss",
    "supcon_loss",
    "symile_loss",
    "symile_two_modality_n_loss",
]

Scale = Union[float, torch.Tensor]
Views = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _check_2d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    _check_2d("image_features", a)
    _check_2d("text_features", b)
    if a.shape != b.shape:
        raise ValueError(
            f"image_features {tuple(a.shape)} and text_features {tuple(b.shape)} must have "
            "the same (N, D) shape"
        )
    if a.shape[0] < 1:
        raise ValueError("the batch is empty (N == 0)")


def _check_scale(name: str, s: Optional[Scale]) -> None:
    if isinstance(s, torch.Tensor) and s.numel() != 1:
        raise ValueError(f"{name} must be a python number or a 0-d tensor, got shape {s.shape}")


def _labels(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.long)


def _stack_views(views: Views) -> torch.Tensor:
    if isinstance(views, torch.Tensor):
        u = views
    else:
        views = list(views)
        if not views:
            raise ValueError("views is empty")
        for k, v in enumerate(views):
            _check_2d(f"views[{k}]", v)
        if len({tuple(v.shape) for v in views}) != 1:
            raise ValueError(
                f"all views must share one (N, D) shape, got {[v.shape for v in views]}"
            )
        u = torch.stack(views)
    if u.dim() != 3:
        raise ValueError(f"views must be (V, N, D), got shape {tuple(u.shape)}")
    if not u.is_floating_point():
        raise ValueError(f"views must be floating point, got {u.dtype}")
    if u.shape[0] < 2:
        raise ValueError(f"multi-view losses need V >= 2 views, got V = {u.shape[0]}")
    if u.shape[1] < 1:
        raise ValueError("the batch is empty (N == 0)")
    return u


def _eye_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, dtype=torch.bool, device=device)


# --------------------------------------------------------------------------------------
# 1. CLIP InfoNCE
# --------------------------------------------------------------------------------------
def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    logit_bias: Optional[Scale] = None,
) -> torch.Tensor:
    """Symmetric CLIP InfoNCE, as OpenCLIP ``ClipLoss`` (single process).

    ``S = s * A @ B.T (+ b)``, ``L = 1/2 [CE_rows(S) + CE_cols(S)]`` with the positives on
    the diagonal: ``CE_rows`` = mean_i (LSE_j S_ij - S_ii) (image -> text) and
    ``CE_cols`` = mean_j (LSE_i S_ij - S_jj) (text -> image).

    Args:
        image_features: A, (N, D).
        text_features: B, (N, D).
        logit_scale: s, python number or 0-d tensor.
        logit_bias: optional additive bias b, python number or 0-d tensor.

    Returns:
        0-d tensor, the loss.
    """
    _check_pair(image_features, text_features)
    _check_scale("logit_scale", logit_scale)
    _check_scale("logit_bias", logit_bias)
    logits = logit_scale * (image_features @ text_features.T)  # (N, N): rows = images
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = _labels(logits.shape[0], logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# --------------------------------------------------------------------------------------
# 2. SigLIP
# --------------------------------------------------------------------------------------
def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    logit_bias: Optional[Scale],
) -> torch.Tensor:
    """Pairwise sigmoid loss, as OpenCLIP ``SigLipLoss`` (single process).

    ``S = s * A @ B.T + b``, ``z_ij = +1 if i == j else -1``,
    ``L = -(1/N) sum_ij logsigmoid(z_ij S_ij)`` (a sum over all N^2 pairs divided by N,
    not a mean over pairs).

    Args:
        image_features: A, (N, D).
        text_features: B, (N, D).
        logit_scale: s, python number or 0-d tensor.
        logit_bias: b, python number or 0-d tensor (``None`` means no bias).

    Returns:
        0-d tensor, the loss.
    """
    _check_pair(image_features, text_features)
    _check_scale("logit_scale", logit_scale)
    _check_scale("logit_bias", logit_bias)
    logits = logit_scale * (image_features @ text_features.T)
    if logit_bias is not None:
        logits = logits + logit_bias
    n = logits.shape[0]
    sign = torch.where(_eye_mask(n, logits.device), 1.0, -1.0).to(logits.dtype)
    return -F.logsigmoid(sign * logits).sum() / n


# --------------------------------------------------------------------------------------
# 3. Multi-view InfoNCE and MV-DHEL
# --------------------------------------------------------------------------------------
def multiview_infonce_loss(views: Views, logit_scale: Scale) -> torch.Tensor:
    """MV-InfoNCE, following the code of pakoromilas/Multi-View-CL ``MVINFONCE``.

    With u_il the features of sample i in view l (used as given: the published code
    normalizes them first, the caller does that here) and s = 1 / tau::

        L = -(1/N) sum_i log [ sum_{l != l'} exp(s u_il.u_il')
                               / sum_l sum_{(j,m) != (i,l)} exp(s u_il.u_jm) ]

    The numerator runs over ordered pairs of distinct views (the published ``2 * sum_{l<l'}``);
    the denominator over every other row of the stacked (V*N, D) matrix, for every view of
    sample i. Computed in log space (``logsumexp``), with the self-similarity removed by an
    exact ``-inf`` mask, so small tau and many views do not overflow.

    Args:
        views: (V, N, D) tensor, or a sequence of V tensors (N, D) (stacked), V >= 2.
        logit_scale: s = 1 / tau, python number or 0-d tensor.

    Returns:
        0-d tensor, the loss.
    """
    _check_scale("logit_scale", logit_scale)
    u = _stack_views(views)
    v, n, d = u.shape
    z = u.reshape(v * n, d)  # row l * N + i: view-major, as the published code stacks it
    sim = logit_scale * (z @ z.T)  # (V N, V N)
    sim = sim.masked_fill(_eye_mask(v * n, sim.device), float("-inf"))
    row_lse = torch.logsumexp(sim, dim=1).view(v, n)  # log sum_{(j,m) != (i,l)} for each (l, i)
    log_den = torch.logsumexp(row_lse, dim=0)  # (N,): also summed over the anchor's view l

    pos = logit_scale * torch.einsum("lnd,knd->nlk", u, u)  # (N, V, V): s u_il . u_ik
    pos = pos.masked_fill(_eye_mask(v, pos.device), float("-inf"))  # ordered pairs l != k
    log_num = torch.logsumexp(pos.reshape(n, v * v), dim=1)  # (N,)
    return (log_den - log_num).mean()


def multiview_dhel_loss(views: Views, logit_scale: Scale) -> torch.Tensor:
    """MV-DHEL, following the code of pakoromilas/Multi-View-CL ``MVDHEL`` (default mode).

    With u_il the features of sample i in view l (used as given) and s = 1 / tau::

        L = -(1/N) sum_i [ LSE_{l < l'} (s u_il.u_il') - sum_l LSE_{j != i} (s u_il.u_jl) ]

    Alignment: unordered pairs of distinct views of the same sample. Uniformity: within
    each view separately, every other sample. With V = 2 this is DHEL
    (pakoromilas/DHEL-KCL, ``include_augs=True``). Computed in log space with an exact
    ``-inf`` mask on the self-similarities.

    Args:
        views: (V, N, D) tensor, or a sequence of V tensors (N, D) (stacked); V >= 2 and
            N >= 2 (with N == 1 the uniformity term has no negatives and the loss is -inf).

    Returns:
        0-d tensor, the loss.
    """
    _check_scale("logit_scale", logit_scale)
    u = _stack_views(views)
    v, n, _ = u.shape
    if n < 2:
        raise ValueError("MV-DHEL needs N >= 2 samples: its uniformity term has no negatives")
    sim = logit_scale * torch.einsum("lid,ljd->lij", u, u)  # (V, N, N), per view
    sim = sim.masked_fill(_eye_mask(n, sim.device), float("-inf"))
    log_neg = torch.logsumexp(sim, dim=2).sum(dim=0)  # (N,): sum over views of LSE_{j != i}

    pos = logit_scale * torch.einsum("lnd,knd->nlk", u, u)  # (N, V, V)
    rows, cols = torch.triu_indices(v, v, offset=1, device=pos.device)  # pairs l < l'
    log_pos = torch.logsumexp(pos[:, rows, cols], dim=1)  # (N,)
    return (log_neg - log_pos).mean()


# --------------------------------------------------------------------------------------
# 4. GRAM
# --------------------------------------------------------------------------------------
#: GRAM's degeneracy floor, in machine epsilons of the dtype the determinant is computed
#: in. A computed det G_ij carries rounding of up to ~30 eps times Hadamard's bound
#: B_ij = prod of the diagonal of G_ij = |t_i|^2 prod_r |o^r_j|^2 (measured for D <= 4096,
#: M <= 6, float32 and float64), so det <= GRAM_DEGENERATE_ULPS eps B_ij cannot be told
#: from 0: there the volume is taken as exactly 0, with derivative 0.
GRAM_DEGENERATE_ULPS = 64


def gram_degenerate_rtol(dtype: torch.dtype) -> float:
    """The relative degeneracy floor for determinants computed in ``dtype`` (float32 for
    16-bit inputs): ``GRAM_DEGENERATE_ULPS * finfo(dtype).eps`` (2^-17 for float32, 2^-46
    for float64)."""
    work = torch.promote_types(dtype, torch.float32)
    return GRAM_DEGENERATE_ULPS * torch.finfo(work).eps


def _safe_sqrt(x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """The volume from a determinant: sqrt(x) where x > floor, else 0, derivative 0 there.

    ``floor`` (broadcastable to x) is the degeneracy floor rtol * B of the determinant's
    rounding (``gram_degenerate_rtol``): below it the computed x is rounding noise (det of
    collinear or coincident vectors comes out as +-1e-34 in float64, say), and
    d sqrt(x) = dx / (2 sqrt(x)) would multiply a rounding-level dx by 1 / sqrt(noise).
    The double ``torch.where``: the inner one replaces the entries at or below the floor
    by 1 before the sqrt, so its backward never evaluates 1 / (2 sqrt(0)) (0 * inf = NaN);
    the outer one puts ``x * 0`` there: 0 for finite x, NaN for NaN or infinite x, so that
    NaN and inf inputs reach the loss instead of ranking as a perfect match.
    """
    keep = x > floor
    safe = torch.where(keep, x, torch.ones_like(x))
    return torch.where(keep, torch.sqrt(safe), x * 0)


def _check_gram_inputs(anchor: torch.Tensor, others: Sequence[torch.Tensor]) -> list:
    _check_2d("anchor", anchor)
    if isinstance(others, torch.Tensor) and others.dim() == 2:
        raise ValueError("others must be a sequence of (N, D) tensors (one per other modality)")
    others = list(others)
    if not others:
        raise ValueError("GRAM needs at least one other modality (M >= 2)")
    for k, o in enumerate(others):
        _check_2d(f"others[{k}]", o)
        if o.shape[1] != anchor.shape[1]:
            raise ValueError(f"others[{k}] has D = {o.shape[1]}, anchor has D = {anchor.shape[1]}")
        if o.shape[0] != others[0].shape[0]:
            raise ValueError("all of others must share one batch size")
    return others


def gram_volume(anchor: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gramian volumes between every anchor sample and every tuple of the other modalities.

    As ispamm/GRAM ``utils/volume.py::volume_computation(anchor, *others)``::

        G_ij = Gram(t_i, o^1_j, ..., o^{M-1}_j)        (M x M, entries are dot products)
        V_ij = sqrt(det G_ij)

    Row i is the anchor (text) sample, column j the sample shared by the other modalities.
    A determinant within rounding of 0 (det G_ij <= rtol * B_ij, B_ij = |t_i|^2 prod_r
    |o^r_j|^2 Hadamard's bound, rtol = ``gram_degenerate_rtol``: 2^-17 for float32, 2^-46
    for float64) gives volume exactly 0 with derivative 0 (see ``_safe_sqrt``), so
    collinear or coincident vectors give volume 0 and FINITE, rounding-free gradients;
    above the floor V = sqrt(det) and its true gradient. The published code takes
    ``sqrt(|det|)`` instead, whose value there is sqrt of rounding noise (at most
    sqrt(rtol B), 0.3 % of sqrt(B) in float32) and whose gradient is NaN where det == 0 and
    rounding-dominated near it. NaN or inf inputs give NaN volumes.

    Materializes the (N_a, N_o, M, M) Gram tensor. The determinant is computed in the
    inputs' dtype, or in float32 for 16-bit inputs (no 16-bit det kernel).

    Args:
        anchor: t, (N_a, D).
        others: sequence of M - 1 >= 1 tensors (N_o, D).

    Returns:
        (N_a, N_o) tensor of volumes.
    """
    others = _check_gram_inputs(anchor, others)
    n_a, n_o = anchor.shape[0], others[0].shape[0]
    m = len(others) + 1
    tt = (anchor * anchor).sum(dim=1)  # (N_a,)
    to = torch.stack([anchor @ o.T for o in others], dim=-1)  # (N_a, N_o, M-1)
    oo_rows = torch.stack(others, dim=1)  # (N_o, M-1, D)
    oo = oo_rows @ oo_rows.transpose(1, 2)  # (N_o, M-1, M-1)

    gram = torch.cat(
        [
            torch.cat([tt[:, None, None].expand(n_a, n_o, 1), to], dim=-1)[:, :, None, :],
            torch.cat([to[:, :, :, None], oo[None].expand(n_a, n_o, m - 1, m - 1)], dim=-1),
        ],
        dim=2,
    )  # (N_a, N_o, M, M), symmetric
    work = torch.promote_types(gram.dtype, torch.float32)
    gram = gram.to(work)
    det = torch.linalg.det(gram)
    bound = gram.diagonal(dim1=-2, dim2=-1).prod(dim=-1).detach()  # Hadamard: det <= bound
    return _safe_sqrt(det, gram_degenerate_rtol(work) * bound)


def gram_loss(
    anchor: torch.Tensor,
    others: Sequence[torch.Tensor],
    logit_scale: Scale,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """GRAM volume contrastive loss, as the training loss of ispamm/GRAM ``model/gram.py``.

    ``V = gram_volume(anchor, others)`` (N, N), row i = anchor sample, column j = other
    modalities' sample, and::

        L = 1/2 [ CE_rows(-s V) + CE_cols(-s V) ]

    ``CE_rows`` classifies, for each anchor i, which column j is its own (the published
    ``F.cross_entropy(-volume, targets)``, "d2a"); ``CE_cols`` classifies, for each j, which
    anchor i is its own (the published ``volumeT = volume_computation(t_all, v, a).T``,
    "a2d"). Both use ``label_smoothing``. GRAM divides by a temperature:
    ``logit_scale = 1 / temperature``; its training uses ``label_smoothing=0.1``.

    Args:
        anchor: t, (N, D).
        others: sequence of M - 1 >= 1 tensors (N, D).
        logit_scale: s, python number or 0-d tensor.
        label_smoothing: in [0, 1], applied in both cross entropies.

    Returns:
        0-d tensor, the loss (in float32 for 16-bit inputs, see ``gram_volume``).
    """
    _check_scale("logit_scale", logit_scale)
    others = _check_gram_inputs(anchor, others)
    if others[0].shape[0] != anchor.shape[0]:
        raise ValueError(
            f"anchor has N = {anchor.shape[0]} samples, others have N = {others[0].shape[0]}"
        )
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    logits = -logit_scale * gram_volume(anchor, others)
    labels = _labels(logits.shape[0], logits.device)
    return 0.5 * (
        F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)
    )


# --------------------------------------------------------------------------------------
# 5. Symile
# --------------------------------------------------------------------------------------
def _check_symile_inputs(representations: Sequence[torch.Tensor]) -> list:
    reps = list(representations)
    check_symile_modalities(len(reps), "clip_loss")
    for k, r in enumerate(reps):
        _check_2d(f"representations[{k}]", r)
    if len({tuple(r.shape) for r in reps}) != 1:
        raise ValueError(
            f"all representations must share one (N, D) shape, got {[tuple(r.shape) for r in reps]}"
        )
    if reps[0].shape[0] < 1:
        raise ValueError("the batch is empty (N == 0)")
    return reps


def _as_permutations(permutations, m: int, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(permutations, torch.Tensor):
        perms = permutations.to(device=device, dtype=torch.long)
    else:
        perms = torch.as_tensor(
            [[list(map(int, p)) for p in row] for row in permutations],
            dtype=torch.long,
            device=device,
        )
    if tuple(perms.shape) != (m, m - 1, n):
        raise ValueError(
            f"permutations must have shape (M, M-1, N) = {(m, m - 1, n)}, got {tuple(perms.shape)}"
        )
    # The value check reads the tensor (a host sync Dynamo cannot trace): skipped while
    # compiling, as objectives/symile.py does.
    if perms.numel() and not torch.compiler.is_compiling():
        if int(perms.min()) < 0 or int(perms.max()) >= n:
            raise ValueError(f"permutations must hold row indices in [0, {n})")
    return perms


def symile_loss(
    representations: Sequence[torch.Tensor],
    logit_scale: Scale,
    negative_sampling: str = "n",
    generator: Optional[torch.Generator] = None,
    permutations: Optional[Union[torch.Tensor, Sequence]] = None,
) -> torch.Tensor:
    """Symile loss, as ``symile.Symile(negative_sampling)(representations, logit_scale)``.

    ``MIP(x, y, z, ...) = sum_d x_d y_d z_d ...``. Every modality m takes a turn as the
    anchor, in list order; the others keep their list order; ``L = (1/M) sum_m CE_m``
    with CE_m the mean cross entropy of anchor m's logits, positive in column i.

    ``negative_sampling="n"``: row i of anchor m's (N, N) logit matrix holds, in column
    j != i, ``s * MIP(x^m_i, x^{o_1}_{p_1[j]}, ..., x^{o_{M-1}}_{p_{M-1}[j]})`` and in
    column i the positive ``s * MIP(x^m_i, x^{o_1}_i, ...)``. The index maps are
    ``p_k = perms[m, k]``, ``perms`` an (M, M-1, N) tensor:

    * ``permutations`` given: used as is (any indices in [0, N) are accepted).
    * otherwise drawn by ``_sampling.symile_negative_permutations`` -- one
      ``torch.randperm(N)`` per (anchor, other modality), anchors in order, others in
      order, from ``generator`` or else the default generator, exactly as the published
      package draws them. So after ``torch.manual_seed(k)`` this returns the published
      value for the same seed.

    ``negative_sampling="n_squared"``: anchor m's row i holds all N^(M-1) index tuples
    ``(j_1, ..., j_{M-1})`` of the other modalities as candidates, positive tuple
    ``(i, ..., i)``; materializes an (N, N^(M-1)) logit tensor and an (N^(M-1), D)
    product tensor per anchor. No random numbers are drawn (``generator`` is unused).

    Args:
        representations: sequence of M >= 3 tensors (N, D). M == 2 raises ValueError
            (that is CLIP InfoNCE: use ``clip_loss``).
        logit_scale: s, python number or 0-d tensor.
        negative_sampling: ``"n"`` or ``"n_squared"``.
        generator: ``torch.Generator`` to draw the "n" permutations from.
        permutations: explicit (M, M-1, N) index maps for "n" (tensor or nested lists).

    Returns:
        0-d tensor, the loss.
    """
    _check_scale("logit_scale", logit_scale)
    reps = _check_symile_inputs(representations)
    m = len(reps)
    n = reps[0].shape[0]
    device = reps[0].device
    labels = _labels(n, device)

    if negative_sampling == "n":
        if permutations is not None and generator is not None:
            raise ValueError("give either permutations or generator, not both")
        if permutations is None:
            perms = symile_negative_permutations(m, n, generator=generator, device=device)
        else:
            perms = _as_permutations(permutations, m, n, device)
        diag = _eye_mask(n, device)
        losses = []
        for a in range(m):
            others = [r for o, r in enumerate(reps) if o != a]
            negatives = torch.ones_like(reps[a])
            positives = reps[a]
            for k, r in enumerate(others):
                negatives = negatives * r[perms[a, k]]  # row j: x^{o_k}_{p_k[j]}
                positives = positives * r
            logits = reps[a] @ negatives.T  # (N, N)
            logits = torch.where(diag, positives.sum(dim=1), logits)
            losses.append(F.cross_entropy(logit_scale * logits, labels))
        return sum(losses) / m

    if negative_sampling == "n_squared":
        if permutations is not None:
            raise ValueError('permutations only apply to negative_sampling="n"')
        d = reps[0].shape[1]
        k_others = m - 1
        # flat index of the tuple (i, ..., i) with the first other modality most significant
        stride = sum(n**p for p in range(k_others))
        targets = labels * stride
        losses = []
        for a in range(m):
            others = [r for o, r in enumerate(reps) if o != a]
            prod = None
            for k, r in enumerate(others):
                shape = [1] * k_others + [d]
                shape[k] = n
                term = r.reshape(shape)
                prod = term if prod is None else prod * term  # broadcast to (N,)*(M-1)+(D,)
            logits = reps[a] @ prod.reshape(n**k_others, d).T  # (N, N^(M-1))
            losses.append(F.cross_entropy(logit_scale * logits, targets))
        return sum(losses) / m

    raise ValueError(f"negative_sampling must be 'n' or 'n_squared', got {negative_sampling!r}")


def supcon_loss(
    features: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: Scale,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """Supervised contrastive loss (docs/objectives.md section 7) as HobbitLong/SupContrast's
    ``SupConLoss`` (contrast_mode "all") computes it, features given as (V, N, D) (its
    input is (N, V, D)): the (V N, V N) logits, the anchor masked out of its denominator,
    the mean log-probability of its positives (0 where it has none), times -tau / base."""
    v, n, d = features.shape
    z = features.reshape(v * n, d)  # view-major, as torch.cat(torch.unbind(x, dim=1))
    ids = torch.arange(n, device=z.device) if labels is None else labels
    same = (ids[:, None] == ids[None, :]).repeat(v, v)
    eye = torch.eye(v * n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T) / temperature
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    pos = same & ~eye
    count = pos.sum(dim=1)
    mean_log_prob = (log_prob * pos).sum(dim=1) / torch.where(count > 0, count, 1)
    return (-(temperature / base_temperature) * mean_log_prob).view(v, n).mean()


def clip_logits(
    a: torch.Tensor, b: torch.Tensor, logit_scale: Scale, logit_bias: Optional[Scale] = None
) -> torch.Tensor:
    """The dense (n, m) logits ``logit_scale * a @ b.T + logit_bias`` of a (n, D), b (m, D)
    (OpenCLIP's ``get_logits``, for inspection)."""
    logits = logit_scale * a @ b.T
    return logits if logit_bias is None else logits + logit_bias


def info_nce_loss(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negative_keys: Optional[torch.Tensor],
    temperature: Scale,
    reduction: str = "mean",
    negative_mode: str = "unpaired",
) -> torch.Tensor:
    """info-nce-pytorch's ``info_nce`` on already L2-normalized inputs: query (N, D)
    against its positive_key (N, D) and either the other samples' keys (negative_keys
    None: (N, N) logits, labels on the diagonal), shared negatives ((M, D), "unpaired") or
    its own ((N, M, D), "paired"): (N, 1 + M) logits, label 0. A cross entropy of the
    logits / temperature with ``reduction`` "mean", "sum" or "none"."""
    q, k = query, positive_key
    if negative_keys is None:
        logits = q @ k.T
        labels = torch.arange(len(q), device=q.device)
    else:
        positive = (q * k).sum(dim=1, keepdim=True)
        if negative_mode == "unpaired":
            negative = q @ negative_keys.T
        else:
            negative = (q.unsqueeze(1) @ negative_keys.transpose(-2, -1)).squeeze(1)
        logits = torch.cat([positive, negative], dim=1)
        labels = torch.zeros(len(logits), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits / temperature, labels, reduction=reduction)


def symile_two_modality_n_loss(
    representations: Sequence[torch.Tensor], logit_scale: Scale, permutations: torch.Tensor
) -> torch.Tensor:
    """The symile package's "n" loss for M = 2 (which :func:`symile_loss` refuses: it is
    CLIP with shuffled negatives): anchor a's (N, N) logits s x^a (x^b[perms[a, 0]])^T with
    the positive s <x^a_i, x^b_i> on the diagonal, the mean of the two cross entropies.
    ``permutations`` (2, 1, N)."""
    reps = list(representations)
    n = reps[0].shape[0]
    labels = torch.arange(n, device=reps[0].device)
    eye = torch.eye(n, dtype=torch.bool, device=reps[0].device)
    losses = []
    for a in range(2):
        other = reps[1 - a]
        logits = reps[a] @ other[permutations[a, 0]].T
        logits = torch.where(eye, (reps[a] * other).sum(dim=1), logits)
        losses.append(F.cross_entropy(logit_scale * logits, labels))
    return sum(losses) / 2
