"""Running a function on W real processes over gloo, for the torch.distributed tests.

``spawn(world, tmp_path, body)`` starts W processes; each joins a gloo process group on
127.0.0.1, runs ``body(rank, world) -> dict`` (a module-level function, so the spawned
processes can import it), waits at a barrier, writes the dict, or the traceback of a
crash, to a JSON file per rank and leaves with os._exit(0): no destroy_process_group and
no interpreter teardown, because gloo's C++ teardown was seen to abort a rank now and then
("terminate called without an active exception", exit -6, in CI on a loaded machine).
Every process is joined with a timeout and killed if it overruns; a crash, an abnormal
exit or a hang fails the test, and every crashed rank's traceback is shown.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import socket
import sys
import traceback
from typing import Callable

# Uneven shard sizes per world size, shared by the distributed tests.
SIZES = {1: [5], 2: [3, 6], 3: [4, 1, 7], 4: [2, 5, 3, 6]}
TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, outdir: str, body: Callable) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        result = body(rank, world)
        dist.barrier()
    except Exception:
        result = {"crash": traceback.format_exc()}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Modules the ranks' parent process (a forkserver) imports once, so that each rank starts
# by a fork of it instead of a fresh interpreter importing torch (about 4 s a process on
# the 2-core CI machine, times W ranks, for every spawn of the suite). The ranks still
# start from a clean state: the server is a fresh process, not a fork of pytest's.
_PRELOAD = ["torch", "torch.distributed", "flashcontrast", "dist_harness"]


def _context() -> mp.context.BaseContext:
    """The start method of the ranks: a forkserver with :data:`_PRELOAD` where the
    platform has one, else spawn."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def spawn(world: int, tmp_path, body: Callable[[int, int], dict]) -> list[dict]:
    """Run ``body`` on ``world`` gloo ranks; return each rank's dict, in rank order."""
    ctx = _context()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, str(tmp_path), body))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(TIMEOUT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"exit codes {codes} (a hang is killed after {TIMEOUT_S} s)"
    results = []
    for r in range(world):
        with open(tmp_path / f"rank{r}.json") as f:
            results.append(json.load(f))
    crashed = [r for r, res in enumerate(results) if "crash" in res]
    # every crash is shown: the first rank's is often only "connection closed by peer"
    assert not crashed, "\n".join(f"rank {r} crashed:\n{results[r]['crash']}" for r in crashed)
    return results


def shard_slice(sizes: list, rank: int) -> slice:
    """The rows [o_r, o_r + n_r) of the global batch that ``rank`` holds (shards of
    ``sizes`` rows in rank order)."""
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


def caught_errors(calls: dict) -> dict:
    """Run each of ``calls`` (kind -> a function of no arguments); kind -> "Type:
    message" of what it raised, or None where it returned (the ``res["errors"]`` that
    :func:`assert_rank_errors` reads)."""
    out = dict.fromkeys(calls)
    for kind, call in calls.items():
        try:
            call()
        except Exception as e:
            out[kind] = f"{type(e).__name__}: {e}"
    return out


def assert_rank_errors(results: list[dict], kind: str, own: str, failing_rank=None) -> list:
    """Every rank raised for the bad call ``kind`` (its message in ``res["errors"][kind]``):
    with ``failing_rank`` None every message names the problem (``own``); otherwise that
    rank's does and the others report that a peer "failed their checks". Returns the
    messages, in rank order."""
    msgs = []
    for r, res in enumerate(results):
        msg = res["errors"][kind]
        assert msg is not None, f"{kind}: rank {r} did not raise"
        want = own if failing_rank is None or r == failing_rank else "failed their checks"
        assert want in msg, (kind, r, msg)
        msgs.append(msg)
    return msgs


def symile_sampling(mode: str, permutations, rank: int = 0) -> dict:
    """The keyword arguments of one Symile negative-sampling mode ("generator",
    "permutations" (3, 2, n) or "default": the global generator, seeded here). Rank 0
    seeds as the single-process run does (77, 99) and the other ranks differently: only
    rank 0's draw may count."""
    import torch

    if mode == "generator":
        return {"generator": torch.Generator().manual_seed(77 + rank)}
    if mode == "permutations":
        return {"permutations": permutations}
    torch.manual_seed(99 + rank)
    return {}


def assert_case_errors(results: list[dict], cases, tol: float) -> None:
    """Every rank reported every case of ``cases`` (keys "/".join of the case's fields) in
    ``res["cases"]``, each error (name -> max abs difference) below ``tol``."""
    for r, res in enumerate(results):
        assert set(res["cases"]) == {"/".join(map(str, c)) for c in cases}
        for key, errs in res["cases"].items():
            for name, err in errs.items():
                assert err < tol, f"rank {r} {key}: {name} off by {err:.3g}"
