"""
Device and distributed plumbing, kept out of the paper's files: devices (autocast, a GPU's peak
FLOP/s, the log's throughput), torchrun set-up, FSDP2 sharding, the helpers that let PSU, BAARA
and the checkpoints treat FSDP's sharded parameters (DTensors) and plain tensors alike, and the
logged step's AdamW step taken in pieces (to measure ||theta_t - theta_{t-1}|| without a copy).
A reader of the paper's algorithms can skip this file: on one process every helper below is the
identity, or a no-op, or a plain measurement.

It is its own file because train.py, stabilize.py, baara.py and bench.py all need it, and because
a reader of those should meet at most a one-line call where sharding matters.
"""
import os
import time
from contextlib import nullcontext
from datetime import timedelta
from itertools import repeat

import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.adamw import adamw

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


def pieces(t, n):
    """This rank's shard of t (all of t without FSDP), detached and flat, as views of n elements each
    (views: writing into them writes t; view(-1) refuses a tensor it would have to copy)."""
    return local(t.detach()).view(-1).split(n)


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


def gather_to_cpu(tensors, saving=True):
    """Each tensor whole, on the CPU, for a checkpoint. Under FSDP a collective, gathered one tensor
    at a time: every rank calls it, and ranks that do not save pass saving=False to drop each at once."""
    out = []
    for t in tensors:
        t = full_tensor(t)
        out.append(t.cpu() if saving else None)
    return out


# -----------------------------------------------------------------------------
# devices

PEAK_FLOPS = {'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'H200': 989e12,  # dense bf16
              'A100': 312e12}  # FLOP/s by GPU name; the first name in get_device_name() wins


def peak_flops(device_name):
    """Dense bf16 peak of a GPU from torch.cuda.get_device_name(); None where unknown."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def autocast_context(dtype, device):
    """bf16 autocast over float32 weights, or nothing (no float16: it would need a gradient scaler)."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type='cuda' if device.startswith('cuda') else 'cpu', dtype=torch.bfloat16)


class Throughput:
    """The log's speed numbers: tokens/s since the last logged step or eval (an eval is not
    training), an ETA once 5 steps have run (fewer, with warm-up or compile, mislead), and on a
    GPU the model FLOPs utilisation (MFU) and the peak memory."""

    def __init__(self, c, world, iter_num):
        self.tokens_per_iter = c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps'] * world
        self.world, self.max_iters, self.device = world, c['max_iters'], c['device']
        cuda = self.device.startswith('cuda')
        self.peak = peak_flops(torch.cuda.get_device_name(self.device)) if cuda else None
        self.t_start, self.iter_start = time.time(), iter_num
        self.restart(iter_num)

    def restart(self, iter_num):
        """Time from here: iteration iter_num's step is the next."""
        self.t_lap, self.iter_lap = time.time(), iter_num

    def lap(self, iter_num, model):
        """After step iter_num: ({tok_per_s, eta_s}, {mfu, peak_mem_gib}) (each where known)."""
        now = time.time()
        tok_s = self.tokens_per_iter * (iter_num + 1 - self.iter_lap) / (now - self.t_lap)
        speed = {'tok_per_s': round(tok_s)}
        done = iter_num + 1 - self.iter_start
        if done >= 5:
            speed['eta_s'] = round((now - self.t_start) / done * (self.max_iters - iter_num - 1))
        load = {'mfu': model.estimate_mfu(tok_s / self.world, self.peak)} if self.peak else {}
        if self.device.startswith('cuda'):
            load['peak_mem_gib'] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.restart(iter_num + 1)
        return speed, load


# -----------------------------------------------------------------------------
# processes: one, or many under torchrun

CPU_GROUP = [None]  # a gloo group beside nccl on GPUs (max_over_ranks); None: the default group

