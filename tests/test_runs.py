"""What happens when things go wrong (README): every bad value is one line `error: KEY=VALUE ...`,
a non-zero exit, no traceback, and the run folder untouched; run folders never lie (a resumed
run's log reads as the unbroken run's, a kill leaves nothing stale behind, one run per folder at
a time, a fresh run never mixes its files with an old run's).

Most cases run in-process (train.main / sample.main / bench.main raising SystemExit); a few run
as subprocesses, at once, to show the whole path to the terminal has no traceback. The synthetic
corpus is built once per module (data.load_data cached): these tests are about folders, not data."""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import bench
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--n_layer=1', '--n_embd=32', '--n_head=2', '--block_size=16', '--batch_size=4', '--max_iters=4',
        '--eval_interval=2', '--eval_iters=1', '--num_samples=2', '--sample_tokens=8', '--device=cpu',
        '--dtype=float32', '--eval_dist_samples=0']
LONG = ['--max_iters=60', '--eval_interval=5', '--log_interval=1', '--warmup_iters=5', '--lr_decay_iters=60']
TIMING = ('tok_per_s', 'eta_s')
NO_GPU = 'cuda' if not torch.cuda.is_available() else f'cuda:{torch.cuda.device_count()}'  # a device not here


pytestmark = pytest.mark.usefixtures('cached_data')  # conftest.py: one corpus a module


def train_main(out_dir, *args):
    train.main([f'--out_dir={out_dir}', *TINY, *args])


def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def snapshot(folder):
    """{path: sha256} of every file under folder (hidden ones too)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, 'rb').read()).hexdigest()
    return out


def dead_pid():
    p = subprocess.Popen(['true'])
    p.wait()
    return p.pid


@pytest.fixture(scope='module')
def used_run(tmp_path_factory):
    """A tiny finished run (4 iters, checkpoint at 4): the folder every case below must leave alone."""
    out = str(tmp_path_factory.mktemp('used') / 'run')
    train_main(out)
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl', 'report.json', 'samples.txt']
    return out


@pytest.fixture
def folder(used_run, tmp_path):
    out = str(tmp_path / 'run')
    shutil.copytree(used_run, out)
    return out


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted 60-iter run, every step logged: what a killed-and-resumed run must log."""
    out = str(tmp_path_factory.mktemp('reference') / 'run')
    train_main(out, *LONG)
    return out


# ---------------------------------------------------------------- every bad value: one line, folder untouched

def own_checkpoint(folder):
    return f'--init_from={folder}/ckpt.pt'


def foreign_checkpoint(folder):
    """A torch file holding a dict with a config but none of train.py's other keys."""
    torch.save({'config': dict(train.DEFAULTS), 'model': {}}, os.path.join(folder, 'ckpt.pt'))


def as_bert(folder):
    """The run's checkpoint relabelled a BERT (sample.py refuses what a BERT would ignore before loading weights)."""
    path = os.path.join(folder, 'ckpt.pt')
    ckpt = torch.load(path, weights_only=False)
    ckpt['model_args']['causal'] = False
    torch.save(ckpt, path)


def busy(folder):
    with open(os.path.join(folder, '.lock'), 'w') as f:
        f.write(f'{os.getpid()} {socket.gethostname()}\n')  # this test process: alive


