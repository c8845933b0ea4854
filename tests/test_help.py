"""--help answers at once: train.py, sample.py, bench.py, data.py and tables.py print their keys, defaults
and rules (tables.py its usage) without importing torch, which takes seconds."""
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
           data: (data.PREPARE, data.PREPARE_CHOICES), tables: None}  # module -> its keys' (defaults, rules)


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

