"""flashcontrast.compat.sentence_transformers against the installed sentence-transformers
(a test-only extra): MultipleNegativesRankingLoss on every direction combination the
package accepts x joint / per_direction x pairs / triplets / 3 hard negatives x cos_sim /
dot_score on every backend, in value and embedding gradients, by the verification rule
against a float64 run of the package's own compute_loss_from_embeddings; the hardness
penalties likewise; the fallbacks (another similarity, gather_across_devices) equal to the
package and warning once; the symmetric class; the cached class's whole GradCache forward /
backward on a tiny offline SentenceTransformer, its parameter gradients equal to the
package's."""

from __future__ import annotations

import itertools
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("sentence_transformers", reason="pip package sentence-transformers is missing")

from sentence_transformers import SentenceTransformer, util
from sentence_transformers.sentence_transformer import losses as st_losses

from flashcontrast.compat import sentence_transformers as compat_st
from verification import BACKENDS, assert_by_rule

OPTIONAL = ("query_to_query", "doc_to_query", "doc_to_doc")
# every direction set with query_to_doc (the package requires it) x the partition modes
# the package accepts (per_direction only without the same-type directions)
COMBOS = [
    (("query_to_doc", *extra), mode)
    for k in range(len(OPTIONAL) + 1)
    for extra in itertools.combinations(OPTIONAL, k)
    for mode in ("joint", "per_direction")
    if mode == "joint" or not set(extra) & {"query_to_query", "doc_to_doc"}
]
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
SIMS = {"cos_sim": (util.cos_sim, 20.0), "dot_score": (util.dot_score, 1.5)}


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Each test sees the one-time warnings afresh."""
    monkeypatch.setattr(compat_st, "_WARNED", set())


def _embeddings(n, d, docs, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(0.4 * torch.randn(n, d, generator=g)).to(dtype) for _ in range(1 + docs)]


def _loss_and_grads(loss_fn, embs, dtype=None, grad_out=1.3):
    xs = [e.detach().to(dtype or e.dtype).requires_grad_() for e in embs]
    loss = loss_fn.compute_loss_from_embeddings(xs, None)
    return [loss.detach(), *torch.autograd.grad(loss * grad_out, xs)]


def _names(k):
    return ("loss", "d_queries", "d_positives", *[f"d_negatives_{i}" for i in range(k - 2)])


def test_combos_are_what_the_package_accepts():
    accepted = []
    for k in range(len(OPTIONAL) + 1):
        for extra in itertools.combinations(OPTIONAL, k):
            for mode in ("joint", "per_direction"):
                try:
                    st_losses.MultipleNegativesRankingLoss(
                        None, directions=("query_to_doc", *extra), partition_mode=mode
                    )
                except ValueError:
                    continue
                accepted.append((("query_to_doc", *extra), mode))
    assert accepted == COMBOS and len(COMBOS) == 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sim", sorted(SIMS))
@pytest.mark.parametrize("hard", [0, 1, 3], ids=["pairs", "triplets", "h3"])
@pytest.mark.parametrize(("directions", "mode"), COMBOS, ids=lambda x: "+".join(x) if isinstance(x, tuple) else x)  # noqa: E501  # fmt: skip
def test_equals_the_package(backend, sim, hard, directions, mode):
    fct, scale = SIMS[sim]
    kw = dict(scale=scale, similarity_fct=fct, directions=directions, partition_mode=mode)
    ours = compat_st.MultipleNegativesRankingLoss(None, **kw, backend=backend)
    theirs = st_losses.MultipleNegativesRankingLoss(None, **kw)
    embs = _embeddings(9, 16, 1 + hard, seed=len(directions) * 10 + hard)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path never falls back here
        got = _loss_and_grads(ours, embs)
    same = _loss_and_grads(theirs, embs)
    exact = _loss_and_grads(theirs, embs, torch.float64)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for a, b in zip(got, same):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert_by_rule(_names(len(embs)), got, same, exact, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_embeddings_by_the_rule(backend, dtype):
    """16-bit embeddings are swept in their dtype (the package upcasts them): a float32
    loss within the rule's 16-bit tolerance of the float64 run."""
    ours = compat_st.MultipleNegativesRankingLoss(None, directions=ALL, backend=backend)
    theirs = st_losses.MultipleNegativesRankingLoss(None, directions=ALL)
    embs = _embeddings(9, 16, 2, seed=2, dtype=dtype)
    got = _loss_and_grads(ours, embs)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    same = _loss_and_grads(theirs, embs)
    assert_by_rule(_names(3), got, same, _loss_and_grads(theirs, embs, torch.float64), dtype)


