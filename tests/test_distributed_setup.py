"""flashcontrast.distributed: bad setups raise on every rank, and empty shards work.

Bad setups (W = 2..4 gloo ranks, every objective): one rank passes an argument the others
do not (a different strategy, grad_scaling or backend, D, dtype, bias or groups given on
some ranks only, a different number of views / modalities / label_smoothing /
permutations / Symile negative_sampling) or an input that fails its local checks (an
invalid strategy, grad_scaling or backend value, a sparse or mkldnn or non-tensor feature
input, or a check that raises an exception of an unexpected type). Every rank must raise,
within the harness timeout (a hang fails the test): the same error (TypeError for the
dtype, else ValueError) naming the argument where the ranks disagree; the failed rank's
own error where a local check fails, and on the other ranks a RuntimeError naming the
failed rank and its error. Every rank passing an empty shard (an empty global batch)
raises on every rank. After all the failures one valid call still gives the same loss on
every rank (no collective left behind).

Empty shards: a global batch split unevenly with 0-row shards (one, two, or all but one
rank empty) gives, on every rank and for every objective, both strategies, both gradient
scalings and with groups where supported, the loss and every gradient of the
single-process loss of the concatenated batch (float64, 1e-10); an empty rank's feature
gradients are (0, D) tensors of the input dtype.

One spawn per (world size, objective) for the bad setups, one per shard layout for the
empty shards; the test functions read the cached results.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import pytest
import torch

import flashcontrast.distributed as fd
from dist_harness import SIZES, spawn, symile_sampling

D = 5
SCALE = 4.0
GRAD_OUT = 0.7  # the upstream gradient, the same on every rank
OBJECTIVES = ("clip", "siglip", "mv_infonce", "mv_dhel", "gram", "symile")
LOSS_NAME = {
    "clip": "clip_loss",
    "siglip": "siglip_loss",
    "mv_infonce": "multiview_infonce_loss",
    "mv_dhel": "multiview_dhel_loss",
    "gram": "gram_loss",
    "symile": "symile_loss",
}
# the first feature argument of each objective, as its error messages name it
FIRST_INPUT = {
    "clip": "image_features",
    "siglip": "image_features",
    "mv_infonce": "views[0]",
    "mv_dhel": "views[0]",
    "gram": "anchor",
    "symile": "representations[0]",
}

# ----------------------------------------------------------------------------- bad setups

# kind -> (where the error comes from, the error type: on every rank for "exchange", on the
# failed rank for "local"; a substring every rank's message must hold, {first} = the
# objective's first feature argument)
KINDS = {
    "strategy": ("exchange", "ValueError", "same strategy"),
    "grad_scaling": ("exchange", "ValueError", "same grad_scaling"),
    "backend": ("exchange", "ValueError", "same backend"),
    "dim": ("exchange", "ValueError", "same feature dimension D"),
    "dtype": ("exchange", "TypeError", "same dtype"),
    "empty_global": ("exchange", "ValueError", "global batch is empty"),
    "strategy_value": ("local", "ValueError", "strategy must be 'gather' or 'ring'"),
    "grad_scaling_value": ("local", "ValueError", "grad_scaling must be 'ddp' or 'sum'"),
    # "tpu" is no backend of any loss ("triton" is valid for the losses on the pair
    # engine: CLIP, SigLIP, the multi-view losses and Symile; GRAM accepts "auto" or
    # "torch")
    "backend_value": ("local", "ValueError", "backend must be 'auto'"),
    "sparse": ("local", "TypeError", "{first} must be a dense (strided) tensor"),
    "mkldnn": ("local", "TypeError", "{first} must be a dense (strided) tensor"),
    "not_tensor": ("local", "TypeError", "{first} must be a torch.Tensor"),
    "exploding": ("local", "ArithmeticError", "exploding input"),
    # objective-specific
    "bias": ("exchange", "ValueError", "logit_bias must be given on every rank or on none"),
    "groups": ("exchange", "ValueError", "groups must be given on every rank or on none"),
    "views": ("exchange", "ValueError", "same number of views V"),
    "others": ("exchange", "ValueError", "same number of other modalities K"),
    "label_smoothing": ("exchange", "ValueError", "same label_smoothing"),
    "modalities": ("exchange", "ValueError", "same number of modalities M"),
    "permutations_some": (
        "exchange",
        "ValueError",
        "permutations must be given on every rank or on none",
    ),
    "permutations_differ": ("exchange", "ValueError", "same permutations"),
    # "n_squared" on one rank, "n" on the others (both run over a process group)
    "negative_sampling": ("exchange", "ValueError", "same negative_sampling"),
}
COMMON = (
    "strategy", "grad_scaling", "backend", "dim", "dtype", "empty_global", "strategy_value",
    "grad_scaling_value", "backend_value", "sparse", "mkldnn", "not_tensor", "exploding",
)  # fmt: skip
SPECIFIC = {
    "clip": ("bias", "groups"),
    "siglip": ("bias",),
    "mv_infonce": ("groups", "views"),
    "mv_dhel": ("groups", "views"),
    "gram": ("others", "label_smoothing"),
    "symile": ("modalities", "permutations_some", "permutations_differ", "negative_sampling"),
}


def _kinds(objective: str) -> tuple:
    return COMMON + SPECIFIC[objective]


def _bad_rank(kind: str, world: int) -> int:
    """The rank that passes the odd argument: varies with the kind (rank 0, the last, ...)."""
    return list(KINDS).index(kind) % world


class _Exploding(torch.Tensor):
    """A tensor on which every torch operation (even reading .layout) raises an
    ArithmeticError: a local check failing with an exception that is neither a TypeError
    nor a ValueError."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise ArithmeticError("exploding input")


