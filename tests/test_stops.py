"""Stops a user or a cluster causes (README, what happens when things go wrong): Ctrl-C (SIGINT) and
preemption (SIGTERM) finish the step, save, say how to resume in one line and exit 130 / 143, and the
resumed run logs as the unbroken one; a second signal, or one during the end-of-run samples, stops at
once with the last checkpoint kept; a full disk while writing any of the run's files (or sample.py's,
or data.py's) is one line naming the file, with the previous checkpoint kept and no *.tmp left.

The signals are real (os.kill of this process, or of a subprocess), sent from inside a step through a
wrapped train_step, so that the iteration they arrive at is known; the full disk is simulated (the write
raises OSError(ENOSPC) after writing part of the file)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import runfolder
import train
from conftest import ROOT

TINY = ['--n_layer=1', '--n_embd=32', '--n_head=2', '--block_size=16', '--batch_size=4', '--eval_iters=1',
        '--num_samples=2', '--sample_tokens=8', '--device=cpu', '--dtype=float32', '--max_iters=20',
        '--eval_interval=5', '--log_interval=1', '--warmup_iters=5', '--lr_decay_iters=20',
        '--eval_dist_samples=0']
TIMING = ('tok_per_s', 'eta_s')
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


pytestmark = pytest.mark.usefixtures('cached_data')  # conftest.py: one corpus a module


def train_main(out, *args):
    train.main([f'--out_dir={out}', *TINY, *args])


def untimed_log(out):
    rows = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def saved_iter(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['iter_num']


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The unbroken 20-step run that every stopped-and-resumed run must log, row for row."""
    out = str(tmp_path_factory.mktemp('reference') / 'run')
    train_main(out)
    return out


def signal_at_step(monkeypatch, step, *signums, advance=0.0):
    """train_step sends this process the signals during step `step` (iteration numbers from 0);
    advance: seconds the Stop clock moves on between them (a second signal, a user's, not a forward)."""
    real_step, calls, clock = train.train_step, [], time.monotonic

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == step + 1:
            for i, signum in enumerate(signums):
                monkeypatch.setattr(runfolder.time, 'monotonic', lambda: clock() + i * advance)
                os.kill(os.getpid(), signum)
        return out
    monkeypatch.setattr(train, 'train_step', step_then_signal)


@pytest.mark.parametrize('signum, step', [(signal.SIGINT, 7), (signal.SIGTERM, 9)])
def test_signal_saves_after_its_step_and_resume_is_exact(signum, step, reference, tmp_path, monkeypatch,
                                                         capsys):
    """The step the signal came in is finished, then the checkpoint (iteration step + 1; at 10 the
    eval's save comes first) and one line on stderr: the signal, the iteration, the resume command.
    Exit status 128 + signal; lock released; --init_from=resume logs exactly the unbroken run."""
    out = str(tmp_path / 'run')
    signal_at_step(monkeypatch, step, signum)
    with pytest.raises(SystemExit) as e:
        train_main(out)
    assert e.value.code == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"stopped by {signal.Signals(signum).name} at iter {step + 1}: checkpoint saved in {out!r}; "
                   f"resume with: python train.py --init_from=resume --out_dir={out}"], err
    assert saved_iter(out) == step + 1 and not os.path.exists(os.path.join(out, '.lock'))
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']
    monkeypatch.undo()
    train_main(out, '--init_from=resume')
    assert untimed_log(out) == untimed_log(reference)


def sigterm_once_logging(args, env, out, rows):
    """python ARGS in ROOT; once out/log.jsonl holds more than `rows` rows, SIGTERM.
    -> (exit status, stderr)."""
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    log, deadline = os.path.join(out, 'log.jsonl'), time.time() + 120
    while time.time() < deadline and p.poll() is None and not (os.path.exists(log) and
                                                               open(log).read().count('\n') > rows):
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    return p.returncode, err


