"""Memory: forward + backward at N = 65536 never holds anything like an N x N matrix.

One float32 N x N matrix at N = 65536 is 16 GiB; we require the peak to grow by < 1 GiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_cuda

import block_attn

SEQLEN = 65536
HEAD_DIM = 64
LIMIT_BYTES = 1 << 30  # 1 GiB, against 16 GiB for one N x N float32 matrix
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process so that ru_maxrss (the peak resident size) reflects this call only.
MEASURE_RSS = """
import json, resource, sys, time
import torch
import block_attn

kwargs = json.loads(sys.argv[1])
n, d = int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
grad_out = torch.randn(1, 1, n, d)
# Warm up on a small problem: loads kernels and thread pools, allocates autograd state.
small = [t.detach()[:, :, :512].clone().requires_grad_() for t in (q, k, v)]
block_attn.attention(*small, **kwargs).backward(grad_out[:, :, :512])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = block_attn.attention(q, k, v, **kwargs)
out.backward(grad_out)
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
print(json.dumps({"increase_bytes": (after - before) * 1024, "seconds": seconds}))
"""

CASES = [
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"block_size": 256}, id="block_size=256"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", CASES)
def test_peak_rss_far_below_one_score_matrix(kwargs):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_RSS, json.dumps(kwargs), str(SEQLEN), str(HEAD_DIM)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=900,
    )
    assert result.returncode == 0, f"measurement failed:\n{result.stderr[-4000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    increase = report["increase_bytes"]
    assert increase < LIMIT_BYTES, (
        f"{kwargs}: peak RSS grew by {increase / 2**20:.1f} MiB during forward + backward at "
        f"N = {SEQLEN} (limit {LIMIT_BYTES / 2**20:.0f} MiB; one N x N float32 matrix is 16 GiB)"
    )


@pytest.mark.slow
@requires_cuda
@pytest.mark.parametrize("kwargs", CASES)
def test_peak_cuda_memory_far_below_one_score_matrix(kwargs):
    device = "cuda"
    q, k, v = (
        torch.randn(1, 1, SEQLEN, HEAD_DIM, device=device, requires_grad=True) for _ in range(3)
    )
    grad_out = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    block_attn.attention(q, k, v, **kwargs).backward(grad_out)
    torch.cuda.synchronize()
    increase = torch.cuda.max_memory_allocated() - before
    assert increase < LIMIT_BYTES, (
        f"{kwargs}: peak CUDA memory grew by {increase / 2**20:.1f} MiB at N = {SEQLEN} "
        f"(limit {LIMIT_BYTES / 2**20:.0f} MiB)"
    )
