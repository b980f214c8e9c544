"""Start one process per rank for the examples: under torchrun, or by spawning them here."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def setup_rank(rank, world_size, init_method=None):
    """Join the process group; returns this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, os.cpu_count() // world_size))  # ranks share the cores
        backend = "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return device


def run_rank(rank, world_size, run, args, init_method=None):
    device = setup_rank(rank, world_size, init_method)
    try:
        run(args, rank, world_size, device)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(run, args):
    """Call ``run(args, rank, world_size, device)`` on every rank (all GPUs, else ``args.world_size`` or 2 CPU ranks)."""
    if "RANK" in os.environ:  # under torchrun: this process is one rank; the environment sets the group
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), run, args)
        return
    world_size = args.world_size or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    mp.spawn(run_rank, args=(world_size, run, args, f"tcp://127.0.0.1:{free_port()}"), nprocs=world_size)