def _num_inputs(objective: str) -> int:
    return 2 if objective in ("clip", "siglip") else 3


def _call(objective: str, rank: int, world: int, kind: Optional[str], bad: bool):
    """One call of ``objective`` on this rank's shard, with ``kind``'s odd argument when
    ``bad`` (kind None: a valid call). Returns the loss."""
    import flashcontrast.distributed as fd

    n = SIZES[world][rank]
    n_tot = sum(SIZES[world])
    odd = kind if bad else None
    if kind == "empty_global":
        n = 0  # on every rank
    d = D + 1 if odd == "dim" else D
    dtype = torch.float64 if odd == "dtype" else torch.float32
    count = _num_inputs(objective) + (odd in ("views", "others", "modalities"))
    feats = [torch.randn(n, d, dtype=dtype).requires_grad_(kind is None) for _ in range(count)]
    if odd == "sparse":
        feats[0] = feats[0].to_sparse()
    elif odd == "mkldnn":
        feats[0] = feats[0].to_mkldnn()
    elif odd == "not_tensor":
        feats[0] = feats[0].tolist()
    elif odd == "exploding":
        feats[0] = feats[0].as_subclass(_Exploding)
    kw = {
        "strategy": {"strategy": "ring", "strategy_value": "tree"}.get(odd, "gather"),
        "grad_scaling": {"grad_scaling": "sum", "grad_scaling_value": "mean"}.get(odd, "ddp"),
        "backend": {"backend": "torch", "backend_value": "tpu"}.get(odd, "auto"),
    }
    ids = torch.arange(n)
    if objective == "clip":
        bias = 0.5 if odd == "bias" else None
        groups = ids if odd == "groups" else None
        return fd.clip_loss(feats[0], feats[1], SCALE, bias, groups=groups, **kw)
    if objective == "siglip":
        bias = None if odd == "bias" else -1.0
        return fd.siglip_loss(feats[0], feats[1], SCALE, bias, **kw)
    if objective in ("mv_infonce", "mv_dhel"):
        fn = fd.multiview_infonce_loss if objective == "mv_infonce" else fd.multiview_dhel_loss
        return fn(feats, SCALE, groups=ids if odd == "groups" else None, **kw)
    if objective == "gram":
        eps = 0.1 if odd == "label_smoothing" else 0.0
        return fd.gram_loss(feats[0], feats[1:], SCALE, label_smoothing=eps, **kw)
    m = len(feats)
    perms = None
    if kind in ("permutations_some", "permutations_differ"):
        perms = torch.arange(n_tot).expand(m, m - 1, n_tot)
        if odd == "permutations_differ":
            perms = perms.flip(-1)
        if kind == "permutations_some" and not bad:
            perms = None
    sampling = "n_squared" if odd == "negative_sampling" else "n"
    gen = None if perms is not None else torch.Generator().manual_seed(3)
    return fd.symile_loss(
        feats, SCALE, negative_sampling=sampling, permutations=perms, generator=gen, **kw
    )


def _mismatch_body(objective: str, rank: int, world: int) -> dict:
    """Every bad setup of ``objective`` on this rank: (error type, message) or None per
    kind; then one valid forward + backward."""
    out = {}
    for kind in _kinds(objective):
        if kind == "mkldnn" and not torch.backends.mkldnn.is_available():
            continue
        bad = rank == _bad_rank(kind, world)
        try:
            _call(objective, rank, world, kind, bad)
            out[kind] = None
        except Exception as e:  # every type is recorded, and asserted on
            out[kind] = [type(e).__name__, str(e)]
    loss = _call(objective, rank, world, None, False)
    loss.backward()
    out["after"] = loss.item()
    return out


