"""bench.py end to end on the CPU at one timed step per setup: every row is printed with its
ratio. Its GPU-only rows (compile against eager, tokens/s and MFU, the units at GPT-2 size) run
here at a tiny size, with torch.compile stubbed out: compile itself is tested in test_train.py."""
import re

import torch

import bench


def test_bench_prints_every_row(capsys):
    bench.main(['--steps=1', '--warmup=0', '--metrics_words=2000', '--device=cpu', '--dtype=float32'])
    out = capsys.readouterr().out
    assert out.startswith('machine: ')
    ratios = re.findall(r'^(DMU|DTU|PSU|BAARA) .*\s(\d+\.\d{3})(?:  goal <= [\d.]+: (?:met|NOT met))?$', out, re.M)
    assert [name for name, _ in ratios] == ['DMU', 'DMU', 'DTU', 'PSU', 'BAARA']
    assert all(float(r) > 0 for _, r in ratios)
    assert re.search(r'^tokens/s, MFU +[\d,]+ tok/s', out, re.M)
    assert re.search(r'^text metrics on 0.002M words +[\d.]+ s for', out, re.M)


def test_gpu_rows_run_at_a_tiny_size(monkeypatch):
    monkeypatch.setattr(torch, 'compile', lambda model: model)
    b = {**bench.BENCH, 'device': 'cpu', 'dtype': 'float32', 'steps': 1, 'warmup': 0}
    rows = []

    def pair(what, a, bb, goal=None):
        (ta,), (tb,) = bench.timed([a, bb], b)
        rows.append(what.split(',')[0])
        return ta, tb

    size = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, dropout=0.0)
    line = bench.gpu_rows(b, pair, size=size, label='tiny', vocab=512)
    assert rows == ['compile / eager', 'DMU p=0.5 / p=1', 'DTU r=0.5 / r=1', 'PSU lambda=0.2 both / off']
    assert re.fullmatch(r'tiny, float32: eager [\d,]+ tok/s.*; compiled [\d,]+ tok/s.*', line)
