"""config/gpu_check.sh, the one-command GPU check, end to end on the CPU at a tiny size (its
pytest and bench steps skipped: they have their own tests), its GPU command lines as train.py
reads them, and the bf16 default (float32 on GPUs that only emulate bf16)."""
import json
import math
import os
import re
import shlex
import subprocess

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, 'config', 'gpu_check.sh')
SHAPE = '--n_layer=2 --n_embd=32 --n_head=2 --block_size=32 --batch_size=8 --eval_iters=2 --num_samples=4 --sample_tokens=16'
KNOBS = ('SIZE_124M', 'SIZE_1B', 'STEPS', 'STEPS_1B', 'BATCH_1B', 'DEVICE', 'DTYPE', 'COMPILE', 'COMPILE_1B',
         'SKIP_TESTS', 'SKIP_BENCH', 'BENCH_FLAGS', 'TRAIN_FLAGS', 'DRY_RUN', 'KEEP', 'TEXT',
         'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
RUNS = {'gpt2-124m': 6, 'gpt2-1b-fsdp': 4}  # run -> steps (STEPS, STEPS_1B below)


def text_file(tmp_path):
    """~150 kB of text (the synthetic corpus's sentences) for the script to prepare as GPT-2 BPE bins."""
    from data import SyntheticCorpus
    path = tmp_path / 'text.txt'
    path.write_text(SyntheticCorpus().text(6000, seed=0))
    return str(path)


def gpu_check(tmp_path, **env):
    """bash config/gpu_check.sh TEXT with these variables (none of the caller's), temp folders under tmp_path."""
    env = {**{k: v for k, v in os.environ.items() if k not in KNOBS}, 'TMPDIR': str(tmp_path), 'OMP_NUM_THREADS': '1',
           **env}
    r = subprocess.run(['bash', SCRIPT, text_file(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_gpu_check_runs_on_the_cpu_at_a_tiny_size(tmp_path):
    """Every run of the check (bins prepared once, the single-process run, the FSDP run under torchrun
    with 1 process on gloo) and its one summary table: a row per run with finite numbers."""
    rc, out = gpu_check(tmp_path, SKIP_TESTS='1', SKIP_BENCH='1', SIZE_124M='tiny', SIZE_1B='tiny', STEPS='6',
                        STEPS_1B='4', DEVICE='cpu', DTYPE='float32', COMPILE='False', TRAIN_FLAGS=SHAPE)
    assert rc == 0, out[-3000:]
    summary = out[out.index('\nGPU check: '):]
    assert summary.startswith('\nGPU check: no GPU, torch '), summary
    assert re.search(r'^tests: skipped', summary, re.M) and re.search(r'^bench: skipped', summary, re.M)
    assert re.search(r'^prepare: passed \(\d+ s\)', summary, re.M)
    lines = summary.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith('run '))
    assert lines[head].split() == ['run', 'size', 'params', 'steps', 'tok/s', 'MFU', 'peak', 'GiB', 'val', 'loss',
                                   'val', 'bpb', 'status', 's']
    rows = {cells[0]: cells for cells in (line.split() for line in lines[head + 1:])}
    assert list(rows) == list(RUNS)
    folder = re.search(r'runs in (\S+)', summary).group(1)
    for run, n in RUNS.items():
        name, size, params, steps, tok_s, mfu, peak, val_loss, val_bpb, status, seconds = rows[run]
        assert (size, params, steps, mfu, peak, status) == ('tiny', '1.63M', str(n), '-', '-', 'passed'), rows[run]
        for value in (tok_s.replace(',', ''), val_loss, val_bpb, seconds):
            assert math.isfinite(float(value)) and float(value) > 0, (run, value)
        log = [json.loads(line) for line in open(os.path.join(folder, run, 'log.jsonl'))]
        assert float(val_bpb) == pytest.approx([r for r in log if 'val_bpb' in r][-1]['val_bpb'], abs=6e-4)  # printed .3f: off by <= 5e-4
        config = json.load(open(os.path.join(folder, run, 'report.json')))['config']
        assert config['fsdp'] is (run == 'gpt2-1b-fsdp') and config['data'] == os.path.join(folder, 'bins')
        assert not os.path.exists(os.path.join(folder, run, 'ckpt.pt'))  # checkpoints go, logs stay
    assert '1 process(es) on cpu' in out and 'train + ' in out  # torchrun's run; data.py's line


def commands(tmp_path, **env):
    """The commands a DRY_RUN prints, as argument lists by step name."""
    rc, out = gpu_check(tmp_path, DRY_RUN='1', **env)
    assert rc == 0, out
    return {m.group(1): shlex.split(m.group(2)) for m in re.finditer(r'^== ([\w-]+): (.*)$', out, re.M)}


def test_gpu_check_defaults_are_the_gpu_runs(tmp_path, monkeypatch):
    """With no variables the check is the GPU one: the GPU tests, bench on cuda in bf16, GPT-2 124M in bf16 with
    torch.compile for 300 steps and GPT-2 1B under FSDP for 20, each into its own folder; train.py takes their
    flags (read here with the device and dtype switched to the CPU, which has no cuda)."""
    import train
    monkeypatch.chdir(ROOT)  # config/table62_gpu.py, as the script reads it
    cmd = commands(tmp_path)
    assert list(cmd) == ['tests', 'bench', 'prepare', 'gpt2-124m', 'gpt2-1b-fsdp']
    assert cmd['tests'] == ['python', '-m', 'pytest', '-q', 'tests/test_fsdp.py']
    assert cmd['bench'] == ['python', 'bench.py', '--device=cuda', '--dtype=bfloat16']
    assert cmd['prepare'][:2] == ['python', 'data.py'] and cmd['prepare'][-1] == '--tokenizer=gpt2'
    assert cmd['gpt2-124m'][:2] == ['python', 'train.py']
    assert cmd['gpt2-1b-fsdp'][:4] == ['torchrun', '--standalone', '--nproc_per_node=1', 'train.py']
    configs = {}
    for run in RUNS:
        argv = cmd[run][cmd[run].index('train.py') + 1:]
        assert {'--device=cuda', '--dtype=bfloat16'} <= set(argv)
        configs[run] = train.get_config([a.replace('=cuda', '=cpu').replace('=bfloat16', '=float32') for a in argv])
    small, big = configs['gpt2-124m'], configs['gpt2-1b-fsdp']
    assert (small['n_layer'], small['n_embd'], small['max_iters'], small['compile'], small['fsdp']) == (12, 768, 300, True, False)
    assert (big['n_layer'], big['n_embd'], big['max_iters'], big['fsdp'], big['learning_rate']) == (18, 2048, 20, True, 2e-4)
    bins = cmd['prepare'][3].split('=', 1)[1]
    assert small['data'] == big['data'] == bins and small['out_dir'] != big['out_dir']
    assert {os.path.dirname(c['out_dir']) for c in configs.values()} == {os.path.dirname(bins)}  # one temp folder
    assert os.path.dirname(bins).startswith(str(tmp_path))


def test_bf16_default_only_where_bf16_is_native(monkeypatch):
    """torch.cuda.is_bf16_supported() says True on GPUs that only emulate bf16 (T4, V100); there dtype 'auto',
    train.py's and bench.py's default, is float32. get_config resolves 'auto' (the device's too) once, so the
    run's config, checkpoints and report hold what the run had."""
    import bench
    import train
    from configurator import auto_dtype
    assert train.DEFAULTS['dtype'] == bench.BENCH['dtype'] == 'auto' == train.DEFAULTS['device'] == bench.BENCH['device']
    monkeypatch.setattr('torch.cuda.is_available', lambda: True)
    monkeypatch.setattr('torch.cuda.is_bf16_supported', lambda including_emulation=True: including_emulation)
    assert (train.get_config([])['device'], train.get_config([])['dtype']) == ('cuda', 'float32')
    monkeypatch.setattr('torch.cuda.is_bf16_supported', lambda including_emulation=True: True)
    assert train.get_config([])['dtype'] == 'bfloat16' and auto_dtype('float32') == 'float32'
    assert train.get_config(['--device=cpu'])['dtype'] == 'bfloat16'  # as before 'auto': the GPU's, whatever the device
    monkeypatch.setattr('torch.cuda.is_available', lambda: False)
    assert (train.get_config([])['device'], train.get_config([])['dtype']) == ('cpu', 'float32')