def test_the_fused_path_never_calls_the_package(monkeypatch):
    """No similarity matrix: the package's loss computations never run on the fused path."""

    def refuse(*args, **kwargs):
        raise AssertionError("the package's computation ran")

    monkeypatch.setattr(
        st_losses.MultipleNegativesRankingLoss, "compute_loss_from_embeddings", refuse
    )
    monkeypatch.setattr(st_losses.CachedMultipleNegativesRankingLoss, "calculate_loss", refuse)
    ours = compat_st.MultipleNegativesRankingLoss(None, directions=ALL, backend="torch")
    _loss_and_grads(ours, _embeddings(5, 8, 2, seed=1))
    model = _model(3)
    cached = compat_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, backend="torch")
    cached(_features(6, 3, seed=1), None).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_float64_equals_the_package_tightly():
    kw = dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"))
    ours = compat_st.MultipleNegativesRankingLoss(None, **kw, backend="torch")
    theirs = st_losses.MultipleNegativesRankingLoss(None, **kw)
    embs = _embeddings(13, 8, 3, seed=3, dtype=torch.float64)
    for a, b in zip(_loss_and_grads(ours, embs), _loss_and_grads(theirs, embs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_one_query_with_same_type_directions():
    """N = 1: query_to_query and doc_to_doc have no candidates (an empty logsumexp, -inf),
    which the joint softmax ignores, as the package's -inf entries."""
    kw = dict(directions=("query_to_doc", "query_to_query", "doc_to_doc"))
    ours = compat_st.MultipleNegativesRankingLoss(None, **kw, backend="torch")
    theirs = st_losses.MultipleNegativesRankingLoss(None, **kw)
    embs = _embeddings(1, 8, 2, seed=5)
    got = _loss_and_grads(ours, embs)
    same = _loss_and_grads(theirs, embs)
    assert_by_rule(
        _names(3), got, same, _loss_and_grads(theirs, embs, torch.float64), torch.float32
    )
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[1:])


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if "flashcontrast.compat" in str(w.message)]


