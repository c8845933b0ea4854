"""--help answers at once: train.py, sample.py, bench.py, data.py and tables.py print their keys, defaults
and rules (tables.py its usage) without importing torch, which takes seconds."""
import os
import subprocess
import sys

import pytest

import bench
import data
import sample
import tables
import train
from configurator import describe
from conftest import ROOT

# runs SCRIPT as `python SCRIPT --help` does, then says on stderr whether torch was imported
WRAPPER = """import atexit, runpy, sys
atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr))
sys.argv = [{script!r}, '--help']
runpy.run_path({script!r}, run_name='__main__')
"""
SCRIPTS = {train: (train.DEFAULTS, train.VALID), sample: (sample.DEFAULTS, sample.VALID), bench: (bench.BENCH, bench.RULES),
           data: (data.PREPARE, data.PREPARE_RULES), tables: None}  # module -> its keys' (defaults, rules)


@pytest.mark.parametrize('module', list(SCRIPTS), ids=lambda m: m.__name__)
def test_help_lists_every_key_without_importing_torch(module):
    r = subprocess.run([sys.executable, '-c', WRAPPER.format(script=f'{module.__name__}.py')], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == 'torch imported: False\n', r.stderr[-2000:]
    assert r.stdout.startswith(module.__doc__.strip() + '\n')
    if SCRIPTS[module]:
        defaults, rules = SCRIPTS[module]
        lines = r.stdout.splitlines()
        for key, value in defaults.items():
            assert f'  --{key}={value!r}' + (f'  ({describe(rules[key], value)})' if key in rules else '') in lines, key



def test_data_help_shows_a_rule_for_every_key(capsys):
    """data.py's keys are checked by configurator.validate against PREPARE_RULES, one line per bad key
    (test_prepare.py), so each has a rule, and --help prints it: choices as such, not a Python tuple."""
    assert set(data.PREPARE_RULES) == set(data.PREPARE)
    with pytest.raises(SystemExit) as e:
        data.main(['--help'])
    keys = [line for line in capsys.readouterr().out.splitlines() if line.startswith('  --')]
    assert e.value.code == 0 and len(keys) == len(data.PREPARE) and all(line.endswith(')') for line in keys), keys
    assert "  --tokenizer='gpt2'  (gpt2 | gpt2-compact | char)" in keys


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='no FIFOs here')
def test_tables_refuses_what_it_would_ignore_in_one_line(tmp_path):
    """tables.py: a bad --fraction or --bins is a line naming that key and its range; a mode switch given a
    value, an option without the mode that reads it, two modes at once, or a path that exists but is not a
    folder (a run) or a regular file (--corpus) is refused, not silently run or called missing."""
    run, text = tmp_path / 'run', tmp_path / 'text.txt'
    run.mkdir()
    text.write_text('the cat\n')
    os.mkfifo(tmp_path / 'fifo')
    usage = ("error: usage: python tables.py [--fig3 | --theorem55 | --map | --readings | --trajectory] RUN_DIR... | "
             "--corpus=FILE --text=FILE (--help: more)")
    for argv, line in [
            (['--fraction=0', f'--corpus={text}', f'--text={text}'], 'error: fraction=0.0 is not a float in (0, 1]'),
            (['--fig3', '--bins=0', str(run)], 'error: bins=0 is not an int in [1, 1000]'),
            (['--fig3=banana', str(run)], "error: --fig3 takes no value, not 'banana': python tables.py --fig3 RUN_DIR..."),
            (['--out=x.png', str(run)], 'error: --out is read only with --fig3 or --map or --trajectory'),
            (['--out=x.png', f'--corpus={text}', f'--text={text}'], 'error: --out is read only with --fig3 or --map or --trajectory'),
            (['--bins=3', '--map', str(run)], 'error: --bins is read only with --fig3'),
            (['--fig3', '--map', str(run)], usage),
            ([str(text)], f"error: run folder {str(text)!r} is not a folder"),
            ([str(tmp_path / 'fifo')], f"error: run folder {str(tmp_path / 'fifo')!r} is not a folder"),
            ([f'--corpus={tmp_path}', f'--text={text}'], f"error: data file {str(tmp_path)!r} is not a regular file")]:
        with pytest.raises(SystemExit) as e:
            tables.main(argv)
        assert e.value.code == line, argv
    r = subprocess.run([sys.executable, 'tables.py', '--fig3=banana', str(run)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and 'Traceback' not in r.stderr and r.stderr.startswith('error: --fig3 ') \
        and r.stderr.count('\n') == 1, r.stderr