def test_sigterm_end_to_end_has_no_traceback(tmp_path):
    """As a cluster sends it: SIGTERM to the process. Exit 143, one line on stderr, a loadable checkpoint."""
    out = str(tmp_path / 'run')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    status, err = sigterm_once_logging(['train.py', f'--out_dir={out}', *TINY, '--max_iters=100000',
                                        '--lr_decay_iters=100000'], env, out, rows=3)
    assert status == 143 and 'Traceback' not in err, err[-3000:]
    assert err.startswith('stopped by SIGTERM at iter ') and err.count('\n') == 1, err
    assert saved_iter(out) == int(err.split()[5].rstrip(':'))


def test_second_signal_stops_at_once(tmp_path, monkeypatch, capsys):
    """A second Ctrl-C a second after the first does not wait for the step: one line, the last
    checkpoint (the eval's at 5) kept, exit 130, lock released, no traceback."""
    out = str(tmp_path / 'run')
    signal_at_step(monkeypatch, 7, signal.SIGINT, signal.SIGINT, advance=2.0)
    with pytest.raises(SystemExit) as e:
        train_main(out)
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == (f"stopped at once by a second SIGINT: the last checkpoint "
                                               f"({out}/ckpt.pt) is kept")
    assert saved_iter(out) == 5 and sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']


def test_forwarded_signal_is_not_a_second_one(reference, tmp_path, monkeypatch):
    """torchrun forwards the terminal's Ctrl-C to workers that already got it: two signals within a
    second are one, and the run still saves after its step and resumes exactly."""
    out = str(tmp_path / 'run')
    signal_at_step(monkeypatch, 7, signal.SIGINT, signal.SIGINT, advance=0.1)
    with pytest.raises(SystemExit) as e:
        train_main(out)
    assert e.value.code == 130 and saved_iter(out) == 8
    monkeypatch.undo()
    train_main(out, '--init_from=resume')
    assert untimed_log(out) == untimed_log(reference)


