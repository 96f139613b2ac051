"""Two gloo ranks, each holding half of the batch, reproduce the single-process losses on the whole batch.

Covers the DINO Sinkhorn-Knopp targets and center update (equal halves, as in training), the iBOT Sinkhorn with
unequal numbers of masked patches per rank, and that the caller's tensors are not reduced in place.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.losses import DINOLoss, iBOTPatchLoss

WORLD_SIZE = 2
K = 32
TEACHER_TEMP = 0.07
IBOT_SPLIT = 7  # rank 0 holds 7 masked patches, rank 1 the other 13


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    return {
        "dino_teacher": 0.5 * torch.randn(8, K, generator=generator),
        "dino_second": 0.5 * torch.randn(8, K, generator=generator),
        "ibot_teacher": 0.5 * torch.randn(20, K, generator=generator),
    }


def _run_losses(inputs: dict[str, torch.Tensor], rows: slice, ibot_rows: slice) -> dict[str, torch.Tensor]:
    """The same call sequence on whichever shard of the batch this process holds."""
    dino = DINOLoss(K)
    teacher = inputs["dino_teacher"][rows].clone()
    out = {"dino_sinkhorn": dino.sinkhorn_knopp_teacher(teacher, TEACHER_TEMP, n_iterations=3)}
    dino.update_center(teacher)
    out["dino_softmax_after_update"] = dino.softmax_center_teacher(inputs["dino_second"][rows], TEACHER_TEMP)
    out["dino_center"] = dino.center.clone()
    ibot_teacher = inputs["ibot_teacher"][ibot_rows]
    n_masked = torch.tensor([ibot_teacher.shape[0]])
    out["ibot_sinkhorn"] = iBOTPatchLoss(K).sinkhorn_knopp_teacher(ibot_teacher, TEACHER_TEMP, n_masked)
    out["ibot_n_masked_after"] = n_masked
    out["dino_teacher_after"] = teacher
    return out


def _worker(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        half = 8 // WORLD_SIZE
        rows = slice(rank * half, (rank + 1) * half)
        ibot_rows = slice(0, IBOT_SPLIT) if rank == 0 else slice(IBOT_SPLIT, None)
        torch.save(_run_losses(_inputs(), rows, ibot_rows), Path(result_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_two_ranks_match_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    inputs = _inputs()
    whole = _run_losses(inputs, slice(None), slice(None))

    for key in ("dino_sinkhorn", "dino_softmax_after_update", "ibot_sinkhorn"):
        gathered = torch.cat([r[key] for r in ranks])
        torch.testing.assert_close(gathered, whole[key], atol=1e-6, rtol=1e-5, msg=key)
    for rank in ranks:
        torch.testing.assert_close(rank["dino_center"], whole["dino_center"], atol=1e-7, rtol=0)
    torch.testing.assert_close(
        whole["dino_center"], 0.1 * inputs["dino_teacher"].mean(0, keepdim=True), atol=1e-7, rtol=0
    )
    # The shared reductions must not have written into the caller's tensors.
    assert [int(r["ibot_n_masked_after"]) for r in ranks] == [IBOT_SPLIT, 20 - IBOT_SPLIT]
    torch.testing.assert_close(
        torch.cat([r["dino_teacher_after"] for r in ranks]), inputs["dino_teacher"], atol=0, rtol=0
    )
