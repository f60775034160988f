"""EKFAC under DistributedDataParallel: the runnable example of ``ekfac_triton/DISTRIBUTED.md``.

    torchrun --nproc_per_node=2 -m bench.ddp_example            # CPU, gloo
    torchrun --nproc_per_node=4 -m bench.ddp_example --steps 200 # one GPU per rank, NCCL

Each rank trains on its own shard of a synthetic regression problem (local mean loss, DDP
averages the gradients); EKFAC averages the curvature statistics across ranks and splits the
eigendecompositions among them. Rank 0 prints the loss; every rank reports how many
eigendecompositions it ran.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ekfac_triton import EKFAC


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="examples per rank and step")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR...
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same teacher on every rank; DDP also broadcasts rank 0's weights
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8)).to(device)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 8)).to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    # DDP-wrapped model: statistics are averaged over DDP's process group (no other change)
    opt = EKFAC(ddp, lr=0.05, damping=1e-2, momentum=0.9, eigen_every=10)

    data = torch.Generator(device="cpu").manual_seed(1000 + rank)  # each rank its own shard
    for step in range(args.steps):
        x = torch.randn(args.batch, 32, generator=data).to(device)
        with torch.no_grad():
            y = teacher(x)
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)  # the mean over this rank's examples
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            total = loss.detach().clone()
            dist.all_reduce(total)
            if rank == 0:
                print(f"step {step:4d}  loss {total.item() / world:.5f}", flush=True)

    counts = torch.tensor([opt.preconditioner.eigen.decompositions], device=device)
    gathered = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts)
    if rank == 0:
        print(f"eigendecompositions per rank: {[int(c) for c in gathered]} "
              f"({len(opt.preconditioned_modules())} layers, world size {world})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