# (script, args, what the error line must name, prepare the folder); train.py's get --out_dir=FOLDER and TINY first
CASES = {
    'size': ('train', ['--size=huge'], 'size=', None),
    'batch_size0': ('train', ['--batch_size=0'], 'batch_size=0', None),
    'batch_size-1': ('train', ['--batch_size=-1'], 'batch_size=-1', None),
    'block_size': ('train', ['--block_size=-1'], 'block_size=-1', None),
    'learning_rate': ('train', ['--learning_rate=-1'], 'learning_rate=-1', None),
    'n_head': ('train', ['--n_head=3'], 'n_head=3', None),
    'n_layer': ('train', ['--n_layer=0'], 'n_layer=0', None),
    'accumulation': ('train', ['--gradient_accumulation_steps=0'], 'gradient_accumulation_steps=0', None),
    'eval_interval': ('train', ['--eval_interval=0'], 'eval_interval=0', None),
    'log_interval': ('train', ['--log_interval=0'], 'log_interval=0', None),
    'eval_iters': ('train', ['--eval_iters=0'], 'eval_iters=0', None),
    'dropout': ('train', ['--dropout=1.5'], 'dropout=1.5', None),
    'out_dir': ('train', ['--out_dir='], "out_dir=''", None),
    'out_dir a file': ('train', ['--out_dir=FOLDER/ckpt.pt'], "ckpt.pt' cannot be made a folder", None),
    'seed': ('train', [f'--seed={2**64 - 1}'], f'seed={2**64 - 1}', None),  # past torch's seeds (it adds to them)
    'min_lr': ('train', ['--min_lr=0.1'], 'min_lr=0.1 is above learning_rate=0.003', None),
    'num_samples': ('train', ['--num_samples=0'], 'num_samples=0', None),
    'device': ('train', [f'--device={NO_GPU}'], 'device=', None),
    'psu_lambda': ('train', ['--psu_lambda=-1'], 'psu_lambda=-1', None),
    'psu_beta': ('train', ['--psu_beta=1.5'], 'psu_beta=1.5', None),
    'max_iters': ('train', ['--max_iters=-1'], 'max_iters=-1', None),
    'infinite': ('train', ['--learning_rate=1e999'], 'learning_rate=inf', None),
    'fsdp': ('train', ['--fsdp=True'], 'fsdp=True', None),
    'unknown key': ('train', ['--max_iter=5'], "'max_iter'", None),
    'wrong type': ('train', ['--max_iters=abc'], 'max_iters', None),
    'not key=value': ('train', ['--max_iters'], 'max_iters', None),
    'config file': ('train', ['config/none.py'], 'config/none.py', None),
    # a used folder: a fresh run is refused; the missing data file is found before anything goes
    'used folder': ('train', [], '--overwrite=True', None),
    'data file': ('train', ['--overwrite=True', '--data=/nonexistent.txt'], '/nonexistent.txt', None),
    'data typo': ('train', ['--overwrite=True', '--data=synthetic2'], "data='synthetic2' does not exist (data: synthetic, a text", None),
    'init_from typo': ('train', ['--overwrite=True', '--init_from=Resume'], "init_from='Resume' does not exist (init_from: scratch, resume", None),
    'busy folder': ('train', ['--overwrite=True'], '.lock', busy),
    'busy resume': ('train', ['--init_from=resume', '--max_iters=6'], '.lock', busy),
    # resuming: a shape key that is not the checkpoint's, or a checkpoint that is not train.py's
    'resume size': ('train', ['--init_from=resume', '--size=gpt2'], "size='gpt2' does not match", None),
    'resume n_layer': ('train', ['--init_from=resume', '--n_layer=2'], '(n_layer=1)', None),
    'resume n_embd': ('train', ['--init_from=resume', '--n_embd=64'], '(n_embd=32)', None),
    'resume block_size': ('train', ['--init_from=resume', '--block_size=32'], '(block_size=16)', None),
    'resume model': ('train', ['--init_from=resume', '--model=bert'], "(model='gpt')", None),
    'resume tokenizer': ('train', ['--init_from=resume', '--tokenizer=char'], "(tokenizer='auto')", None),
    'resume data': ('train', ['--init_from=resume', '--data=other.txt'], "(data='synthetic')", None),
    'resume bias': ('train', ['--init_from=resume', '--bias=False'], '(bias=True)', None),
    'resume max_iters': ('train', ['--init_from=resume', '--max_iters=2'], 'max_iters=2', None),
    'foreign checkpoint': ('train', ['--init_from=resume'], "no optimizer, model_args, tokenizer", foreign_checkpoint),
    'own checkpoint as GPT-2': ('train', ['--overwrite=True', 'OWN'], '--init_from=resume --out_dir=', None),
    # sample.py and bench.py share the rules of the keys they share
    'sample top_k': ('sample', ['--top_k=-1'], 'top_k=-1', None),
    'sample device': ('sample', [f'--device={NO_GPU}'], 'device=', None),
    'sample num_samples': ('sample', ['--num_samples=0'], 'num_samples=0', None),
    'sample temperature': ('sample', ['--temperature=-1'], 'temperature=-1', None),
    'sample out_dir': ('sample', ['--out_dir='], "out_dir=''", None),
    'sample seed': ('sample', [f'--seed={10**20}'], f'seed={10**20} is not an int in [0, 1e18]', None),
    'sample unknown key': ('sample', ['--topk=5'], "'topk'", None),
    'sample foreign checkpoint': ('sample', [], 'ckpt.pt', foreign_checkpoint),
    'sample start on BERT': ('sample', ['--start=the'], "start='the' continues a GPT", as_bert),  # was ignored
    'sample BERT window': ('sample', ['--max_new_tokens=1000'], 'max_new_tokens=1000 is more than the 16 positions', as_bert),
    'bench steps': ('bench', ['--steps=0'], 'steps=0', None),
    'bench device': ('bench', [f'--device={NO_GPU}'], 'device=', None),
}


