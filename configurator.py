"""
nanoGPT's configurator, made strict: `python train.py [config/file.py] [--key=value ...]`.

A config file is Python that assigns some of the keys; --key=value pairs come after it and win.
Every key must already have a default, and every value must have the default's type (an int is
accepted where a float is expected). Any mistake is a one-line error that names the valid keys.
--help prints the script's docstring and every key with its default (and its valid values).
"""
import ast
import os
import sys


def parse_flags(defaults, argv, choices={}):
    """defaults: dict of key -> default value; choices: key -> valid values, shown by --help (the
    caller checks them, after merging a resumed config). Returns (config dict, the keys set)."""
    config, given = dict(defaults), {}
    for arg in argv:
        if arg in ('-h', '--help'):
            print((sys.modules['__main__'].__doc__ or '').strip() + '\n\nkeys and defaults:')
            print('\n'.join(f'  --{key}={value!r}' + (f"  ({' | '.join(choices[key])})" if key in choices else '')
                            for key, value in defaults.items()))
            raise SystemExit(0)
        if not arg.startswith('--'):
            given.update(read_config_file(arg, defaults))
            continue
        if '=' not in arg:
            raise SystemExit(f"error: {arg!r} is not --key=value")
        key, value = arg[2:].split('=', 1)
        check_key(key, defaults)
        given[key] = coerce(key, value, defaults[key])
    config.update(given)
    return config, set(given)


def read_config_file(path, defaults):
    if not os.path.isfile(path):
        raise SystemExit(f"error: config file {path!r} does not exist")
    scope = {}
    try:
        exec(open(path).read(), {}, scope)
    except Exception as e:
        raise SystemExit(f"error: config file {path!r} failed: {type(e).__name__}: {e}")
    values = {k: v for k, v in scope.items() if not k.startswith('_') and not callable(v)
              and type(v).__name__ != 'module'}
    for key, value in values.items():
        check_key(key, defaults, where=f" in {path}")
        check_type(key, value, defaults[key])
    return values


def check_key(key, defaults, where=''):
    if key not in defaults:
        raise SystemExit(f"error: unknown key {key!r}{where}; valid keys: {', '.join(sorted(defaults))}")


def coerce(key, text, default):
    """'--lr=3e-4' -> 3e-4; strings need no quotes; booleans are True/False."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string such as --device=cpu
    return check_type(key, value, default)


def check_type(key, value, default):
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise SystemExit(f"error: {key} must be {type(default).__name__} (like {default!r}), got {value!r}")
    return value
