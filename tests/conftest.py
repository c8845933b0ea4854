"""Shared test setup: import the flat scripts from the repository root, keep torch to one thread
(the tests use tiny models; more threads only fight over a small shared machine), and the helpers
the test files import (`from conftest import TINY, run, ...`): tiny train.py runs, in-process or
under torchrun, and their logs."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)

# a 2-layer, 32-wide model on the CPU in float32, eager, logging every step: a run of 20 iters
# takes a few seconds. A flag given after these wins (train.py reads them in order).
TINY = ['--n_layer=2', '--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=8', '--eval_iters=2',
        '--num_samples=4', '--sample_tokens=16', '--dist_samples=50', '--log_interval=1', '--warmup_iters=5', '--lr_decay_iters=40',
        '--learning_rate=3e-3', '--device=cpu', '--dtype=float32', '--compile=False',
        '--eval_dist_samples=0']  # exact metrics at each eval: tests/test_feedback.py

needs_compiler = pytest.mark.skipif(shutil.which('g++') is None,
                                    reason="torch.compile on the CPU needs a C++ compiler")


def run(out_dir, *flags, iters=None):
    """train.main on TINY + flags in out_dir, in this process; the rows of its log.jsonl.
    iters sets max_iters and lr_decay_iters together."""
    import train  # here, not at the top: test files that never train do not import it
    more = [f'--max_iters={iters}', f'--lr_decay_iters={iters}'] if iters else []
    train.main([f'--out_dir={out_dir}', *TINY, *more, *flags])
    return read_log(out_dir)


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def steps(log):
    """The training-step rows of a log."""
    return [r for r in log if 'loss' in r]


def evals(log):
    """The eval rows of a log."""
    return [r for r in log if 'val_loss' in r]


def torchrun(nproc, *args, script='train.py'):
    """script under `torchrun --standalone` with nproc processes (gloo on the CPU), with none of
    this process's own distributed environment; fails the test on a non-zero exit. Its stdout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env['OMP_NUM_THREADS'] = '1'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', script, *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def count_params(config):
    """A GPT's parameter count without allocating: the model is built on the meta device."""
    from model import GPT
    with torch.device('meta'):
        return GPT(config).get_num_params()


@pytest.fixture(scope='module')
def cached_data():
    """data.load_data cached for a module's tests (pytestmark = usefixtures('cached_data')): tests
    about run folders, signals or files, not data, build the synthetic corpus once."""
    import functools
    import data
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, 'load_data', functools.lru_cache(data.load_data))
        yield