def setup(device, fsdp):
    """-> (rank, world size, device). Under torchrun: one process group (nccl on GPUs, gloo on CPUs)
    and this process's GPU; otherwise rank 0 of 1. The timeout is an hour, because rank 0 alone
    writes multi-GB checkpoints at 1B-3B and samples at the end while the others wait."""
    rank, world = 0, 1
    if 'RANK' in os.environ:
        init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo', timeout=timedelta(hours=1))
        CPU_GROUP[0] = torch.distributed.new_group(backend='gloo') if device.startswith('cuda') else None
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if device.startswith('cuda'):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    elif fsdp:
        raise SystemExit("error: fsdp=True needs torchrun, e.g. torchrun --standalone --nproc_per_node=2 train.py --fsdp=True")
    if device.startswith('cuda:'):
        torch.cuda.set_device(device)  # the current GPU, which CUDA events, syncs and fork_rng use
    return rank, world, device


def teardown():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the other ranks wait for rank 0's report: exiting early can hang gloo
        destroy_process_group()


def wrap_ddp(model, device):
    """DDP over the ranks (without torchrun, or under FSDP, the model as it is)."""
    if not torch.distributed.is_initialized() or is_sharded(model.parameters()):
        return model
    return DDP(model, device_ids=[torch.cuda.current_device()] if device.startswith('cuda') else None)


def sync_gradients(model, on):
    """Gradient accumulation: DDP all-reduces, and FSDP reduce-scatters, on the last micro-step only."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = on
    model = getattr(model, '_orig_mod', model)  # under torch.compile
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(on)


def max_over_ranks(n):
    """The largest of an int over the ranks (n itself on one process): a small CPU collective
    (gloo, also beside nccl), so that it never waits on a GPU."""
    if not torch.distributed.is_initialized():
        return n
    t = torch.tensor([n])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=CPU_GROUP[0])
    return int(t)


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] on one process."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# -----------------------------------------------------------------------------
# FSDP2: sharded model and optimiser, whole state dicts in one checkpoint file

def build_fsdp(config, device, world, dtype='float32', state=None, seed=0):
    """FSDP2 without ever holding the whole model: build on the meta device, fully_shard each Block
    then the root (tied wte/lm_head stay one parameter), then allocate only this rank's shards and
    fill them: from the whole state dict `state` (read from rank 0's copy: every rank maps the file,
    none copies it), or GPT-2's init. With bfloat16 the shards are gathered in bf16 (half the
    traffic) and the gradients reduced in float32; the optimiser, PSU and BAARA keep working on
    the float32 shards. seed: this rank's, for the CUDA generator after the init."""
    from model import GPT
    with torch.device('meta'):
        model = GPT(config)
    mesh = init_device_mesh(device.split(':')[0], (world,))
    bf16 = dtype == 'bfloat16'
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    if state is not None:
        set_model_state_dict(model, state, options=FROM_RANK0)
        return model
    model.init_weights()  # on the local shards
    torch.cuda.manual_seed(seed)  # on a GPU, DTensor's init gave every rank rank 0's generator
    return model


def unsharded(model, config, device):
    """The whole model on rank 0 (None elsewhere), for the end-of-run samples and metrics."""
    from model import GPT
    state = get_model_state_dict(model, options=WHOLE)
    if not is_rank0():
        return None
    with torch.device('meta'):
        model = GPT(config)
    model.to_empty(device=device).load_state_dict(state)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty untied them
    return model


WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)          # gathered onto rank 0's CPU
FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def whole_state_dicts(model, optimizer):
    """The model's and optimiser's state dicts, whole (a collective under FSDP: every rank calls it;
    rank 0 gets them). The optimiser's keys are parameter indices, as without FSDP."""
    if not is_sharded(model.parameters()):
        return model.state_dict(), optimizer.state_dict()
    model_state = get_model_state_dict(model, options=WHOLE)
    optim_state = get_optimizer_state_dict(model, optimizer, options=WHOLE)
    if torch.distributed.get_rank() != 0:
        return model_state, None
    return model_state, rekey(optim_state, {n: i for i, n in enumerate(optimizer_fqns(model, optimizer))})


def load_optimizer(model, optimizer, optim_state):
    if not is_sharded(model.parameters()):
        return optimizer.load_state_dict(optim_state)
    set_optimizer_state_dict(model, optimizer, rekey(optim_state, optimizer_fqns(model, optimizer)), options=FROM_RANK0)


