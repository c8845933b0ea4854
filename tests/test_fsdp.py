"""FSDP (torch's fully_shard, FSDP2) under torchrun on the CPU with gloo, and the GPU paths.

1. Same numbers as DDP: from one 2-process DDP checkpoint, a DDP run and an FSDP run that saves
   and resumes half-way (--init_from=resume) log the same losses, norms, PSU statistics and BAARA
   values and actions within REL. They cannot be bit-equal: DDP all-reduces gradient buckets while FSDP reduce-scatters
   per-parameter shards, and the global norms (clipping, ||theta||, PSU's pull) are summed in a
   different order, so float32 rounding differs in the last bits (we see about 1e-7) and Adam
   carries it forward. FSDP with torch.compile gives the same numbers too.
2. A paper-style start: the model is built on the meta device, sharded, and only this rank's
   shards are allocated and initialised: no rank ever holds the whole model. With bf16 the
   shards are gathered in bf16 but kept, with their gradients, in float32.
3. On a GPU only (skipped here otherwise): bf16 + torch.compile with MFU in the log; FSDP on cuda;
   DMU, DTU and PSU give the CPU's numbers.
"""
import json
import math
import os
import shutil
import textwrap

import pytest
import torch

import train
from conftest import ROOT, TINY, needs_compiler, torchrun
from model import GPT, GPTConfig

# other summation orders: a norm of n ~ 40k float32 squares (clipping's, the logged ones) errs 5 sqrt(n) eps32 / 2 = 3e-5
# (eps32 = 2^-24), the rest ~1e-7; AdamW, scale-free, carries little of it over 4 steps: 1e-4 (measured: 3.7e-6 at most)
REL = 1e-4
SMALL = [*TINY, '--batch_size=4', '--warmup_iters=2', '--eval_interval=2']  # an eval every 2 iters
# PSU with both channels (the params channel runs on DTensor shards), BAARA with DMU and DTU (its
# gradient norms, g_ref and v_b are sharded) and 2 micro-steps (gradient sync only on the last one)
# so that every FSDP-specific path is on
HARD = ['--psu_lambda=0.2', '--psu_channels=both', '--gradient_accumulation_steps=2',
        '--baara=True', '--baara_cost=flops', '--dmu_p=0.5', '--dtu_r=0.5']
COMPARED = ('loss', 'val_loss', 'train_loss', 'grad_norm', 'update_norm', 'param_norm', 'entropy',
            'psu_entropy', 'psu_log_partition', 'psu_eot_prob', 'psu_feedback_loss', 'psu_pull_norm',
            'baara_value', 'baara_reward', 'baara_expected_alpha', 'baara_alpha', 'baara_dmu_p')


def logged(out_dir):
    """(iter, 'step' or 'eval') -> row; a resumed run appends to the same log."""
    rows = {}
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        for line in f:
            r = json.loads(line)
            rows.setdefault((r['iter'], 'step' if 'loss' in r else 'eval'), r)
    return rows


def same_numbers(ref, got):
    """Every COMPARED value of the runs' iters 2-6 (0-1 come from the shared base run) within REL."""
    assert set(ref) == set(got) and len([k for k in ref if k[1] == 'step']) == 6
    checked = 0
    for key, a in ref.items():
        for name in COMPARED:
            if name in a and key[0] >= 2 and a[name] == a[name]:
                # abs 1e-7, for the values near 0: PSU's feedback loss lambda sum (e / sd)^2 (1e-4 here, e = s - r < 0.07,
                # sd ~1) moves by 2 lambda e de / sd^2 <= 1e-7 while its statistics s, r (~6 nats) are 4e-6, 8 ulps, apart
                assert got[key][name] == pytest.approx(a[name], rel=REL, abs=1e-7), (key, name)
                checked += 1
    assert checked > 50


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    """A 2-process DDP run of 2 iters (the base every run here resumes from) and its DDP
    continuation to iter 6, the reference."""
    root = tmp_path_factory.mktemp('ddp')
    base, ddp = str(root / 'base'), str(root / 'ddp')
    torchrun(2, f'--out_dir={base}', *SMALL, *HARD, '--max_iters=2')
    shutil.copytree(base, ddp)
    torchrun(2, f'--out_dir={ddp}', '--init_from=resume', '--max_iters=6')
    return base, logged(ddp)