_CACHE: dict = {}


def _results(key: tuple, tmp_path_factory, body) -> list:
    """The per-rank results of ``body`` for ``key`` = (world, ...), spawned once."""
    if key not in _CACHE:
        try:
            _CACHE[key] = spawn(key[0], tmp_path_factory.mktemp("dist"), body)
        except AssertionError as e:  # a crash or a hang: every test of this key fails
            _CACHE[key] = e
    if isinstance(_CACHE[key], AssertionError):
        raise _CACHE[key]
    return _CACHE[key]


@pytest.mark.parametrize(
    "world,objective,kind",
    [(w, o, k) for w in (2, 3, 4) for o in OBJECTIVES for k in _kinds(o)],
)
def test_bad_setup_raises_on_every_rank(world, objective, kind, tmp_path_factory):
    if kind == "mkldnn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no mkldnn tensors")
    body = functools.partial(_mismatch_body, objective)
    results = _results((world, objective), tmp_path_factory, body)
    source, err_type, substring = KINDS[kind]
    substring = substring.format(first=FIRST_INPUT[objective])
    bad = _bad_rank(kind, world)
    for r, res in enumerate(results):
        got = res[kind]
        assert got is not None, f"rank {r} did not raise"
        name, msg = got
        assert f"flashcontrast.distributed.{LOSS_NAME[objective]}: " in msg, (r, msg)
        if source == "exchange" or r == bad:
            assert name == err_type, (r, name, msg)
            assert substring in msg, (r, msg)
        else:
            assert name == "RuntimeError", (r, name, msg)
            assert f"rank(s) [{bad}] failed their checks" in msg, (r, msg)
            assert substring in msg, (r, msg)  # the failed rank's error, relayed
    afters = [res["after"] for res in results]
    assert all(math.isfinite(x) for x in afters) and len(set(afters)) == 1, afters


# ----------------------------------------------------------------------------- empty shards

LAYOUTS = {
    "W2_first_empty": [0, 5],
    "W3_middle_empty": [4, 0, 3],
    "W4_two_empty": [3, 0, 0, 4],
    "W4_one_nonempty": [0, 0, 6, 0],
}


def _err(x, y) -> float:
    return (x.double() - y.double()).abs().max().item() if x.numel() else 0.0


def _rnd(g: torch.Generator, *shape: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1)


def _compare(sizes, rank, scaling, feats, bias, run_dist, run_single) -> dict:
    """feats: the global (N, D) inputs; run_*(inputs, scale, bias) -> loss. Returns the
    max errors of the loss and of every gradient against the single-process run on the
    global batch, and whether this rank's feature gradients are (n_r, D) of the input
    dtype."""
    world = len(sizes)
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    up = torch.tensor(GRAD_OUT, dtype=torch.float64)

    def scalars():
        s = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        b = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
        return s, b

    glob = [f.clone().requires_grad_(True) for f in feats]
    s_ref, b_ref = scalars()
    ref = run_single(glob, s_ref, b_ref)
    ref.backward(up)
    loc = [f[sl].clone().requires_grad_(True) for f in feats]
    s, b = scalars()
    loss = run_dist(loc, s, b)
    loss.backward(up)
    factor = world if scaling == "ddp" else 1
    out = {
        "loss": _err(loss, ref),
        "dfeat": max(_err(x.grad, factor * y.grad[sl]) for x, y in zip(loc, glob)),
        "dscale": _err(s.grad, s_ref.grad),
        "shapes_ok": all(
            x.grad is not None and x.grad.shape == (sizes[rank], D) and x.grad.dtype == x.dtype
            for x in loc
        ),
    }
    if bias is not None:
        out["dbias"] = _err(b.grad, b_ref.grad)
    return out


