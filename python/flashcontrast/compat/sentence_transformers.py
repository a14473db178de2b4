"""sentence-transformers' ranking losses (pip ``sentence-transformers``), fused.

    from flashcontrast.compat.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model, directions=("query_to_doc", "doc_to_query"))
    # was: from sentence_transformers.losses import MultipleNegativesRankingLoss

``MultipleNegativesRankingLoss``, ``MultipleNegativesSymmetricRankingLoss`` and
``CachedMultipleNegativesRankingLoss`` subclass the installed package's classes: the same
constructors (plus a keyword ``backend="auto"``, flashcontrast's backend:
:func:`flashcontrast.backend_for`), ``forward``, ``compute_loss_from_embeddings``,
``get_config_dict`` and ``citation``; ``isinstance`` of the package's class holds. Only the
loss computed from the embeddings changes: the package builds an (N, N (1 + H))
similarity matrix per direction (N queries, 1 + H document columns: the positive and H
hard negatives); here each direction is one "rows" sweep of the pair engine
(``backends/pair.py``), O(N D) memory, no N x N matrix:

==================  =====================================  ============================
direction           sweep (rows a vs columns b)            Pair
==================  =====================================  ============================
``query_to_doc``    queries vs cat(docs); row i's          ``("rows")``: row LSE and
                    positive at column i                   the positive's logit
``query_to_query``  queries vs themselves, self excluded   ``("rows", positives=False,
                                                           exclude_self=True)``, b = None
``doc_to_query``    positives vs queries                   ``("rows", positives=False)``
``doc_to_doc``      positives vs cat(docs), every          ``("rows", positives=False,
                    document of the same query excluded    exclude_self=True)``, groups
                                                           (arange(N), arange(N(1+H)) % N)
==================  =====================================  ============================

(doc_to_doc: column j belongs to query j mod N; a column of row i's query is masked when
it is not the own positive at global column i, which ``exclude_self`` removes.) With
s = ``scale``, ``partition_mode="joint"`` takes log Z_i = logsumexp over the directions'
row logsumexps (one softmax over the concatenated rows), ``"per_direction"`` their mean,
and the loss is mean_i(log Z_i - s sim(q_i, d_i)): the package's formula. ``cos_sim``
normalizes the queries and documents once (``F.normalize``, as the package's
``cos_sim``) and sweeps dot products; ``dot_score`` sweeps the raw embeddings.

Hardness (``hardness_mode`` with ``hardness_strength`` alpha > 0; the package adds
alpha * stop_grad(sim_ij) to the ``query_to_doc`` logits of the negatives the mode names,
after the scale): ``query_to_doc`` becomes one sweep of the in-batch negatives (the
query's own hard negatives left out by groups, its positive given as its logit), at scale
s + alpha with the features' gradients scaled by s / (s + alpha) where the in-batch
negatives are penalized, plus the N x H own hard negatives' logits as O(N H D) dot
products (penalized for "hard_negatives" / "all_negatives"), joined by logsumexp: the
package's values and gradients, no N x N (1 + H) matrix (``objectives/_hardness.py``).

``gather_across_devices=True`` (an initialized process group of more than one rank)
runs on flashcontrast's process-group path, every direction and hardness mode: this
rank's rows against every rank's embeddings, one row sweep per direction on the
all-gathered columns (:func:`flashcontrast.distributed.rows.gathered_query_rows`), the
package's values and gradients (tested on 2 and 3 ranks of equal batches); uneven
per-rank batches are allowed, where the package's gather needs equal ones.

Fallbacks to the package's own computation (its N x N (1 + H) matrices), each with a
warning once per class and reason (``warnings.warn``):

* a ``similarity_fct`` other than ``sentence_transformers.util.cos_sim`` (or its alias
  ``pytorch_cos_sim``) / ``dot_score``, recognized by identity;
* embeddings the engine does not take (sparse, not (N, D), dtypes other than float16 /
  bfloat16 / float32 / float64, mixed dtypes or devices, document columns of another
  batch size).

``backend="reference"`` runs the package's computation too, without a warning.

``CachedMultipleNegativesRankingLoss`` (GradCache) keeps the package's mini-batched
embedding passes (step 1 without gradients, step 3 re-embedding with the cached
gradients) and replaces ``calculate_loss``, its chunked loss stage: the loss of the whole
batch and d loss / d embeddings (the cache) come from ONE fused computation, autograd
through the engine on the detached embeddings, instead of ``mini_batch_size`` rows of the
score matrix at a time; the returned loss is the detached total, as the package's. Its
fallbacks are the package's chunked ``calculate_loss``.

Deliberate differences: 16-bit embeddings are normalized and swept in their dtype with
float32 accumulation (the package's ``cos_sim`` / ``dot_score`` upcast them to float32
first), so the logits carry the 16-bit rounding of the normalized vectors (within the
verification rule's 16-bit tolerance); the loss is float32 either way. The logits of a
direction are s <a_i, b_j> computed in the tile, the same as the package's s * (a @ b.T)
to rounding.

The module imports without sentence-transformers; the classes are built (and the package
imported) on first access.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .. import _dispatch
from .._amp import autocast_off
from .._validation import FEATURE_DTYPES, accumulation_dtype
from ..backends.pair import Pair
from ..distributed.rows import gathered_query_rows, log_partition
from ..objectives._hardness import hard_query_rows
from ..objectives._pair_op import sweep

#: The classes, built on first access (module ``__getattr__``).
_LAZY = (
    "CachedMultipleNegativesRankingLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
)
__all__ = list(_LAZY)

#: The sweep of each direction (module docstring's table), in the package's order.
DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PAIRS = {
    "query_to_doc": Pair("rows"),
    "query_to_query": Pair("rows", positives=False, exclude_self=True),
    "doc_to_query": Pair("rows", positives=False),
    "doc_to_doc": Pair("rows", positives=False, exclude_self=True),
}

#: (class name, reason) pairs already warned about: each fallback warns once per class.
_WARNED: set = set()


def _warn_once(cls: type, reason: str) -> None:
    key = (cls.__name__, reason)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"flashcontrast.compat.sentence_transformers.{cls.__name__}: {reason}; computing the "
        "loss with sentence-transformers' own implementation (its N x N(1+H) similarity "
        "matrices) instead of flashcontrast's fused one",
        UserWarning,
        stacklevel=4,
    )


def _similarity_kind(fct) -> Optional[str]:
    """The kind of the package's ``cos_sim`` ("cos") / ``dot_score`` ("dot"), by identity;
    None for any other similarity function."""
    from sentence_transformers import util

    if fct is util.cos_sim or fct is getattr(util, "pytorch_cos_sim", None):  # an alias
        return "cos"
    if fct is util.dot_score:
        return "dot"
    return None


def _fallback_reason(loss, embeddings) -> Optional[str]:
    """Why the fused path does not take this call (None: it does). ``loss`` holds the
    package's hyperparameters (the loss or the cached loss, which delegates them)."""
    if _similarity_kind(loss.similarity_fct) is None:
        name = getattr(loss.similarity_fct, "__name__", type(loss.similarity_fct).__name__)
        return f"similarity_fct={name!r} is not cos_sim or dot_score"
    if len(embeddings) < 2:
        return "fewer than 2 embedding columns"
    q = embeddings[0]
    for e in embeddings:
        if not isinstance(e, Tensor) or e.layout != torch.strided or e.dim() != 2:
            return "embeddings that are not dense (N, D) tensors"
        if e.dtype not in FEATURE_DTYPES or e.dtype != q.dtype or e.device != q.device:
            return "embeddings of mixed or unsupported dtypes or devices"
        if e.shape != q.shape or e.shape[0] == 0 or e.shape[1] == 0:
            return "embedding columns of different or empty shapes"
    return None


