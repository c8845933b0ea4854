"""bench.py end to end on the CPU at one timed step per setup: every row is printed with its
ratio. Its GPU-only rows (compile against eager, tokens/s and MFU, the units at GPT-2 size) run
here at a tiny size, with torch.compile stubbed out: compile itself is tested in test_train.py."""
import re
import subprocess
import sys

import pytest
import torch

import bench
from conftest import ROOT

ROW = re.compile(r'^(DMU|DTU|PSU|BAARA|train step from bins|AdamW step fused / default|logged / unlogged step)[ ,].*\s(\d+\.\d) +(\d+\.\d)  (\d+\.\d{3})(?:  goal <= ([\d.]+): (met|NOT met))?$',
                 re.M)


def test_bench_prints_every_row(capsys):
    """With one timed step the B/A ratio is B's time over A's, both printed (in ms, to 0.1): the
    ratio must agree with them to their rounding, and a goal is met exactly when ratio <= goal."""
    bench.main(['--steps=1', '--warmup=0', '--metrics_words=2000', '--distribution_n=50', '--prepare_mb=0.5', '--device=cpu', '--dtype=float32',
                '--logged_size=tiny'])  # the logged rows at a tiny size, not 124M
    out = capsys.readouterr().out
    assert out.startswith('machine: ')
    rows = ROW.findall(out)
    assert [(name, goal) for name, _, _, _, goal, _ in rows] == [
        ('DMU', '0.65'), ('DMU', ''), ('DTU', ''), ('PSU', '1.05'), ('BAARA', '1.1'), ('PSU', '1.3'),
        ('train step from bins', '1.02'),
        ('AdamW step fused / default', ''), ('AdamW step fused / default', ''), ('logged / unlogged step', '1.05'),
        ('logged / unlogged step', '')]
    assert re.findall(r'^logged / unlogged step, tiny \(\d+M\), (\d+x\d+) tokens', out, re.M) == ['8x256', '1x64']
    for name, a, b, ratio, goal, verdict in rows:
        a, b, ratio = float(a), float(b), float(ratio)
        assert a > 0 and b > 0
        # ms printed to 0.05, the ratio to 5e-4: it lies within its interval with every rounding at its worst
        assert (b - 0.05) / (a + 0.05) - 5e-4 <= ratio <= (b + 0.05) / max(a - 0.05, 1e-9) + 5e-4, name
        if goal and abs(ratio - float(goal)) > 5e-4:  # not a tie hidden by the rounding
            assert (verdict == 'met') == (ratio <= float(goal)), name
    assert re.search(r'^model step vs nanoGPT +skipped: no --nanogpt=PATH', out, re.M)  # no nanoGPT here: a reason
    assert re.search(r'^tokens/s, MFU +[\d,]+ tok/s', out, re.M)
    assert re.search(r'^text metrics on 0.002M words +[\d.]+ s for', out, re.M)
    assert re.search(r'^distribution metrics on 50 sentences +[\d.]+ s \(forward KL [\d.]+, 50 samples\)', out, re.M)
    mb_s, mb, seconds, load, after = map(float, re.search(
        r'^prepare \(gpt2 BPE\) +([\d.]+) MB/s on ([\d.]+) MB \(.* x \d+, [\d,]+ tokens in ([\d.]+) s, \d+ threads; '
        r'([\d.]+) s of it loading the BPE tables: ([\d.]+) MB/s after\)$', out, re.M).groups())
    assert mb >= 0.5 and 0 < load < seconds
    # MB and MB/s are printed to 0.05, seconds to 0.005: each rate lies within its interval with every rounding at its worst
    assert (mb - 0.05) / (seconds + 0.005) - 0.05 <= mb_s <= (mb + 0.05) / max(seconds - 0.005, 1e-9) + 0.05
    assert (mb - 0.05) / (seconds - load + 0.01) - 0.05 <= after <= (mb + 0.05) / max(seconds - load - 0.01, 1e-9) + 0.05