def test_fsdp_matches_ddp_and_resumes(ddp_run, tmp_path):
    base, ref = ddp_run
    fsdp = str(tmp_path / 'fsdp')
    shutil.copytree(base, fsdp)
    out = torchrun(2, f'--out_dir={fsdp}', '--init_from=resume', '--fsdp=True', '--max_iters=4')
    assert '2 process(es)' in out
    ckpt = torch.load(os.path.join(fsdp, 'ckpt.pt'), weights_only=False)  # the usual single file, whole tensors
    assert ckpt['iter_num'] == 4 and ckpt['config']['fsdp'] is True
    plain = GPT(GPTConfig(**ckpt['model_args']))
    plain.load_state_dict(ckpt['model'])  # loads into an unsharded model: the same format as without FSDP
    assert sorted(ckpt['optimizer']['state']) == list(range(len(list(plain.parameters()))))
    assert all(e.shape == p.shape for e, p in zip(ckpt['psu']['ema'], plain.parameters()))
    assert len(ckpt['ranks']) == 2 and all(r['psu']['ref'].shape == (3,) for r in ckpt['ranks'])
    assert all(g.shape == p.shape for g, p in zip(ckpt['baara']['g_ref'], plain.parameters()))
    torchrun(2, f'--out_dir={fsdp}', '--init_from=resume', '--max_iters=6')  # stays FSDP: from its config
    same_numbers(ref, logged(fsdp))
    assert os.path.exists(os.path.join(fsdp, 'samples.txt'))  # rank 0 sampled from the gathered model


COMPILED = textwrap.dedent("""
    import sys
    import torch._inductor.config
    torch._inductor.config.fallback_random = True  # DMU/DTU draw from eager's generator, as in the DDP run
    sys.path.insert(0, {root!r})
    import train
    train.main(sys.argv[1:])
""")


@needs_compiler
def test_fsdp_compiled_matches_ddp(ddp_run, tmp_path):
    """--fsdp=True --compile=True, the paper-size command: dynamo breaks the graph at FSDP's hooks
    and compiles what lies between them; the numbers stay the eager DDP run's."""
    base, ref = ddp_run
    script, fsdp = tmp_path / 'compiled.py', str(tmp_path / 'fsdp')
    script.write_text(COMPILED.format(root=ROOT))
    shutil.copytree(base, fsdp)
    torchrun(2, f'--out_dir={fsdp}', '--init_from=resume', '--fsdp=True', '--compile=True', '--max_iters=6',
             script=str(script))
    same_numbers(ref, logged(fsdp))


WORKER = textwrap.dedent("""
    import json, os, resource, sys, time
    t0 = time.time()
    import torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    sys.path.insert(0, os.path.join({root!r}, 'tests'))
    import distributed
    from conftest import count_params
    from model import GPTConfig

    def rss_mb():
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20

    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    config = GPTConfig(n_layer=4, n_head=8, n_embd=1024, block_size=64, vocab_size=50304)
    total = count_params(config)
    before = rss_mb()
    model = distributed.build_fsdp(config, 'cpu', world)
    model.init_weights()
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # Linux: KiB
    local = sum(p.to_local().numel() for p in model.parameters())
    summed = torch.tensor(local)
    dist.all_reduce(summed)
    wte = model.transformer.wte.weight.to_local()
    ln = model.transformer.ln_f.weight.to_local()
    x, y = torch.randint(config.vocab_size, (2, 1, 16))
    _, loss = model(x, y)
    loss.backward()
    row = dict(total=total, local=local, summed=int(summed), peak_growth_mb=peak_growth,
               full_mb=total * 4 / 2**20, tied=model.lm_head.weight is model.transformer.wte.weight,
               wte_std=wte.std().item(), ln_ones=bool((ln == 1).all()), loss=loss.item(),
               grad_local=model.lm_head.weight.grad.to_local().shape[0], wte_rows=wte.shape[0])
    small = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    bf16 = distributed.build_fsdp(small, 'cpu', world, 'bfloat16')  # bf16 gathers, float32 shards and grads
    bf16.init_weights()
    fc = bf16.transformer.h[0].mlp.c_fc
    fc.register_forward_hook(lambda module, inputs, output: row.update(gathered=str(module.weight.dtype)))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bf16(x[:, :8] % 64, y[:, :8] % 64)[1].backward()
    row.update(shard=str(fc.weight.to_local().dtype), shard_grad=str(fc.weight.grad.to_local().dtype))
    row['seconds'] = time.time() - t0
    with open(os.path.join(sys.argv[1], f'rank{{rank}}.json'), 'w') as f:
        json.dump(row, f)
    dist.barrier()  # as train.py does: a rank that exits while another still works can abort gloo
    dist.destroy_process_group()
""")


