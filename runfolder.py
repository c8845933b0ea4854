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
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager, suppress


RUN_FILES = ('ckpt.pt', 'log.jsonl', 'samples.txt', 'report.json')  # what a run writes into out_dir


def checkpoint_path(c):
    return os.path.join(c['out_dir'], 'ckpt.pt')


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
        with writing(self.file.name):
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
        file = self.file or self.open()
        with writing(file.name):
            file.close()


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
    """Write a file whole or not at all: the old file stays until the new one is complete (a kill
    leaves a *.tmp, which the next run removes; a failed write removes it)."""
    with writing(path, path + '.tmp'):
        with open(path + '.tmp', 'w') as f:
            f.write(text)
        os.replace(path + '.tmp', path)


@contextmanager
def writing(path, tmp=None):
    """A failed write of `path` (a full disk, a quota, any OSError; torch.save's RuntimeError
    around one) is one line naming the file, the error and the free space of its file system;
    `tmp`, the partial file, is removed, so that the file written before stays as it was."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if tmp is not None:
            with suppress(OSError):
                os.remove(tmp)
        why = e.strerror if isinstance(e, OSError) else f"torch.save failed, {str(e).strip().splitlines()[0]}"
        raise SystemExit(f"error: cannot write {path!r}: {why} ({free_space(path)} free on its "
                         f"file system)")


def free_space(path):
    try:
        return f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 1e6:.1f} MB"
    except OSError:
        return 'unknown space'


def stop_nonfinite(iter_num, c):
    raise SystemExit(f"error: the loss became NaN or infinite by iter {iter_num}; stopped, and the last "
                     f"good checkpoint in {c['out_dir']!r} is untouched")


# -----------------------------------------------------------------------------
# stops a user or a cluster causes: Ctrl-C (SIGINT) and preemption (SIGTERM)

class Interrupted(Exception):
    """A stop at once: a second signal, or one during the end-of-run samples."""


class Stop:
    """Holds SIGINT (Ctrl-C) and SIGTERM (SLURM's and Kubernetes' preemption; torchrun forwards
    it to every worker) while the run is inside `with Stop() as stop`. The first signal only asks
    the loop to stop: it finishes its step, saves a checkpoint and exits 128 + the signal (130,
    143) with one line saying how to resume. A second signal a second or more later stops at once
    (Interrupted: the last checkpoint kept); within a second it is the first one forwarded again
    (torchrun passes on the Ctrl-C the terminal already sent every worker). In the end phase
    (the samples and the report) the first signal stops at once."""

    def __init__(self, c, world):
        self.c, self.world = c, world
        self.signum, self.at, self.phase, self.previous = 0, 0.0, 'train', {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach it alone
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        now = time.monotonic()
        if not self.signum:
            self.signum, self.at = signum, now
        if self.phase == 'end' or now - self.at >= 1.0:
            raise Interrupted()

    def agreed(self):
        """The signal any rank received (0: none), the same on every rank: a small CPU collective
        under torchrun, so that every rank stops at the same iteration."""
        import distributed
        return distributed.max_over_ranks(self.signum)

    def end_phase(self):
        """From here a signal stops at once; one that came during the last step stops now."""
        self.phase = 'end'
        if self.signum:
            raise Interrupted()

    def exit(self, iter_num, master):
        """After the stopped run saved its checkpoint at iter_num: the one line, the exit status."""
        import distributed
        distributed.teardown()
        if master:
            launch = (f"torchrun --nproc_per_node={self.world} train.py" if self.world > 1
                      else "python train.py")
            print(f"stopped by {signal.Signals(self.signum).name} at iter {iter_num}: checkpoint "
                  f"saved in {self.c['out_dir']!r}; resume with: {launch} --init_from=resume "
                  f"--out_dir={self.c['out_dir']}", file=sys.stderr)
        raise SystemExit(128 + self.signum)

    def __exit__(self, kind, error, traceback):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if kind is not Interrupted:
            return False
        name, kept = signal.Signals(self.signum).name, os.path.join(self.c['out_dir'], 'ckpt.pt')
        kept = f"the last checkpoint ({kept}) is kept" if os.path.exists(kept) else "no checkpoint yet"
        if self.phase == 'end':
            print(f"stopped by {name} during the end-of-run samples: {kept}; report.json was not "
                  f"written (python sample.py --metrics=True --out_dir={self.c['out_dir']} writes "
                  f"the metrics)", file=sys.stderr)
        else:
            print(f"stopped at once by a second {name}: {kept}", file=sys.stderr)
        raise SystemExit(128 + self.signum)