def test_gpu_rows_run_at_a_tiny_size(monkeypatch):
    """Every GPU row runs, and tokens/s is the tokens of a step (2 x 16) over its time."""
    monkeypatch.setattr(torch, 'compile', lambda model: model)
    b = {**bench.BENCH, 'device': 'cpu', 'dtype': 'float32', 'steps': 1, 'warmup': 0}
    rows, times = [], []

    def pair(what, a, bb, goal=None):
        (ta,), (tb,) = bench.timed([a, bb], b)
        rows.append(what.split(',')[0])
        times.append((ta, tb))
        return ta, tb

    size = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, dropout=0.0)
    line = bench.gpu_rows(b, pair, size=size, label='tiny', vocab=512)
    assert rows == ['compile / eager', 'DMU p=0.5 / p=1', 'DTU r=0.5 / r=1', 'PSU lambda=0.2 both / off']
    rates = re.fullmatch(r'tiny, float32: eager ([\d,]+) tok/s.*; compiled ([\d,]+) tok/s.*', line).groups()
    assert rates == tuple(f'{32 / t:,.0f}' for t in times[0])


def test_timed_flushes_denormals_while_it_steps():
    """bench.timed steps with denormal floats flushed to zero (else a model whose numbers underflow would
    time slower for it), and restores torch's default after: float32 1e-40, a denormal, times 1 is 0
    while it steps and itself after."""
    if not torch.set_flush_denormal(False):
        pytest.skip('this CPU cannot flush denormals')

    class Probe:
        period, seen = 1, []

        def step(self):
            self.seen.append((torch.tensor(1e-40) * 1).item())
    bench.timed([Probe()], {'warmup': 1, 'steps': 2, 'device': 'cpu'})
    assert Probe.seen == [0.0, 0.0, 0.0]
    # float32 keeps ~5 digits of a denormal: its spacing 2^-149 = 1.4e-45 rounds 1e-40 by <= 7e-6 relative
    assert (torch.tensor(1e-40) * 1).item() == pytest.approx(1e-40, rel=1e-4, abs=0)


def test_bad_nanogpt_is_one_line_before_any_row(tmp_path, monkeypatch):
    """--nanogpt is '' (its row skipped) or a .py file that imports as nanoGPT's model.py: anything else is one
    line naming it, from main() before the first row (not a traceback, or 'skipped', minutes later)."""
    monkeypatch.setattr(bench, 'machine', lambda b: pytest.fail('the rows started before --nanogpt was checked'))
    (tmp_path / 'dir.py').mkdir()
    (tmp_path / 'model.txt').write_text('class GPT: pass\nclass GPTConfig: pass\n')
    (tmp_path / 'syntax.py').write_text('def (:\n')
    (tmp_path / 'fails.py').write_text('import no_such_module_here\n')
    (tmp_path / 'other.py').write_text('x = 1\n')
    for name, why in [('missing.py', "is not an existing .py file (nanoGPT's model.py; '' skips its row)"),
                      ('dir.py', 'is not an existing .py file'), ('model.txt', 'is not an existing .py file'),
                      ('syntax.py', 'failed to import (SyntaxError: '),
                      ('fails.py', "failed to import (ModuleNotFoundError: No module named 'no_such_module_here')"),
                      ('other.py', "has no GPT and GPTConfig: it is not nanoGPT's model.py")]:
        path = str(tmp_path / name)
        with pytest.raises(SystemExit) as e:
            bench.main([f'--nanogpt={path}', '--device=cpu'])
        assert e.value.code.startswith(f'error: nanogpt={path!r} {why}') and '\n' not in e.value.code, e.value.code
    (tmp_path / 'model.py').write_text('class GPT: pass\nclass GPTConfig: pass\n')
    assert bench.load_nanogpt(str(tmp_path / 'model.py')).GPT.__name__ == 'GPT'
    rows = []
    bench.nanogpt_row(None, bench.BENCH, None, 'tiny', None, rows)  # '' skips the row, as before
    assert rows == [('model step vs nanoGPT', None, None, 'skipped: no --nanogpt=PATH to its model.py', None)]


def test_nanogpt_that_fails_to_import_is_one_line_at_once(tmp_path):
    """The command line: python bench.py --nanogpt=BAD.py exits non-zero at once with one stderr line."""
    (tmp_path / 'model.py').write_text('def (:\n')
    r = subprocess.run([sys.executable, 'bench.py', f"--nanogpt={tmp_path / 'model.py'}", '--device=cpu'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr and r.stderr.count('\n') == 1, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: nanogpt={str(tmp_path / 'model.py')!r} failed to import (SyntaxError: ")
    assert not r.stdout  # no row, nor the machine line, ran