@pytest.mark.parametrize('when', ['sampling', 'last step'])
def test_signal_during_end_of_run_keeps_the_checkpoint(when, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the end-of-run samples are drawn, or during the last step (the loop then has no step
    left to stop after): the checkpoint at max_iters is kept, and the line says the report was not
    written (and how to get the metrics)."""
    out = str(tmp_path / 'run')
    real = train.sample_texts

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    if when == 'sampling':
        monkeypatch.setattr(train, 'sample_texts', interrupted)
    else:
        signal_at_step(monkeypatch, 19, signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        train_main(out)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and err.startswith('stopped by SIGINT during the end-of-run samples: the last '
                                                  'checkpoint') and 'report.json was not written' in err, err
    assert saved_iter(out) == 20 and sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']


# ---------------------------------------------------------------- a full disk

def full_disk_after(calls, write_part):
    """A write function that works `calls` times, then writes part of its file and raises ENOSPC."""
    done = []

    def write(*args, **kwargs):
        done.append(1)
        if len(done) > calls:
            write_part(*args)
            raise ENOSPC
        return write.real(*args, **kwargs)
    return write


def test_full_disk_during_checkpoint_keeps_the_last_one(tmp_path, monkeypatch, capsys):
    """The second checkpoint (iteration 10) hits a full disk: one line naming ckpt.pt, the error and the
    free space; ckpt.pt of iteration 5 kept and loadable; no ckpt.pt.tmp; exit non-zero, lock released."""
    out = str(tmp_path / 'run')
    save = full_disk_after(1, lambda obj, path: open(path, 'wb').write(b'half a checkpoint'))
    save.real = torch.save
    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(SystemExit) as e:
        train_main(out)
    assert e.value.code == (f"error: cannot write {out + '/ckpt.pt'!r}: No space left on device "
                            f"({runfolder.free_space(out)} free on its file system)")
    assert saved_iter(out) == 5 and sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']


@pytest.mark.parametrize('name', ['log.jsonl', 'samples.txt', 'report.json'])
def test_full_disk_while_writing_a_run_file(name, tmp_path, monkeypatch):
    """Any of the run's text files: one line naming it; no *.tmp left; the checkpoint kept."""
    out = str(tmp_path / 'run')
    real_open = open

    def full_open(path, mode='r', *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if os.path.basename(str(path)).startswith(name) and 'r' not in mode:
            write = f.write
            f.write = lambda text: (write(text[:len(text) // 2]), (_ for _ in ()).throw(ENOSPC))
        return f
    monkeypatch.setattr(runfolder, 'open', full_open, raising=False)
    with pytest.raises(SystemExit) as e:
        train_main(out)
    assert e.value.code.startswith(f"error: cannot write {os.path.join(out, name)!r}: No space left on "
                                   f"device ("), e.value.code
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')] and not os.path.exists(out + '/.lock')
    if name != 'log.jsonl':  # the log fails at its first row, before any checkpoint
        assert saved_iter(out) == 20


def test_full_disk_in_sample_py_and_data_py(reference, tmp_path, monkeypatch, capsys):
    """sample.py --metrics and data.py: one line naming the file or folder; nothing half-written left."""
    import sample
    monkeypatch.setattr(runfolder, 'open', lambda *a, **k: (_ for _ in ()).throw(ENOSPC), raising=False)
    with pytest.raises(SystemExit) as e:
        sample.main([f'--out_dir={reference}', '--metrics=True', '--dist_samples=10', '--num_samples=2',
                     '--device=cpu'])
    assert e.value.code.startswith(f"error: cannot write {reference + '/samples-t1.0-k0-p1.0.txt'!r}: No "
                                   f"space left on device"), e.value.code
    assert not [f for f in os.listdir(reference) if f.endswith('.tmp') or f.startswith('metrics-')]
    monkeypatch.undo()
    src, out = tmp_path / 'text.txt', str(tmp_path / 'bins')
    src.write_text('the cat sat on the mat\n' * 2000)

    def full(source, folder, *args):
        open(os.path.join(folder, 'train.bin'), 'wb').write(b'\0' * 10)
        raise ENOSPC
    monkeypatch.setattr(data, 'write_bins', full)
    with pytest.raises(SystemExit) as e:
        data.main([f'--src={src}', f'--out={out}', '--tokenizer=char'])
    assert e.value.code.startswith(f"error: {out!r} was not written: No space left on device ("), e.value.code
    assert sorted(os.listdir(tmp_path)) == ['text.txt']  # no DIR, no DIR.tmp-<pid>


def test_torchrun_sigterm_stops_every_rank_at_one_iteration(tmp_path):
    """SIGTERM to torchrun, which forwards it to both workers: they agree on the iteration, rank 0
    says so in one line, the checkpoint holds both ranks' states, and the resumed run (under
    torchrun) logs the unbroken torchrun run's numbers. torchrun itself then prints its own
    SignalException traceback and exits 1: that is torch's launcher, not this run."""
    from conftest import torchrun
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env['OMP_NUM_THREADS'] = '1'
    reference, out = str(tmp_path / 'reference'), str(tmp_path / 'run')
    torchrun(2, f'--out_dir={reference}', *TINY)
    _, err = sigterm_once_logging(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                                   f'--out_dir={out}', *TINY, '--max_iters=100000'], env, out, rows=6)
    ours = [line for line in err.splitlines() if line.startswith('stopped by')]
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert ours == [f"stopped by SIGTERM at iter {ckpt['iter_num']}: checkpoint saved in {out!r}; resume with: "
                    f"torchrun --nproc_per_node=2 train.py --init_from=resume --out_dir={out}"], err[-3000:]
    assert len(ckpt['ranks']) == 2 and ckpt['iter_num'] < 20
    torchrun(2, f'--out_dir={out}', '--init_from=resume', '--max_iters=20')
    assert untimed_log(out) == untimed_log(reference)