def optimizer_fqns(model, optimizer):
    """The parameter names in the optimiser's order: its state's int keys, as FSDP's API names them."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in optimizer.param_groups for p in g['params']]


def rekey(optim_state, keys):
    """An optimizer state dict with its parameter keys mapped by keys: int index <-> FQN (FSDP's API)."""
    return {'state': {keys[k]: v for k, v in optim_state['state'].items()},
            'param_groups': [{**g, 'params': [keys[k] for k in g['params']]} for g in optim_state['param_groups']]}


def is_rank0():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


# -----------------------------------------------------------------------------
# the logged step: AdamW's step taken in pieces, to measure ||theta_t - theta_{t-1}|| (Def. 3.1)
# without a parameter-sized copy

# Elements the logged step's measurements hold at a time (1 MiB in fp32): whole SIMD vectors, as
# fused AdamW rounds a call's leftover tail apart, and pieces must step bit for bit as one step.
PIECE = 1 << 18


@torch.no_grad()
def step_measuring_update(optimizer, psu=None):
    """optimizer.step() (bit for bit; tested) that also returns ||theta_t - theta_{t-1}|| (Def. 3.1) and PSU's
    pull to come (pending_pull), with no parameter copy: each piece's difference is taken while in cache.
    Gradients mark what AdamW moves (BAARA's P_S drops some); under FSDP the squares add up over the ranks."""
    theta_bar = dict(zip(psu.params, psu.ema)) if psu is not None and psu.params_on else {}
    squares = []
    for group in optimizer.param_groups:
        for p in group['params']:
            if p.grad is None and p not in theta_bar:
                continue  # neither AdamW nor PSU moves it
            steps = adamw_pieces(optimizer, group, p) if p.grad is not None else ((t, None) for t in pieces(p, PIECE))
            bars = pieces(theta_bar[p], PIECE) if p in theta_bar else repeat(None)
            for (theta, d), bar in zip(steps, bars):
                if bar is not None:
                    pull = psu.pending_pull(theta, bar)
                    d = pull if d is None else d.add_(pull)
                squares.append(torch.dot(d, d))  # ~1e-7 relative (a whole-tensor vector_norm: 3e-3 at 38M elements)
    return sum_shards_(torch.stack(squares).sum(), is_sharded(optimizer.param_groups[0]['params'])).sqrt()


def adamw_pieces(optimizer, group, p):
    """Step p as optimizer.step() would (torch's functional AdamW, the group's settings), PIECE elements at a
    time; yields each piece theta_t and theta_t - theta_{t-1} (in one PIECE-sized buffer, reused)."""
    assert not group['amsgrad'], "train.py's AdamW keeps no max_exp_avg_sq"
    state = optimizer.state[p]
    if not state:  # AdamW's first step: its state, made as torch.optim.AdamW makes it
        on_device = group['fused'] or group['capturable']
        state.update(step=torch.zeros((), dtype=torch.float32, device=p.device if on_device else 'cpu'),
                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    step, (beta1, beta2) = state['step'].clone(), group['betas']  # each piece's call adds 1 to its own copy
    state['step'].add_(1)  # the state counts the step once
    buffer = None
    for theta, g, m, v in zip(*(pieces(t, PIECE) for t in (p, p.grad, state['exp_avg'], state['exp_avg_sq']))):
        buffer = torch.empty_like(theta) if buffer is None else buffer  # the first piece is the longest
        before = buffer[:theta.numel()].copy_(theta)  # theta_{t-1}
        adamw([theta], [g], [m], [v], [], [step.clone()], foreach=group['foreach'], fused=group['fused'], amsgrad=False,
              capturable=group['capturable'], differentiable=group['differentiable'], beta1=beta1, beta2=beta2,
              lr=group['lr'], weight_decay=group['weight_decay'], eps=group['eps'], maximize=group['maximize'])
        yield theta, torch.sub(theta, before, out=before)  # theta_t - theta_{t-1}