def _hardness(loss) -> Optional[tuple[str, float]]:
    """The package's (hardness_mode, hardness_strength) where it penalizes; else None."""
    if loss.hardness_mode is None or loss.hardness_strength <= 0.0:
        return None
    return loss.hardness_mode, float(loss.hardness_strength)


@autocast_off
def fused_loss(
    embeddings: list,
    scale: float,
    similarity: str,
    directions: tuple,
    partition_mode: str,
    backend: str,
    gather: bool = False,
    hardness: Optional[tuple[str, float]] = None,
) -> Tensor:
    """The package's ``compute_loss_from_embeddings`` on the pair engine: ``embeddings`` =
    [queries, positives, *hard negatives], each (N, D); ``similarity`` "cos" or "dot";
    ``backend`` an already resolved kernel backend; ``gather``: the package's
    ``gather_across_devices`` with an initialized process group of more than one rank
    (this rank's rows against every rank's embeddings,
    :func:`flashcontrast.distributed.rows.gathered_query_rows`); ``hardness``: the
    package's (hardness_mode, hardness_strength > 0), or None (``objectives/_hardness.py``).
    Returns the 0-d loss (this rank's mean) in the accumulation dtype."""
    if similarity == "cos":
        embeddings = [F.normalize(e, p=2, dim=-1) for e in embeddings]
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        terms = gathered_query_rows(
            embeddings[0], embeddings[1:], float(scale), directions=directions,
            partition_mode=partition_mode, hardness=hardness, backend=backend,
        )  # fmt: skip
        return terms.mean()
    q, docs = embeddings[0], embeddings[1:]
    n = q.shape[0]
    docs_all = torch.cat(docs, 0) if len(docs) > 1 else docs[0]
    pos_docs = docs[0]
    s = torch.tensor(float(scale), dtype=accumulation_dtype(q.dtype), device=q.device)
    owners = None  # the query each document column belongs to: column j to query j mod N
    if hardness is not None or "doc_to_doc" in directions:
        owners = (
            torch.arange(n, device=q.device),
            torch.arange(docs_all.shape[0], device=q.device) % n,
        )
    if hardness is None:
        st = sweep(q, docs_all, s, None, PAIRS["query_to_doc"], backend)
        rows = [st["row"]]
        positive = st["pos"]  # s <q_i, d_i>: row i's positive at global column i
    else:

        def in_batch_rows(a, b, at, pl):
            pair = PAIRS["query_to_doc"]
            return sweep(a, b, at, None, pair, backend, groups=owners, positive_logits=pl)["row"]

        row, positive = hard_query_rows(
            q, docs_all, len(docs), s, float(scale), *hardness, in_batch_rows
        )
        rows = [row]
    if "query_to_query" in directions:
        rows.append(sweep(q, None, s, None, PAIRS["query_to_query"], backend)["row"])
    if "doc_to_query" in directions:
        rows.append(sweep(pos_docs, q, s, None, PAIRS["doc_to_query"], backend)["row"])
    if "doc_to_doc" in directions:
        pair = PAIRS["doc_to_doc"]
        rows.append(sweep(pos_docs, docs_all, s, None, pair, backend, groups=owners)["row"])
    return (log_partition(rows, partition_mode) - positive).mean()