# the package's hardness modes at the strengths its docstring cites (Lan et al.: 9;
# Schechter Vera et al.: 5) and one more
HARDNESS = {
    "in_batch": dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
    "hard_negatives": dict(hardness_mode="hard_negatives", hardness_strength=5.0),
    "all_negatives": dict(hardness_mode="all_negatives", hardness_strength=2.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sim", sorted(SIMS))
@pytest.mark.parametrize("hard", [0, 1, 3], ids=["pairs", "triplets", "h3"])
@pytest.mark.parametrize("hardness", sorted(HARDNESS))
@pytest.mark.parametrize("directions", [("query_to_doc",), ALL], ids=["q2d", "all"])
def test_hardness_equals_the_package(backend, sim, hard, hardness, directions):
    """The stop-gradient penalties fused (compat/sentence_transformers.py's
    _hard_query_rows): values and embedding gradients of the package's own computation,
    by the rule against its float64 run, without a fallback."""
    fct, scale = SIMS[sim]
    kw = dict(scale=scale, similarity_fct=fct, directions=directions, **HARDNESS[hardness])
    ours = compat_st.MultipleNegativesRankingLoss(None, **kw, backend=backend)
    theirs = st_losses.MultipleNegativesRankingLoss(None, **kw)
    embs = _embeddings(9, 16, 1 + hard, seed=hard + len(directions))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _loss_and_grads(ours, embs)
    same = _loss_and_grads(theirs, embs)
    exact = _loss_and_grads(theirs, embs, torch.float64)
    assert_by_rule(_names(len(embs)), got, same, exact, torch.float32)


def test_hardness_changes_the_loss():
    """A positive control: the penalty moves the loss and gradients (so the test above
    would see a fused path that ignored it)."""
    embs = _embeddings(9, 16, 2, seed=4)
    plain = _loss_and_grads(compat_st.MultipleNegativesRankingLoss(None, backend="torch"), embs)
    for kw in HARDNESS.values():
        hard = _loss_and_grads(
            compat_st.MultipleNegativesRankingLoss(None, **kw, backend="torch"), embs
        )
        assert (hard[0] - plain[0]).abs() > 1e-3
        assert (hard[1] - plain[1]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "kw",
    [
        dict(similarity_fct=util.manhattan_sim, scale=0.5),
        dict(similarity_fct=util.euclidean_sim, scale=0.5, **HARDNESS["all_negatives"]),
    ],
    ids=["manhattan", "euclidean_hardness"],
)
def test_fallbacks_equal_the_package_and_warn_once(kw):
    directions = (
        ("query_to_doc",)
        if "hardness_mode" in kw
        else ("query_to_doc", "doc_to_query", "doc_to_doc")
    )
    ours = compat_st.MultipleNegativesRankingLoss(None, directions=directions, **kw)
    theirs = st_losses.MultipleNegativesRankingLoss(None, directions=directions, **kw)
    embs = _embeddings(6, 8, 3, seed=7)
    got, first = _warnings_of(lambda: _loss_and_grads(ours, embs))
    again, second = _warnings_of(lambda: _loss_and_grads(ours, embs))
    assert len(first) == 1 and not second, [str(w.message) for w in first + second]
    assert "sentence-transformers' own implementation" in str(first[0].message)
    for a, b, c in zip(got, again, _loss_and_grads(theirs, embs)):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(hardness_mode="hard_negatives", hardness_strength=0.0),
        # without a process group the package's gather is the identity
        dict(gather_across_devices=True, directions=ALL),
    ],
    ids=["hardness_without_strength", "gather_in_one_process"],
)
def test_options_that_stay_fused(kw):
    """No warning, the package's values: a hardness mode with strength 0 (no penalty),
    gather_across_devices=True in one process (the fused local path)."""
    ours = compat_st.MultipleNegativesRankingLoss(None, **kw, backend="torch")
    theirs = st_losses.MultipleNegativesRankingLoss(None, **kw)
    embs = _embeddings(6, 8, 2, seed=8)
    got, caught = _warnings_of(lambda: _loss_and_grads(ours, embs))
    assert not caught
    for a, b in zip(got, _loss_and_grads(theirs, embs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_reference_backend_is_the_package_without_a_warning():
    ours = compat_st.MultipleNegativesRankingLoss(None, backend="reference")
    theirs = st_losses.MultipleNegativesRankingLoss(None)
    embs = _embeddings(5, 4, 1, seed=9)
    got, caught = _warnings_of(lambda: _loss_and_grads(ours, embs))
    assert not caught
    for a, b in zip(got, _loss_and_grads(theirs, embs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_constructor_config_and_checks():
    kw = dict(
        scale=10.0, similarity_fct=util.dot_score, directions=("query_to_doc", "doc_to_query")
    )
    ours = compat_st.MultipleNegativesRankingLoss(None, **kw)
    theirs = st_losses.MultipleNegativesRankingLoss(None, **kw)
    assert isinstance(ours, st_losses.MultipleNegativesRankingLoss)
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert ours.citation == theirs.citation and ours.temperature == theirs.temperature
    assert ours.backend == "auto"
    with pytest.raises(ValueError, match="backend"):
        compat_st.MultipleNegativesRankingLoss(None, backend="gpu")
    with pytest.raises(ValueError, match="query_to_doc"):  # the package's own checks
        compat_st.MultipleNegativesRankingLoss(None, directions=("doc_to_query",))
    with pytest.raises(ValueError, match="at least 2"):
        ours.compute_loss_from_embeddings([torch.randn(3, 4)], None)
    assert "backend" in str(compat_st.CachedMultipleNegativesRankingLoss.__init__.__signature__)


@pytest.mark.parametrize("backend", ["torch", BACKENDS[1]])
def test_symmetric_class(backend):
    with pytest.warns(DeprecationWarning):
        ours = compat_st.MultipleNegativesSymmetricRankingLoss(None, scale=15.0, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = st_losses.MultipleNegativesSymmetricRankingLoss(None, scale=15.0)
    assert isinstance(ours, st_losses.MultipleNegativesSymmetricRankingLoss)
    assert ours.get_config_dict() == theirs.get_config_dict()
    for hard in (0, 1):
        embs = _embeddings(7, 8, 1 + hard, seed=11 + hard)
        got = _loss_and_grads(ours, embs)
        same = _loss_and_grads(theirs, embs)
        exact = _loss_and_grads(theirs, embs, torch.float64)
        assert_by_rule(_names(len(embs)), got, same, exact, torch.float32)


def test_imports_without_sentence_transformers():
    code = (
        "import sys; sys.modules['sentence_transformers'] = None\n"
        "import flashcontrast.compat as c\n"
        "m = c.sentence_transformers\n"
        "try:\n    m.MultipleNegativesRankingLoss\n"
        "except ImportError as e:\n    print('ImportError', 'sentence-transformers' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ImportError True", out.stderr


# ------------------------------------------------------------------ the cached (GradCache) loss
class _Tiny(nn.Module):
    """A bag-of-embeddings encoder with dropout: the replayed RNG matters."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.drop = nn.Dropout(0.2)
        self.lin = nn.Linear(16, 12)

    def forward(self, features):
        x = self.emb(features["input_ids"])
        m = features["attention_mask"].unsqueeze(-1).to(x.dtype)
        x = (self.drop(x) * m).sum(1) / m.sum(1).clamp_min(1)
        features["sentence_embedding"] = self.lin(torch.tanh(x))
        return features


def _model(seed=0):
    torch.manual_seed(seed)
    return SentenceTransformer(modules=[_Tiny()], device="cpu")


def _features(n, columns, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(columns):
        ids = torch.randint(0, 50, (n, 6), generator=g)
        mask = (torch.rand(n, 6, generator=g) > 0.2).long()
        mask[:, 0] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _cached_step(loss_cls, model, features, **kw):
    model.zero_grad(set_to_none=True)
    loss_fn = loss_cls(model, **kw)
    torch.manual_seed(123)  # the same dropout draws for both losses
    loss = loss_fn([dict(f) for f in features], None)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", BACKENDS[1]])
@pytest.mark.parametrize(
    ("directions", "mode", "columns"),
    [
        (("query_to_doc",), "joint", 3),
        (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", 3),
        (("query_to_doc", "doc_to_query"), "per_direction", 2),
        (("query_to_doc",), "joint", 4),
    ],
    ids=["q2d_triplets", "gte_triplets", "symmetric_pairs", "q2d_h2_hardness"],
)
def test_cached_forward_backward_equals_the_package(backend, directions, mode, columns):
    model = _model()
    model.train()
    features = _features(12, columns, seed=columns)
    kw = dict(mini_batch_size=5, directions=directions, partition_mode=mode, scale=20.0)
    if columns == 4:  # the hardness penalty, fused (test_hardness_equals_the_package)
        kw.update(HARDNESS["all_negatives"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got_loss, got = _cached_step(
            compat_st.CachedMultipleNegativesRankingLoss, model, features, **kw, backend=backend
        )
    ref_loss, ref = _cached_step(
        st_losses.CachedMultipleNegativesRankingLoss, model, features, **kw
    )
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
    # the whole batch at once equals the uncached loss, which the package's chunking
    # reproduces too: the cached gradients are those of the full-batch loss
    with torch.no_grad():
        ours = compat_st.CachedMultipleNegativesRankingLoss(model, **kw, backend=backend)
        model.eval()
        torch.testing.assert_close(
            ours([dict(f) for f in features], None),
            st_losses.CachedMultipleNegativesRankingLoss(model, **kw)(
                [dict(f) for f in features], None
            ),
            rtol=1e-5,
            atol=1e-6,
        )


def test_cached_fallback_is_the_packages_chunked_loss():
    model = _model(1)
    features = _features(10, 3, seed=4)
    kw = dict(mini_batch_size=4, similarity_fct=util.manhattan_sim, scale=0.5)
    cls = compat_st.CachedMultipleNegativesRankingLoss
    (got_loss, got), first = _warnings_of(lambda: _cached_step(cls, model, features, **kw))
    _, second = _warnings_of(lambda: _cached_step(cls, model, features, **kw))
    assert len(first) == 1 and not second
    ref_loss, ref = _cached_step(
        st_losses.CachedMultipleNegativesRankingLoss, model, features, **kw
    )
    torch.testing.assert_close(got_loss, ref_loss, rtol=0, atol=0)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_cached_config_and_delegation():
    model = _model(2)
    ours = compat_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, scale=7.0)
    theirs = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, scale=7.0)
    assert isinstance(ours, st_losses.CachedMultipleNegativesRankingLoss)
    assert ours.get_config_dict() == theirs.get_config_dict()
    ours.scale = 5.0  # delegated to the wrapped loss, which the fused path reads
    assert ours.loss.scale == 5.0 and ours.scale == 5.0


# ------------------------------------------------------- gather_across_devices over a group
def _gather_step(name: str, loss_fn, local: list) -> list:
    """The loss and the local embeddings' gradients: MNRL's compute_loss_from_embeddings,
    or the cached loss's calculate_loss(with_backward=True) (its gradient cache)."""
    if name == "mnrl":
        return _loss_and_grads(loss_fn, local)
    reps = [[x.clone().requires_grad_()] for x in local]
    loss = loss_fn.calculate_loss(reps, with_backward=True)
    return [loss.detach(), *(r[0].grad for r in reps)]


# (directions, partition mode, hard negatives, other options) of the gathered runs
GATHERED = {
    "q2d": (("query_to_doc",), "joint", 1, {}),
    "all": (ALL, "joint", 2, {}),
    "symmetric": (("query_to_doc", "doc_to_query"), "per_direction", 0, {}),
    "all_negatives": (("query_to_doc", "doc_to_doc"), "joint", 2, HARDNESS["all_negatives"]),
    "in_batch": (("query_to_doc",), "joint", 1, HARDNESS["in_batch"]),
    "hard_negatives": (("query_to_doc",), "joint", 2, HARDNESS["hard_negatives"]),
}


def _gather_body(rank: int, world: int) -> dict:
    """Per rank: the package's and the drop-ins' losses with gather_across_devices=True
    (cosine; each GATHERED configuration), values and the local embeddings' gradients,
    MNRL and the cached loss; the difference of each."""
    n, d = 5, 8
    out = {}
    for (config, (directions, mode, hard, more)), (kind, cls) in itertools.product(
        GATHERED.items(),
        (
            ("mnrl", "MultipleNegativesRankingLoss"),
            ("cached", "CachedMultipleNegativesRankingLoss"),
        ),
    ):
        embs = _embeddings(n * world, d, 1 + hard, seed=11, dtype=torch.float64)
        local = [e[rank * n : (rank + 1) * n] for e in embs]
        kw = dict(directions=directions, partition_mode=mode, **more)
        if kind == "cached":
            kw["mini_batch_size"] = 2
        results = []
        for module in (compat_st, st_losses):
            loss_fn = getattr(module, cls)(_model(), gather_across_devices=True, **kw)
            got, caught = _warnings_of(
                lambda fn=loss_fn, kind=kind, local=local: _gather_step(kind, fn, local)
            )
            results.append(got)
            if module is compat_st:  # the fused path: no fallback warning
                out[f"{kind} {config} warnings"] = [str(w.message) for w in caught]
        ours, theirs = results
        out[f"{kind} {config}"] = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_gather_across_devices_equals_the_package(world, tmp_path):
    """gather_across_devices=True on flashcontrast's process-group path (each rank's rows
    against every rank's embeddings, one row sweep per direction): on 2 and 3 gloo ranks,
    every rank's loss and the gradients of its embeddings equal the package's, whose
    gather carries gradients back to the owners, for MNRL and the cached loss, in every
    direction (GATHERED)."""
    from dist_harness import spawn

    for r, res in enumerate(spawn(world, tmp_path, _gather_body)):
        for config in GATHERED:
            for name in ("mnrl", "cached"):
                assert res[f"{name} {config}"] < 1e-12, (r, config, res)
                assert res[f"{name} {config} warnings"] == [], (r, config, res)