def argv(script, args, folder):
    args = [own_checkpoint(folder) if a == 'OWN' else a.replace('FOLDER', folder) for a in args]
    if script == 'train':
        return [f'--out_dir={folder}', *TINY, *args]
    return ([f'--out_dir={folder}', '--device=cpu'] if script == 'sample' else []) + args


def one_error_line(text, fragment):
    assert 'Traceback' not in text, text
    errors = [line for line in text.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, text
    assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize('case', CASES)
def test_bad_value_is_one_line_and_touches_nothing(case, folder, capsys, monkeypatch):
    script, args, fragment, prepare = CASES[case]
    if prepare:
        prepare(folder)
    before = snapshot(folder)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        dict(train=train, sample=sample, bench=bench)[script].main(argv(script, args, folder))
    assert isinstance(e.value.code, str)  # a message: exit status 1
    out = capsys.readouterr()
    one_error_line(out.out + out.err + e.value.code, fragment)
    assert '\n' not in e.value.code
    assert snapshot(folder) == before


SUBPROCESS = ('size', 'n_head', 'device', 'resume size', 'own checkpoint as GPT-2', 'sample top_k')


def test_bad_values_end_to_end_have_no_traceback(folder):
    """The same cases as subprocesses, started at once: exit status 1, one error line, no traceback."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = {}
    for case in SUBPROCESS:
        script, args, fragment, _ = CASES[case]
        procs[case] = subprocess.Popen([sys.executable, f'{script}.py', *argv(script, args, folder)], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    before = snapshot(folder)
    for case, p in procs.items():
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 1, (case, out)
        one_error_line(out, CASES[case][2])
    assert snapshot(folder) == before


def test_every_key_has_a_rule_and_help_prints_it(capsys):
    assert set(train.VALID) == set(train.DEFAULTS)
    assert set(sample.VALID) == set(sample.DEFAULTS)
    with pytest.raises(SystemExit) as e:
        train.main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "  --batch_size=32  (int >= 1)\n" in out and "  --model='gpt'  (gpt | bert)\n" in out
    assert "  --dropout=0.0  (float in [0, 1))\n" in out and '  --overwrite=False  (bool)\n' in out


# ---------------------------------------------------------------- run folders that never lie

def test_kill_9_then_resume_logs_as_the_unbroken_run(reference, tmp_path):
    """kill -9 after the first checkpoint: the log holds rows past the checkpoint (and maybe half a
    row). The resumed run drops them: its log equals the uninterrupted run's, row for row."""
    out = str(tmp_path / 'killed')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}  # the tests' thread count: the same float sums
    p = subprocess.Popen([sys.executable, 'train.py', f'--out_dir={out}', *TINY, *LONG], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log, deadline = os.path.join(out, 'log.jsonl'), time.time() + 120
    while time.time() < deadline and p.poll() is None:  # a step row 2 past the first checkpoint (iter 5)
        if os.path.exists(os.path.join(out, 'ckpt.pt')) and os.path.exists(log):
            lines = open(log).read().splitlines()
            if len(lines) > 1 and '"loss"' in lines[-2] and json.loads(lines[-2])['iter'] >= 7:
                break
        time.sleep(0.002)
    assert p.poll() is None, f'the run ended before it could be killed: {p.communicate()[1][-2000:]}'
    p.send_signal(signal.SIGKILL)
    p.wait()
    saved = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['iter_num']
    logged = [json.loads(line) for line in open(log) if line.endswith('\n')]
    assert any(r['iter'] >= saved and 'loss' in r for r in logged)  # rows the resumed run will log again
    assert open(os.path.join(out, '.lock')).read().split()[0] == str(p.pid)  # kill -9 left its lock: stale
    train_main(out, *LONG, '--init_from=resume')
    assert untimed(read_log(out)) == untimed(read_log(reference))
    assert not os.path.exists(os.path.join(out, '.lock'))


def test_kill_during_checkpoint_write(reference, tmp_path):
    """Simulated: killed while writing the checkpoint at 15 (ckpt.pt at 10, ckpt.pt.tmp half written,
    the log through eval 15 and half a row). The resume removes the .tmp and logs as the unbroken run."""
    out = str(tmp_path / 'run')
    train_main(out, *LONG, '--max_iters=10')
    ref = open(os.path.join(reference, 'log.jsonl')).read().splitlines(keepends=True)
    with open(os.path.join(out, 'log.jsonl'), 'a') as f:
        f.writelines(line for line in ref if 10 <= json.loads(line)['iter'] < 15 and 'val_loss' not in line or
                     json.loads(line)['iter'] == 15 and 'val_loss' in line)  # steps 10-14, eval 15
        f.write('{"iter": 15, "loss": 4.')
    open(os.path.join(out, 'ckpt.pt.tmp'), 'wb').write(b'half a checkpoint')
    train_main(out, *LONG, '--init_from=resume')
    assert untimed(read_log(out)) == untimed(read_log(reference))
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl', 'report.json', 'samples.txt']


def test_kill_during_first_checkpoint_write(reference, tmp_path, capsys):
    """Only ckpt.pt.tmp: nothing to resume (one line saying so, folder untouched); --overwrite=True
    starts afresh and the stale .tmp goes (--max_iters=0 saves no checkpoint that would replace it)."""
    out = str(tmp_path / 'run')
    os.makedirs(out)
    ref = open(os.path.join(reference, 'log.jsonl')).read().splitlines(keepends=True)
    open(os.path.join(out, 'log.jsonl'), 'w').writelines(line for line in ref if json.loads(line)['iter'] <= 5)
    open(os.path.join(out, 'ckpt.pt.tmp'), 'wb').write(b'half a checkpoint')
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        train_main(out, *LONG, '--init_from=resume')
    one_error_line(e.value.code, '--overwrite=True')
    assert snapshot(out) == before
    train_main(out, *LONG, '--max_iters=0', '--overwrite=True')
    assert sorted(os.listdir(out)) == ['log.jsonl', 'report.json', 'samples.txt']
    assert read_log(out) == read_log(reference)[:1]  # eval 0 alone: the new run's


def test_stale_lock_is_taken_over(folder):
    with open(os.path.join(folder, '.lock'), 'w') as f:
        f.write(f'{dead_pid()} {socket.gethostname()}\n')
    train_main(folder, '--init_from=resume', '--max_iters=6')
    assert torch.load(os.path.join(folder, 'ckpt.pt'), weights_only=False)['iter_num'] == 6
    assert not os.path.exists(os.path.join(folder, '.lock'))


def test_lock_of_another_host_is_not_taken(folder):
    """A dead PID on another host says nothing about that host: the folder stays refused."""
    with open(os.path.join(folder, '.lock'), 'w') as f:
        f.write(f'{dead_pid()} not-{socket.gethostname()}\n')
    with pytest.raises(SystemExit) as e:
        train_main(folder, '--init_from=resume', '--max_iters=6')
    one_error_line(e.value.code, f'not-{socket.gethostname()}')


def test_overwrite_replaces_the_whole_run(folder):
    """--overwrite=True, here with --max_iters=0: the old checkpoint goes with the old log, and
    every file left is the new run's (report.json says so: its config and iteration)."""
    old_log = read_log(folder)
    train_main(folder, '--overwrite=True', '--max_iters=0', '--seed=7')
    assert sorted(os.listdir(folder)) == ['log.jsonl', 'report.json', 'samples.txt']
    log = read_log(folder)
    assert [r['iter'] for r in log] == [0] and log != old_log[:1]
    report = json.load(open(os.path.join(folder, 'report.json')))
    assert report['iter_num'] == 0 and report['config']['seed'] == 7


def test_report_names_its_iteration_and_eta_waits(reference):
    report = json.load(open(os.path.join(reference, 'report.json')))
    ckpt = torch.load(os.path.join(reference, 'ckpt.pt'), weights_only=False)
    assert report['iter_num'] == ckpt['iter_num'] == 60
    steps = [r for r in read_log(reference) if 'loss' in r]
    assert [r['iter'] for r in steps if 'eta_s' in r] == list(range(4, 60))


def test_failed_fresh_run_leaves_no_folder(tmp_path):
    """The lock made the folder; a run that fails before its first row takes both away again."""
    out = str(tmp_path / 'new')
    with pytest.raises(SystemExit) as e:
        train_main(out, '--data=/nonexistent.txt')
    one_error_line(e.value.code, '/nonexistent.txt')
    assert not os.path.exists(out)
