"""
The run folder (out_dir): one run's files, and only that run's. train.py's safety plumbing, kept
out of the training loop's file: a lock so that two runs never write one folder, the refusal of a
fresh run where a run already is, a log.jsonl that after a resume reads exactly as the unbroken
run's, and files written whole or not at all. Nothing in out_dir changes before the configuration,
data, model and first eval are known good: then the first log row claims the folder.
(tests/test_runs.py checks each promise; the README lists them.)
"""
import json
import os
import socket
from contextlib import contextmanager, suppress

from model import load_checkpoint

RUN_FILES = ('ckpt.pt', 'log.jsonl', 'samples.txt', 'report.json')  # what a run writes into out_dir


def checkpoint_path(c):
    return os.path.join(c['out_dir'], 'ckpt.pt')


CKPT_KEYS = ('model', 'optimizer', 'config', 'model_args', 'tokenizer', 'iter_num', 'ranks', 'psu', 'baara',
             'diagnostics', 'latest')  # what save_checkpoint writes and a resumed run reads


def resumed_config(config, given, defaults, shape_keys):
    """--init_from=resume: the config of the checkpoint in out_dir under the keys given now (keys newer
    than the checkpoint: defaults). A shape key (its model's shape, data or vocabulary) may only
    repeat the checkpoint's value."""
    out_dir, path = config['out_dir'], checkpoint_path(config)
    if not os.path.exists(path) and os.path.exists(os.path.join(out_dir, 'log.jsonl')):
        raise SystemExit(f"error: nothing to resume: {path!r} does not exist (the run in {out_dir!r} stopped "
                         f"before its first checkpoint); start it again with --overwrite=True")
    ckpt = load_checkpoint(path)
    missing = [key for key in CKPT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing or not isinstance(ckpt['config'], dict):
        raise SystemExit(f"error: {path!r} is not a checkpoint written by train.py (it has no {', '.join(missing or ['config'])})")
    saved = ckpt['config']
    for key in shape_keys:
        if key in given and key in saved and config[key] != saved[key]:
            raise SystemExit(f"error: {key}={config[key]!r} does not match the checkpoint in {out_dir!r} ({key}="
                             f"{saved[key]!r}): a resumed run keeps its model shape, data and tokenizer; drop --{key}, "
                             f"or start a new run in another --out_dir")
    config = {**defaults, **saved, **{k: config[k] for k in given}, 'out_dir': out_dir, 'init_from': 'resume',
              'overwrite': config['overwrite']}
    if config['max_iters'] < ckpt['iter_num']:  # the loop would never meet max_iters
        raise SystemExit(f"error: max_iters={config['max_iters']} is below the iteration of the checkpoint in "
                         f"{out_dir!r} ({ckpt['iter_num']}); resume with --max_iters={ckpt['iter_num']} or more")
    return config


@contextmanager
def run_folder(c, master):
    """Holds out_dir for one run: rank 0 takes out_dir/.lock (take_lock), a fresh run is refused
    where a run already is (unless --overwrite=True), and rank 0 removes the *.tmp files a killed
    run left. The lock goes when the run ends, normally or by an error (a kill -9 or SIGTERM
    leaves it, stale); a folder made for it goes too if the run left it empty."""
    made = master and not os.path.isdir(c['out_dir'])
    lock = take_lock(c['out_dir']) if master else None
    try:
        refuse_used_folder(c)
        if master:
            for name in RUN_FILES:
                with suppress(FileNotFoundError):
                    os.remove(os.path.join(c['out_dir'], name + '.tmp'))
        yield
    finally:
        if lock:
            with suppress(OSError):
                os.remove(lock)
                if made:
                    os.rmdir(c['out_dir'])  # only if empty: a run that failed before its first row


def take_lock(out_dir):
    """out_dir/.lock, created with O_EXCL and holding 'PID HOST': a second run into the folder is
    refused. A lock whose process is gone from this host (a kill -9) is stale and taken over (two
    runs that find one stale lock at the same instant may both take it; a reused PID keeps it)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a file in its way, a folder we may not write in
        raise SystemExit(f"error: out_dir {out_dir!r} cannot be made a folder ({e.strerror})")
    path = os.path.join(out_dir, '.lock')
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(path)
            if attempt == 0 and holder and holder[1] == socket.gethostname() and not pid_alive(holder[0]):
                with suppress(FileNotFoundError):
                    os.remove(path)  # stale
                continue
            who = f"process {holder[0]} on {holder[1]}" if holder else "a process that left it unreadable"
            raise SystemExit(f"error: out_dir {out_dir!r} is in use by another run ({who}, see {path}); wait for "
                             f"it or use another --out_dir (delete {path} if no run is using the folder)")
        except OSError as e:  # a read-only folder or disk
            raise SystemExit(f"error: out_dir {out_dir!r} is not writable ({e.strerror})")
        with os.fdopen(fd, 'w') as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return path


def lock_holder(path):
    """(pid, host) from a lock file, or None when it cannot be read."""
    try:
        pid, host = open(path).read().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def pid_alive(pid):
    """Whether a process with this PID exists on this host (signal 0 checks, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def refuse_used_folder(c):
    """A fresh run does not mix its files with another run's."""
    if c['init_from'] == 'resume' or c['overwrite']:
        return
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(c['out_dir'], name))]
    if found:
        raise SystemExit(f"error: out_dir {c['out_dir']!r} already holds a run ({', '.join(found)}); use a new "
                         f"--out_dir, --init_from=resume to continue it, or --overwrite=True to replace it")


class RunLog:
    """log.jsonl (rank 0). The file is opened at the first row, or at close() if no row came:
    a resumed run first drops the rows that its killed predecessor logged after the checkpoint;
    a fresh run (into an empty folder, or --overwrite=True) first removes the old run's files."""

    def __init__(self, c, iter_num, resumed):
        self.c, self.iter_num, self.resumed, self.file = c, iter_num, resumed, None

    def write(self, row):
        print(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()))
        self.file = self.file or self.open()
        self.file.write(json.dumps(row) + '\n')
        self.file.flush()

    def open(self):
        path = os.path.join(self.c['out_dir'], 'log.jsonl')
        if self.resumed:
            write_atomic(path, ''.join(logged_before(path, self.iter_num)))
            return open(path, 'a')
        for name in RUN_FILES:
            with suppress(FileNotFoundError):
                os.remove(os.path.join(self.c['out_dir'], name))
        return open(path, 'w')

    def close(self):
        (self.file or self.open()).close()


def logged_before(path, iter_num):
    """The lines of log.jsonl that a run resumed at iter_num keeps: as the unbroken run's log reads
    there. Step rows before iter_num, eval rows up to it (the saving run logged that eval before it
    saved); a half-written last line goes too (a row cut short is no JSON; one cut at its newline
    is past the checkpoint)."""
    if not os.path.exists(path):
        return []
    keep = []
    for line in open(path):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # half a row
        if row['iter'] < iter_num + ('val_loss' in row):
            keep.append(line)
    return keep


def write_atomic(path, text):
    """Write a file whole or not at all: a kill leaves the old file or the new one, and a *.tmp."""
    with open(path + '.tmp', 'w') as f:
        f.write(text)
    os.replace(path + '.tmp', path)