def _empty_body(layout: str, rank: int, world: int) -> dict:
    """Every objective x strategy x scaling (x groups, bias, label_smoothing or
    permutation source) on this layout, against the single-process loss."""
    import flashcontrast as fc
    import flashcontrast.distributed as fd

    sizes = LAYOUTS[layout]
    n = sum(sizes)
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    g = torch.Generator().manual_seed(2024 + n)
    two = [_rnd(g, n, D), _rnd(g, n, D)]
    three = [_rnd(g, n, D) for _ in range(3)]
    ids = torch.arange(n) % 3  # groups that span the shards
    pair_ids = torch.arange(n) // 2  # MV-DHEL: every row keeps a negative
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(6)]).view(3, 2, n)
    out: dict = {o: {} for o in OBJECTIVES}

    def case(objective, key, feats, bias, run_dist, run_single, scaling):
        out[objective][key] = _compare(sizes, rank, scaling, feats, bias, run_dist, run_single)

    for strategy in ("gather", "ring"):
        for scaling in ("ddp", "sum"):
            kw = {"strategy": strategy, "grad_scaling": scaling}
            for grouped in (False, True):
                for bias in (None, 0.5):
                    gr = ids if grouped else None

                    def dist_clip(t, s, b, gr=gr, kw=kw):
                        return fd.clip_loss(
                            t[0], t[1], s, b, groups=None if gr is None else gr[sl], **kw
                        )

                    def single_clip(t, s, b, gr=gr):
                        return fc.clip_loss(t[0], t[1], s, b, groups=gr, backend="reference")

                    key = f"{strategy}/{scaling}/groups={grouped}/bias={bias}"
                    case("clip", key, two, bias, dist_clip, single_clip, scaling)
            for bias in (None, -1.0):

                def dist_siglip(t, s, b, kw=kw):
                    return fd.siglip_loss(t[0], t[1], s, b, **kw)

                def single_siglip(t, s, b):
                    return fc.siglip_loss(t[0], t[1], s, b, backend="reference")

                key = f"{strategy}/{scaling}/bias={bias}"
                case("siglip", key, two, bias, dist_siglip, single_siglip, scaling)
            for name, fdist, fsingle, gids in (
                ("mv_infonce", fd.multiview_infonce_loss, fc.multiview_infonce_loss, ids),
                ("mv_dhel", fd.multiview_dhel_loss, fc.multiview_dhel_loss, pair_ids),
            ):
                for grouped in (False, True):
                    gr = gids if grouped else None

                    def dist_mv(t, s, b, f=fdist, gr=gr, kw=kw):
                        return f(t, s, groups=None if gr is None else gr[sl], **kw)

                    def single_mv(t, s, b, f=fsingle, gr=gr):
                        return f(t, s, groups=gr, backend="reference")

                    key = f"{strategy}/{scaling}/groups={grouped}"
                    case(name, key, three, None, dist_mv, single_mv, scaling)
            for eps in (0.0, 0.1):

                def dist_gram(t, s, b, eps=eps, kw=kw):
                    return fd.gram_loss(t[0], t[1:], s, label_smoothing=eps, **kw)

                def single_gram(t, s, b, eps=eps):
                    return fc.gram_loss(t[0], t[1:], s, label_smoothing=eps, backend="reference")

                key = f"{strategy}/{scaling}/eps={eps}"
                case("gram", key, three, None, dist_gram, single_gram, scaling)
            for mode in ("generator", "permutations", "default"):

                def dist_symile(t, s, b, mode=mode, kw=kw):
                    # rank 0's generator (or default generator) draws the permutations
                    return fd.symile_loss(t, s, **symile_sampling(mode, perms, rank), **kw)

                def single_symile(t, s, b, mode=mode):
                    return fc.symile_loss(t, s, backend="reference", **symile_sampling(mode, perms))

                key = f"{strategy}/{scaling}/{mode}"
                case("symile", key, three, None, dist_symile, single_symile, scaling)
    return out


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_empty_shards_match_the_single_process_loss(layout, objective, tmp_path_factory):
    sizes = LAYOUTS[layout]
    body = functools.partial(_empty_body, layout)
    results = _results((len(sizes), layout), tmp_path_factory, body)
    expected_cases = {"clip": 16, "siglip": 8, "mv_infonce": 8, "mv_dhel": 8, "gram": 8}
    for r, res in enumerate(results):
        cases = res[objective]
        assert len(cases) == expected_cases.get(objective, 12), sorted(cases)
        for key, case in cases.items():
            assert case["shapes_ok"], (
                f"rank {r} {key}: a gradient is not (n_r, D) of the input dtype"
            )
            for q in ("loss", "dfeat", "dscale", "dbias"):
                if q in case:
                    assert case[q] < 1e-10, f"rank {r} {key}: {q} off by {case[q]:.3g}"


@pytest.mark.parametrize("name", [n for n in fd.__all__ if n.endswith("_loss")])
def test_process_group_keywords_are_checked_like_a_defs(name):
    """Every process-group loss takes its options as ``**options``: a misspelt keyword
    raises TypeError before any communication (no process group needed), naming it."""
    fn = getattr(fd, name)
    params = inspect.signature(fn).parameters.values()
    required = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty]
    kwonly = {p.name: None for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty}
    with pytest.raises(TypeError, match="unexpected keyword argument 'grad_scalling'"):
        fn(*[None] * len(required), **kwonly, grad_scalling="sum")
