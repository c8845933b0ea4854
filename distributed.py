"""
Distributed plumbing, kept out of the paper's files: torchrun set-up, FSDP2 sharding, and the
helpers that let PSU, BAARA and the checkpoints treat FSDP's sharded parameters (DTensors) and
plain tensors alike. A reader of the paper's algorithms can skip this file: on one process
every helper below is the identity, or a no-op.

It is its own file because train.py, stabilize.py and baara.py all need it, and because a
reader of those should meet at most a one-line call where sharding matters.
"""
import os
from datetime import timedelta

import torch

try:  # FSDP's parameters are DTensors (shards)
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without torch.distributed
    DTensor = ()


# -----------------------------------------------------------------------------
# tensors that may be shards

def full_tensor(t):
    """The whole tensor behind a DTensor (a collective: every rank must call it); t itself otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t):
    """This rank's shard of a DTensor; t itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def flat(tensors):
    """The tensors (this rank's shards of DTensors), detached, flattened, concatenated: a copy."""
    return torch.cat([local(t.detach()).reshape(-1) for t in tensors])


def whole(part, like):
    """The whole tensor shaped like `like`, given `part`: its flat local shard if `like` is a
    DTensor (then a collective: every rank must call it), or all of it otherwise."""
    if not isinstance(like, DTensor):
        return part.view(like.shape)
    return DTensor.from_local(part.view(local(like).shape), like.device_mesh, like.placements,
                              shape=like.shape, stride=like.stride()).full_tensor()


def copy_full_(dst, src):
    """dst.copy_(src), where dst may be this rank's DTensor shard of the whole tensor src; returns dst."""
    if isinstance(dst, DTensor):
        src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
    return dst.copy_(src)


def is_sharded(params):
    return any(isinstance(p, DTensor) for p in params)


def sum_shards_(t, sharded):
    """Under FSDP each rank holds its shards' part of a sum over parameters: add the parts up (in place)."""
    if sharded:
        torch.distributed.all_reduce(t)
    return t


def mean_over_ranks_(t):
    """The mean of t over the ranks (in place), so that every rank holds the same number."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


def gather_to_cpu(tensors, keep=True):
    """Each tensor whole, on the CPU, for a checkpoint. Under FSDP a collective, gathered one tensor
    at a time: every rank calls it, and ranks that do not save pass keep=False to drop each at once."""
    out = []
    for t in tensors:
        t = full_tensor(t)
        out.append(t.cpu() if keep else None)
    return out