def test_fsdp_start_never_holds_the_whole_model(tmp_path):
    """The paper's sizes start under FSDP from the meta device: a 102M-parameter model (408 MB in
    float32) on 2 ranks; each rank allocates and initialises its half, never the whole."""
    script = tmp_path / 'worker.py'
    script.write_text(WORKER.format(root=ROOT))
    torchrun(2, str(tmp_path), script=str(script))
    rows = [json.load(open(tmp_path / f'rank{r}.json')) for r in range(2)]
    for row in rows:
        assert row['summed'] == row['total'] > 100e6
        assert row['local'] <= row['total'] / 2 * 1.001  # one shard: ~1/world of every parameter
        assert row['peak_growth_mb'] < 0.75 * row['full_mb'], row  # the shard (~0.5) and small change
        # the std of a shard, n = 25.8M N(0, 0.02^2) draws: se 0.02 / sqrt(2n) = 3e-6, 0.001 is 360 se (0.02 / sqrt(2 L): 0.007)
        assert row['tied'] and row['ln_ones'] and abs(row['wte_std'] - 0.02) < 0.001
        # near uniform: logits of sd s = 0.02 sqrt(1024) = 0.64 give ln(50304) + s^2 / 2 = 11.03, and the mean over 16
        # tokens varies by s / 4 = 0.16: 0.8 is 5 sd (false alarm 6e-7)
        assert row['loss'] == pytest.approx(math.log(50304) + 0.64 ** 2 / 2, abs=5 * 0.64 / 4)
        assert row['grad_local'] == row['wte_rows'] == 50304 // 2  # gradients are sharded too
    assert rows[0]['wte_std'] != rows[1]['wte_std']  # the shards hold different draws
    for row in rows:  # dtype=bfloat16: half the all-gather traffic, the optimiser still in float32
        assert (row['gathered'], row['shard'], row['shard_grad']) == ('torch.bfloat16', 'torch.float32', 'torch.float32')


def test_fsdp_needs_torchrun(tmp_path):
    with pytest.raises(SystemExit, match='torchrun'):
        train.main([f'--out_dir={tmp_path}', '--fsdp=True', '--device=cpu'])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@cuda
def test_gpu_bf16_compile_smoke(tmp_path):
    """bf16 autocast + torch.compile + fused AdamW train on the GPU, and the log carries MFU on
    the GPUs in model.PEAK_FLOPS and the peak GPU memory."""
    out = str(tmp_path)
    train.main([f'--out_dir={out}', *SMALL, '--device=cuda', '--dtype=bfloat16', '--compile=True', '--max_iters=6',
                '--eval_interval=3'])
    steps = [r for r in logged(out).values() if 'loss' in r]
    assert len(steps) == 6 and all(math.isfinite(r['loss']) for r in steps)
    if train.distributed.peak_flops(torch.cuda.get_device_name()):
        assert all(0 < r['mfu'] < 1 for r in steps[1:])
    assert all(0 < r['peak_mem_gib'] < torch.cuda.get_device_properties(0).total_memory / 2**30 for r in steps)


@cuda
def test_gpu_fsdp_saves_and_resumes(tmp_path):
    nproc = min(2, torch.cuda.device_count())
    out = str(tmp_path)
    gpu = ['--device=cuda', '--dtype=bfloat16', '--fsdp=True']
    torchrun(nproc, f'--out_dir={out}', *SMALL, *HARD, *gpu, '--max_iters=4')
    torchrun(nproc, f'--out_dir={out}', '--init_from=resume', '--max_iters=6')
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ckpt['iter_num'] == 6 and ckpt['model']['lm_head.weight'].device.type == 'cpu'
    assert len([k for k in logged(out) if k[1] == 'step']) == 6


@cuda
def test_gpu_gives_the_cpu_numbers(tmp_path, monkeypatch):
    """DMU, DTU and PSU (both channels) in float32 give the CPU's losses, norms and PSU statistics
    on the GPU. The masks are drawn from the CPU's generator in both runs (patched here), so only
    the arithmetic differs: cuBLAS, fused AdamW and the CPU's kernels sum in different orders."""
    rand_like, randperm = torch.rand_like, torch.randperm
    monkeypatch.setattr(torch, 'rand_like', lambda t: rand_like(t, device='cpu').to(t.device))  # DTU's Gumbel noise
    monkeypatch.setattr(torch, 'randperm', lambda n, device=None: randperm(n).to(device))  # DMU's kept units
    flags = [*SMALL, '--psu_lambda=0.2', '--psu_channels=both', '--dmu_p=0.5', '--dtu_r=0.5', '--max_iters=8']
    for device in ('cpu', 'cuda'):
        train.main([f'--out_dir={tmp_path / device}', *flags, f'--device={device}'])  # after SMALL's cpu
    ref, got = logged(str(tmp_path / 'cpu')), logged(str(tmp_path / 'cuda'))
    assert set(ref) == set(got)
    worst = 0.0
    for key, a in ref.items():
        for name in COMPARED:
            if name in a and a[name] == a[name]:
                assert got[key][name] == pytest.approx(a[name], rel=REL, abs=1e-6), (key, name)  # as same_numbers; cuBLAS sums differ
                worst = max(worst, abs(got[key][name] - a[name]) / max(abs(a[name]), 1e-6))
    print(f'largest relative difference, GPU against CPU: {worst:.1e}')