class _Fused:
    """The fused ``compute_loss_from_embeddings`` shared by the two uncached classes."""

    backend: str

    def compute_loss_from_embeddings(self, embeddings: list, labels: Tensor) -> Tensor:
        embeddings = list(embeddings)
        reason = _fallback_reason(self, embeddings)
        if reason is not None:
            if len(embeddings) >= 2:
                _warn_once(type(self), reason)
            return super().compute_loss_from_embeddings(embeddings, labels)
        q = embeddings[0]
        chosen = _dispatch.resolve("infonce", q.device, self.backend, q.dtype)
        if chosen == "reference":  # the published dense computation
            return super().compute_loss_from_embeddings(embeddings, labels)
        kind = _similarity_kind(self.similarity_fct)
        return fused_loss(
            embeddings, self.scale, kind, tuple(self.directions), self.partition_mode, chosen,
            self.gather_across_devices, _hardness(self),
        )  # fmt: skip


def _check_backend(backend: str) -> str:
    if backend not in _dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
    return backend


def _with_backend(init, parent) -> None:
    """Give ``init`` (``*args, backend, **kwargs``) the parent's signature + ``backend``."""
    sig = inspect.signature(parent.__init__)
    params = list(sig.parameters.values())
    params.append(inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto"))
    init.__signature__ = sig.replace(parameters=params)


_NOTE = """

    flashcontrast: the loss from the embeddings runs on the pair engine (one "rows" sweep
    per direction, no N x N(1+H) matrix); ``backend=`` chooses flashcontrast's backend.
    Hardness penalties and ``gather_across_devices`` are fused too. Other similarity
    functions fall back to the package's computation with a warning (once per class and
    reason). See :mod:`flashcontrast.compat.sentence_transformers`.
"""


def _build() -> dict:
    from sentence_transformers.sentence_transformer import losses as st_losses

    class MultipleNegativesRankingLoss(_Fused, st_losses.MultipleNegativesRankingLoss):
        __doc__ = "sentence-transformers' MultipleNegativesRankingLoss, fused." + _NOTE

        def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.backend = _check_backend(backend)

    with warnings.catch_warnings():  # subclassing the deprecated class warns (PEP 702)
        warnings.simplefilter("ignore", DeprecationWarning)

        class MultipleNegativesSymmetricRankingLoss(
            _Fused, st_losses.MultipleNegativesSymmetricRankingLoss
        ):
            __doc__ = "sentence-transformers' MultipleNegativesSymmetricRankingLoss, fused." + _NOTE

            def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
                # the package's class warns only when it is instantiated itself, not a subclass
                message = getattr(st_losses.MultipleNegativesSymmetricRankingLoss,
                                  "__deprecated__", None)  # fmt: skip
                if message:
                    warnings.warn(message, DeprecationWarning, stacklevel=2)
                super().__init__(*args, **kwargs)
                self.backend = _check_backend(backend)

    class CachedMultipleNegativesRankingLoss(st_losses.CachedMultipleNegativesRankingLoss):
        __doc__ = "sentence-transformers' CachedMultipleNegativesRankingLoss, fused." + (
            _NOTE
            + """
    The cached variant replaces ``calculate_loss``: the whole batch's loss and its
    embedding gradients (the cache) come from one fused computation; the mini-batched
    embedding passes are the package's.
"""
        )

        def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.backend = _check_backend(backend)

        def calculate_loss(
            self, reps: list, labels: Optional[Tensor] = None, *, with_backward: bool = False
        ) -> Tensor:
            """The whole batch's loss in one fused computation (the package chunks it by
            ``mini_batch_size`` rows); ``with_backward``: back-propagate it into the
            embeddings' ``.grad`` (GradCache's cache) and return it detached."""
            embeddings = [torch.cat(list(r)) for r in reps]
            reason = _fallback_reason(self, embeddings)
            chosen = None
            if reason is None:
                q = embeddings[0]
                chosen = _dispatch.resolve("infonce", q.device, self.backend, q.dtype)
            if reason is not None or chosen == "reference":
                if reason is not None:
                    _warn_once(type(self), reason)
                return super().calculate_loss(reps, labels, with_backward=with_backward)
            loss = fused_loss(
                embeddings,
                self.scale,
                _similarity_kind(self.similarity_fct),
                tuple(self.directions),
                self.partition_mode,
                chosen,
                self.gather_across_devices,
                _hardness(self),
            )
            if with_backward:
                loss.backward()
                loss = loss.detach()
            return loss

    classes = {
        "MultipleNegativesRankingLoss": MultipleNegativesRankingLoss,
        "MultipleNegativesSymmetricRankingLoss": MultipleNegativesSymmetricRankingLoss,
        "CachedMultipleNegativesRankingLoss": CachedMultipleNegativesRankingLoss,
    }
    parents = {
        "MultipleNegativesRankingLoss": st_losses.MultipleNegativesRankingLoss,
        "MultipleNegativesSymmetricRankingLoss": st_losses.MultipleNegativesSymmetricRankingLoss,
        "CachedMultipleNegativesRankingLoss": st_losses.CachedMultipleNegativesRankingLoss,
    }
    for name, cls in classes.items():
        cls.__qualname__ = name  # picklable: the module attribute of that name
        cls.__init__.__doc__ = parents[name].__init__.__doc__  # the package's documentation
        _with_backend(cls.__init__, parents[name])
    return classes


def __getattr__(name: str):
    if name in _LAZY:
        try:
            classes = _build()
        except ImportError as e:
            raise ImportError(
                f"flashcontrast.compat.sentence_transformers.{name} needs the pip package "
                f"sentence-transformers: {e}"
            ) from e
        globals().update(classes)
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
