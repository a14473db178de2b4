"""Train a tiny two-tower model with flashcontrast.distributed.clip_loss under DDP.

    torchrun --nproc-per-node 2 examples/train_clip_ddp.py [--strategy ring] [--steps 5]

Synthetic paired data: each pair shares a latent code; the image tower sees one noisy
view of it, the text tower another. Each rank draws its own shard (uneven on purpose:
rank r gets 16 + 4 r pairs), the loss sees the global batch, and DDP's gradient
averaging gives the single-process gradients of that batch (grad_scaling="ddp"). Uses
NCCL when CUDA is available, gloo on the CPU otherwise.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import flashcontrast.distributed as fd


class TwoTower(nn.Module):
    def __init__(self, d_in: int = 32, d_emb: int = 16) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(d_in, 64), nn.GELU(), nn.Linear(64, d_emb))
        self.text = nn.Sequential(nn.Linear(d_in, 64), nn.GELU(), nn.Linear(64, d_emb))
        self.logit_scale = nn.Parameter(torch.tensor(10.0).log())

    def forward(self, x_img, x_txt):
        return (
            F.normalize(self.image(x_img), dim=-1),
            F.normalize(self.text(x_txt), dim=-1),
            self.logit_scale.exp(),
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--strategy", choices=("gather", "ring"), default="gather")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    train(args.steps, args.strategy, torch.device("cuda" if use_cuda else "cpu"))
    # Teardown order matters: the DDP model's Reducer holds the process group and is
    # freed with the GIL held; were it the group's last owner (after
    # destroy_process_group, at exit), the gloo destructor would join its worker
    # threads, which may wait for the GIL: a hang. So the model goes first (train()
    # returned; collect its reference cycles), then the group.
    gc.collect()
    dist.barrier()  # gloo ranks can abort at exit without it
    dist.destroy_process_group()


def train(steps: int, strategy: str, device: torch.device) -> None:
    """``steps`` AdamW steps of the DDP two-tower model on this rank's shard."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts)
    model = nn.parallel.DistributedDataParallel(TwoTower().to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mix_img, mix_txt = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    n_local = 16 + 4 * rank

    for step in range(steps):
        z = torch.randn(n_local, 8, generator=gen)
        x_img = (z @ mix_img + 0.1 * torch.randn(n_local, 32, generator=gen)).to(device)
        x_txt = (z @ mix_txt + 0.1 * torch.randn(n_local, 32, generator=gen)).to(device)
        img, txt, scale = model(x_img, x_txt)
        loss = fd.clip_loss(img, txt, scale, strategy=strategy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0:
            print(
                f"step {step}: loss {loss.item():.4f} (global batch "
                f"{sum(16 + 4 * r for r in range(world))}, {world} ranks, {strategy})",
                flush=True,
            )


if __name__ == "__main__":
    main()
