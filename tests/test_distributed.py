"""Context-parallel attention against the single-process op, on 2 and 4 CPU processes (gloo).

Spawning processes costs seconds, so each world size is spawned once (module fixture) and runs
every case; each case's result is then checked by its own test. A case compares every rank's
output and q/k/v gradients with the matching slice of ``block_attn.attention`` on the full
sequence. With 4 processes, the 2-rank cases run on two subgroups ({0, 1} and {2, 3}) at once,
which also exercises ``group=``.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import block_attn
from block_attn.distributed import (
    STATS,
    build_schedule,
    chunk_ranges,
    context_parallel_attention,
    shard_sequence,
    unshard_sequence,
)
from block_attn.distributed.schedule import plan_pair


@dataclass(frozen=True)
class Case:
    name: str
    world: int  # 2 or 4 ranks
    seqlen: int
    blocks: str  # "none", "fixed", "ragged", "aligned", "tail" (offsets end before N)
    causal: bool
    layout: str = "zigzag"
    dtype: torch.dtype = torch.float64
    heads: tuple[int, int] = (2, 2)  # (Hq, Hkv)
    schedule: str = "block"
    head_dim: int = 8
    batch: int = 1
    sinks: bool = False
    softcap: float = 0.0
    window: tuple[int, int] = (-1, -1)
    alibi: bool = False
    dropout_p: float = 0.0


def _cases() -> list[Case]:
    cases = []
    for world in (2, 4):
        seqlen = 16 * world
        for layout in ("zigzag", "contiguous"):
            for causal in (False, True):
                tag = f"w{world}-{layout}-{'causal' if causal else 'full'}"
                cases += [
                    Case(f"{tag}-ragged", world, seqlen, "ragged", causal, layout),
                    Case(f"{tag}-fixed", world, seqlen, "fixed", causal, layout),
                    Case(f"{tag}-one-document", world, seqlen, "none", causal, layout),
                ]
        cases += [
            Case(
                f"w{world}-float32-causal-ragged",
                world,
                seqlen,
                "ragged",
                True,
                dtype=torch.float32,
            ),
            Case(
                f"w{world}-float32-full-fixed",
                world,
                seqlen,
                "fixed",
                False,
                "contiguous",
                torch.float32,
            ),
            Case(
                f"w{world}-gqa-causal-ragged", world, seqlen, "ragged", True, heads=(4, 2), batch=2
            ),
            Case(f"w{world}-mqa-full-ragged", world, seqlen, "ragged", False, heads=(4, 1)),
            Case(f"w{world}-ring-causal-ragged", world, seqlen, "ragged", True, schedule="ring"),
            Case(
                f"w{world}-ring-full-none",
                world,
                seqlen,
                "none",
                False,
                "contiguous",
                schedule="ring",
            ),
            Case(f"w{world}-aligned-causal", world, seqlen, "aligned", True),
            Case(
                f"w{world}-aligned-full-contiguous", world, seqlen, "aligned", False, "contiguous"
            ),
            Case(f"w{world}-head-dim-13", world, seqlen, "ragged", True, head_dim=13),
            Case(f"w{world}-rows-after-blocks-causal", world, seqlen, "tail", True),
            Case(f"w{world}-rows-after-blocks-full", world, seqlen, "tail", False, "contiguous"),
            Case(f"w{world}-sinks-causal-ragged", world, seqlen, "ragged", True, sinks=True),
            Case(f"w{world}-softcap-causal-ragged", world, seqlen, "ragged", True, softcap=0.7),
            # Windows narrower and wider than a chunk (seqlen / 2W rows under zigzag).
            Case(f"w{world}-window-causal-ragged", world, seqlen, "ragged", True, window=(5, 0)),
            Case(
                f"w{world}-window-causal-one-document", world, seqlen, "none", True, window=(9, 0)
            ),
            Case(
                f"w{world}-window-full-contiguous",
                world,
                seqlen,
                "fixed",
                False,
                "contiguous",
                window=(3, 6),
            ),
            Case(f"w{world}-alibi-causal-ragged", world, seqlen, "ragged", True, alibi=True),
            Case(f"w{world}-alibi-full-one-document", world, seqlen, "none", False, alibi=True),
            Case(f"w{world}-dropout-causal-ragged", world, seqlen, "ragged", True, dropout_p=0.3),
            Case(
                f"w{world}-all-variants-causal-ragged",
                world,
                seqlen,
                "ragged",
                True,
                heads=(4, 2),
                window=(11, 0),
                softcap=1.3,
                alibi=True,
                dropout_p=0.2,
                sinks=True,
            ),
            Case(
                f"w{world}-all-variants-ring-float32",
                world,
                seqlen,
                "none",
                True,
                dtype=torch.float32,
                schedule="ring",
                window=(7, 0),
                alibi=True,
                dropout_p=0.1,
            ),
        ]
    return cases


CASES = _cases()


def _offsets(case: Case) -> list[int] | None:
    """Global block offsets for the case (None: one block)."""
    n = case.seqlen
    if case.blocks == "none":
        return None
    if case.blocks == "fixed":
        return [*range(0, n, 5), n]  # 5 does not divide the chunk size: blocks cross shards
    if case.blocks == "aligned":
        # Boundaries at every chunk edge, plus one inside each chunk: no block crosses shards.
        chunks = 2 * case.world if case.layout == "zigzag" else case.world
        size = n // chunks
        return sorted({*range(0, n + 1, size), *range(3, n, size)})
    if case.blocks == "tail":
        # The last third of the rows (over one shard at 2 and 4 ranks) belongs to no block.
        return [0, 3, 7, n - n // 3]
    generator = torch.Generator().manual_seed(case.seqlen + case.world)
    cuts = torch.randperm(n - 1, generator=generator)[: n // 7] + 1
    # Empty blocks too: first, and N repeated as when offsets are padded to a fixed count.
    return [0, 0, *sorted(cuts.tolist()), n, n]


def _inputs(case: Case) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1234)
    hq, hkv = case.heads
    shape_q = (case.batch, hq, case.seqlen, case.head_dim)
    shape_kv = (case.batch, hkv, case.seqlen, case.head_dim)
    return tuple(
        torch.randn(shape, generator=generator, dtype=torch.float64).to(case.dtype)
        for shape in (shape_q, shape_kv, shape_kv, shape_q)
    )


def _tolerance(dtype: torch.dtype) -> float:
    # lse is float32 by the op's contract, so the merge weights carry float32 rounding.
    return 1e-5 if dtype == torch.float64 else 1e-4


def _describe(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str | None:
    error = (got.double() - want.double()).abs()
    bound = tol + tol * want.double().abs()
    bad = error > bound
    if not bad.any():
        return None
    worst = int(error.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), error.shape))
    return (
        f"{name}: {int(bad.sum())} of {error.numel()} elements off; worst at {index}: "
        f"got {got.reshape(-1)[worst].item():.6g}, want {want.reshape(-1)[worst].item():.6g}"
    )


def _run_case(case: Case, group: dist.ProcessGroup | None) -> str | None:
    """Returns None on success, else what differed."""
    q, k, v, grad = _inputs(case)
    offsets = _offsets(case)
    block_size = None
    q_full, k_full, v_full = (t.clone().requires_grad_() for t in (q, k, v))
    sinks = None
    if case.sinks:
        sinks = torch.linspace(-1.0, 2.0, case.heads[0], dtype=q.dtype)
    sinks_full = None if sinks is None else sinks.clone().requires_grad_()
    slopes = torch.linspace(0.05, 0.5, case.heads[0]) if case.alibi else None
    variants = dict(
        window_size=case.window, softcap=case.softcap, alibi_slopes=slopes, dropout_p=case.dropout_p
    )
    out_full = block_attn.attention(
        q_full, k_full, v_full, cu_seqlens=offsets, block_size=block_size, causal=case.causal,
        sinks=sinks_full, generator=torch.Generator().manual_seed(99), **variants,
    )  # fmt: skip
    out_full.backward(grad)

    def local(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t, dim=2, group=group, layout=case.layout)

    q_l, k_l, v_l = (local(t).requires_grad_() for t in (q, k, v))
    sinks_l = None if sinks is None else sinks.clone().requires_grad_()
    out_l = context_parallel_attention(
        q_l,
        k_l,
        v_l,
        cu_seqlens=offsets,
        causal=case.causal,
        group=group,
        layout=case.layout,
        schedule=case.schedule,
        sinks=sinks_l,
        generator=torch.Generator().manual_seed(99),
        **variants,
    )
    out_l.backward(local(grad))
    tol = _tolerance(case.dtype)
    problems = [
        _describe("out", out_l, local(out_full.detach()), tol),
        _describe("grad_q", q_l.grad, local(q_full.grad), tol),
        _describe("grad_k", k_l.grad, local(k_full.grad), tol),
        _describe("grad_v", v_l.grad, local(v_full.grad), tol),
    ]
    if sinks is not None:
        # Each rank's sinks gradient covers its own rows; the sum is the full gradient.
        grad_sinks = sinks_l.grad.clone()
        dist.all_reduce(grad_sinks, group=group)
        problems.append(_describe("grad_sinks", grad_sinks, sinks_full.grad, tol))
    gathered = unshard_sequence(out_l.detach(), dim=2, group=group, layout=case.layout)
    problems.append(_describe("unshard(out)", gathered, out_full.detach(), tol))
    problems = [p for p in problems if p]
    return "; ".join(problems) or None


def _run_bytes(world: int, group: dist.ProcessGroup | None) -> dict[str, int]:
    """Bytes this rank sends for one forward + backward under several schedules."""
    rank = dist.get_rank(group)
    results = {}
    seqlen = 16 * world
    ragged = _offsets(Case("", world, seqlen, "ragged", True))
    aligned = _offsets(Case("", world, seqlen, "aligned", True))
    for name, offsets, schedule in (
        ("aligned-block", aligned, "block"),
        ("aligned-ring", aligned, "ring"),
        ("ragged-block", ragged, "block"),
        ("ragged-ring", ragged, "ring"),
    ):
        q, k, v, grad = (
            shard_sequence(t, dim=2, group=group)
            for t in _inputs(Case("", world, seqlen, "", True))
        )
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        STATS.reset()
        out = context_parallel_attention(
            q, k, v, cu_seqlens=offsets, causal=True, group=group, schedule=schedule
        )
        results[f"{name}-forward"] = STATS.bytes_sent
        STATS.reset()
        out.backward(grad)
        results[f"{name}-backward"] = STATS.bytes_sent
    # One document under a causal window narrower than a shard: each rank needs only its
    # predecessor's keys.
    q, k, v, grad = (
        shard_sequence(t, dim=2, group=group, layout="contiguous")
        for t in _inputs(Case("", world, seqlen, "", True))
    )
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    STATS.reset()
    out = context_parallel_attention(
        q, k, v, causal=True, group=group, layout="contiguous", window_size=(5, 0)
    )
    results["window-forward"] = STATS.bytes_sent
    STATS.reset()
    out.backward(grad)
    results["window-backward"] = STATS.bytes_sent
    results["rank"] = rank
    return results


def _run_errors(world: int, group: dist.ProcessGroup | None) -> dict[str, str]:
    """Each bad input must raise on every rank (a hang would time the test out)."""
    rank = dist.get_rank(group)
    seqlen = 16 * world
    q, k, v, _ = (
        shard_sequence(t, dim=2, group=group) for t in _inputs(Case("", world, seqlen, "", True))
    )
    attempts = {
        "odd-length": lambda: context_parallel_attention(
            q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], group=group
        ),
        "shape-differs": lambda: context_parallel_attention(
            q[:, :, : 8 if rank == 0 else 6],
            k[:, :, : 8 if rank == 0 else 6],
            v[:, :, : 8 if rank == 0 else 6],
            group=group,
        ),
        "cu-seqlens-differs": lambda: context_parallel_attention(
            q, k, v, cu_seqlens=[0, 5 + rank, seqlen], group=group
        ),
        "one-rank-bad-cu-seqlens": lambda: context_parallel_attention(
            q, k, v, cu_seqlens=[0, 5, seqlen + (rank == 0)], group=group
        ),
        "bad-layout": lambda: context_parallel_attention(q, k, v, layout="striped", group=group),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = "no error"
        except (ValueError, TypeError) as error:
            messages[name] = f"{type(error).__name__}: {error}"
    return messages


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    results: dict[str, object] = {}
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])] if world == 4 else []
        my_pair = next(
            (g for g, ranks in zip(pairs, ([0, 1], [2, 3]), strict=False) if rank in ranks), None
        )
        for case in CASES:
            if case.world == world:
                group = None
            elif case.world == 2 and my_pair is not None:
                group = my_pair
            else:
                continue
            try:
                results[case.name] = _run_case(case, group)
            except Exception:
                results[case.name] = traceback.format_exc()
        results["bytes"] = _run_bytes(world, None)
        results["errors"] = _run_errors(world, None)
    finally:
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as result_dir:
        mp.spawn(_worker, args=(world, _free_port(), result_dir), nprocs=world, join=True)
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def results() -> dict[int, list[dict]]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    return {world: _spawn(world) for world in (2, 4)}


@pytest.mark.parametrize(
    ("processes", "case"),
    [(p, c) for p in (2, 4) for c in CASES if c.world <= p],
    ids=lambda x: f"{x}proc" if isinstance(x, int) else x.name,
)
def test_matches_single_process(results, processes: int, case: Case) -> None:
    for rank, per_rank in enumerate(results[processes]):
        assert per_rank.get(case.name, "not run") is None, f"rank {rank}: {per_rank.get(case.name)}"


def _kv_bytes(world: int, dtype_bytes: int = 8) -> int:
    return 2 * 1 * 2 * (16 * world // world) * 8 * dtype_bytes  # (k, v) × B × Hkv × n × D


@pytest.mark.parametrize("processes", [2, 4])
def test_block_aligned_shards_send_nothing(results, processes: int) -> None:
    for per_rank in results[processes]:
        sent = per_rank["bytes"]
        assert sent["aligned-block-forward"] == 0, sent
        assert sent["aligned-block-backward"] == 0, sent


@pytest.mark.parametrize("processes", [2, 4])
def test_bytes_match_schedule(results, processes: int) -> None:
    world = processes
    kv = _kv_bytes(world)
    seqlen = 16 * world
    ragged = _offsets(Case("", world, seqlen, "ragged", True))
    schedule = build_schedule(tuple(ragged), world, "zigzag", True)
    for rank, per_rank in enumerate(results[processes]):
        sent = per_rank["bytes"]
        # Ring: every shard visits every rank; gradients make W hops home.
        assert sent["aligned-ring-forward"] == (world - 1) * kv, sent
        assert sent["aligned-ring-backward"] == (world - 1) * kv + world * kv, sent
        needed_by = sum(schedule.needs(d, rank) for d in range(world) if d != rank)
        needs = sum(schedule.needs(rank, s) for s in range(world) if s != rank)
        assert sent["ragged-block-forward"] == needed_by * kv, (rank, sent)
        assert sent["ragged-block-backward"] == (needed_by + needs) * kv, (rank, sent)
        assert sent["ragged-block-forward"] <= sent["ragged-ring-forward"]


@pytest.mark.parametrize("processes", [2, 4])
def test_pairs_outside_the_window_send_nothing(results, processes: int) -> None:
    world = processes
    kv = _kv_bytes(world)
    seqlen = 16 * world
    windowed = build_schedule((0, seqlen), world, "contiguous", True, seqlen, (5, 0))
    assert windowed.num_transfers() == world - 1
    unbounded = build_schedule((0, seqlen), world, "contiguous", True)
    assert unbounded.num_transfers() == world * (world - 1) // 2  # every earlier shard
    for rank, per_rank in enumerate(results[processes]):
        sent = per_rank["bytes"]
        needed_by = sum(windowed.needs(d, rank) for d in range(world) if d != rank)
        needs = sum(windowed.needs(rank, s) for s in range(world) if s != rank)
        assert needed_by == (1 if rank < world - 1 else 0)
        assert sent["window-forward"] == needed_by * kv, (rank, sent)
        assert sent["window-backward"] == (needed_by + needs) * kv, (rank, sent)


@pytest.mark.parametrize("processes", [2, 4])
@pytest.mark.parametrize(
    ("attempt", "match"),
    [
        ("odd-length", r"multiple of 2 \* world_size"),
        ("shape-differs", r"differ between ranks in: .*local sequence length"),
        ("cu-seqlens-differs", r"differ between ranks in: block offsets"),
        ("one-rank-bad-cu-seqlens", r"cu_seqlens goes beyond|invalid on rank\(s\) \[0\]"),
        ("bad-layout", r"layout must be one of"),
    ],
)
def test_bad_inputs_raise_on_every_rank(results, processes: int, attempt: str, match: str) -> None:
    import re

    for rank, per_rank in enumerate(results[processes]):
        message = per_rank["errors"][attempt]
        assert message.startswith("ValueError"), f"rank {rank}: {message}"
        assert re.search(match, message), f"rank {rank}: {message}"


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_chunk_ranges_cover_the_sequence(layout: str) -> None:
    for world in (1, 2, 3, 4):
        ranges = [r for rank in range(world) for r in chunk_ranges(24 * world, world, rank, layout)]
        assert sorted(ranges) == [
            (i * s, (i + 1) * s) for s in [ranges[0][1] - ranges[0][0]] for i in range(len(ranges))
        ]
    assert chunk_ranges(16, 2, 0, "zigzag") == ((0, 4), (12, 16))
    assert chunk_ranges(16, 2, 1, "zigzag") == ((4, 8), (8, 12))


def test_uneven_length_message() -> None:
    with pytest.raises(ValueError, match=r"multiple of 2 \* world_size = 8 .* got N = 20"):
        chunk_ranges(20, 4, 0, "zigzag")
    with pytest.raises(ValueError, match=r"multiple of world_size = 3 .* got N = 20"):
        chunk_ranges(20, 3, 0, "contiguous")


def test_pair_plan_causal_cases() -> None:
    offsets = (0, 3, 10, 16)
    # Same chunk: causal, one piece per block present.
    same = plan_pair(offsets, (0, 8), (0, 8), causal=True)
    assert same.causal and same.cu_seqlens_q == same.cu_seqlens_k == (0, 3, 8)
    # Keys before queries: full attention, only the shared block has both sides.
    before = plan_pair(offsets, (8, 16), (0, 8), causal=True)
    assert not before.causal
    assert before.cu_seqlens_q == (0, 0, 2, 8) and before.cu_seqlens_k == (0, 3, 8, 8)
    # Keys after queries: nothing to do.
    assert plan_pair(offsets, (0, 8), (8, 16), causal=True) is None
    # No shared block: nothing to do.
    assert plan_pair((0, 8, 16), (8, 16), (0, 8), causal=False) is None
