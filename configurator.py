"""
nanoGPT's configurator, made strict: `python train.py [config/file.py] [--key=value ...]`.

A config file is Python that assigns some of the keys; --key=value pairs come after it and win.
Every key must already have a default, and every value must have the default's type (an int is
accepted where a float is expected). Every key also has a rule, its valid values, in a table
beside the defaults; validate() checks a whole config against it once it is merged (a resumed
run's included). Any mistake is a one-line error. --help prints the script's docstring and every
key with its default and its rule, e.g. `--batch_size=32  (int >= 1)`.

A rule is a short string:
    '>= 1', '> 0'           a number compared with a bound
    '[0, 1)', '(0, 1]'      a number in an interval ('[' and ']' include the bound)
    'gpt | bert'            one of these strings; 'PATH' stands for any non-empty string and
                            'cuda:N' for cuda:0, cuda:1, ...
    'any'                   any value of the default's type (a bool, a seed)
DEVICE is the rule of a device key; validate() also checks that the device is on this machine, and
auto_device() turns 'auto' into cuda or cpu (auto_dtype: bfloat16 or float32). A script that imports torch calls exit_if_help() before
it does, so that --help answers at once.
"""
import ast
import math
import os
import sys

DEVICE = 'auto | cpu | cuda | cuda:N | mps'


def parse_flags(defaults, argv, rules=None):
    """defaults: dict of key -> default value; rules: key -> rule, shown by --help (the caller
    validates, after merging a resumed config). Returns (config dict, the keys set)."""
    exit_if_help(argv, sys.modules['__main__'].__doc__, defaults, rules)
    config, given = dict(defaults), {}
    for arg in argv:
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


def exit_if_help(argv, doc, defaults=None, rules=None):
    """-h or --help in argv: print the docstring `doc`, then each key with its default and its rule, and exit."""
    if '-h' not in argv and '--help' not in argv:
        return
    print((doc or '').strip() + ('\n\nkeys, defaults and valid values:' if defaults else ''))
    if defaults:
        print('\n'.join(f'  --{key}={value!r}' + (f'  ({describe(rules[key], value)})' if key in (rules or {}) else '')
                        for key, value in defaults.items()))
    raise SystemExit(0)


def auto_device(device):
    """'auto' -> 'cuda' where torch sees a GPU, else 'cpu'; any other device as it is."""
    import torch  # here, not at the top: --help needs no torch
    return ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device


def auto_dtype(dtype):
    """'auto' -> bfloat16 on a GPU that computes in it (compute capability 8.0 on: A100, H100, H200; ROCm),
    else float32; any other dtype as it is. T4 and V100 only emulate bf16, slower than float32, and
    torch.cuda.is_bf16_supported() says True there unless asked without emulation."""
    import torch
    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return ('bfloat16' if native else 'float32') if dtype == 'auto' else dtype


def validate(config, rules):
    """One-line SystemExit for the first value outside its rule (keys without a rule pass)."""
    for key, rule in rules.items():
        value = config[key]
        if not satisfies(value, rule):
            want = f'one of {rule}' if '|' in rule else ('an ' if describe(rule, value)[0] in 'aeiou' else 'a ') + describe(rule, value)
            raise SystemExit(f"error: {key}={value!r} is not {want}")
        if rule == DEVICE and device_missing(value):
            raise SystemExit(f"error: {key}={value!r} is not on this machine ({device_missing(value)}); use --{key}=cpu")


def describe(rule, default):
    """The rule as --help prints it: 'int >= 1', 'float in [0, 1)', 'gpt | bert', 'bool'."""
    kind = type(default).__name__
    if rule == 'any':
        return kind
    if rule == 'PATH':
        return 'non-empty path'
    if '|' in rule:
        return rule
    return f'{kind} in {rule}' if rule[0] in '[(' else f'{kind} {rule}'


def satisfies(value, rule):
    if rule == 'any':
        return True
    if rule == 'PATH' or '|' in rule:
        return any(value == choice or (choice == 'PATH' and value != '') or
                   (choice.endswith(':N') and value.startswith(choice[:-1]) and value[len(choice) - 1:].isdigit())
                   for choice in rule.split(' | '))
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if rule[0] in '[(':  # an interval
        low, high = (float(b) for b in rule[1:-1].split(','))
        return (low < value if rule[0] == '(' else low <= value) and (value < high if rule[-1] == ')' else value <= high)
    op, bound = rule.split()
    return value > float(bound) if op == '>' else value >= float(bound)


def device_missing(device):
    """Why `device` is not usable on this machine, or '' when it is."""
    import torch  # here, not at the top: --help needs no torch
    if device.startswith('cuda'):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(device[5:] or 0) >= count:
            return f'torch sees {count} CUDA GPU(s)'
    if device == 'mps' and not torch.backends.mps.is_available():
        return 'torch.backends.mps.is_available() is False'
    return ''


def read_config_file(path, defaults):
    if not os.path.isfile(path):
        raise SystemExit(f"error: config file {path!r} {'is not a regular file' if os.path.exists(path) else 'does not exist'}")
    scope = {}
    try:
        exec(open(path).read(), {}, scope)
    except Exception as e:
        raise SystemExit(f"error: config file {path!r} failed: {type(e).__name__}: {e}")
    helper = lambda v: callable(v) or type(v).__name__ == 'module'  # a config file's own functions and imports
    values = {k: v for k, v in scope.items() if not k.startswith('_') and (k in defaults or not helper(v))}
    if not values:
        key, value = next(iter(defaults.items()))
        raise SystemExit(f"error: config file {path!r} sets no keys (a config file assigns some, e.g. {key} = {value!r})")
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


# -----------------------------------------------------------------------------
# train.py's config: its checks across keys

# keys that fix the model's shape, data or vocabulary: a resumed run may only repeat the checkpoint's
SHAPE_KEYS = ('model', 'size', 'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'data', 'tokenizer',
              'n_sentences', 'synthetic_modes', 'synthetic_zipf', 'synthetic_class_scale')


def train_config(argv, defaults, rules, sizes, resumed_config):
    """train.py's config: defaults <- (the resumed run's config) <- config file <- --key=value,
    validated once merged (the rules, then the checks across keys). A named size sets
    n_layer/n_head/n_embd unless they are given too. Nothing is written anywhere until this has
    passed. resumed_config: checkpoint.resumed_config (the checkpoint's config under the given keys)."""
    config, given = parse_flags(defaults, argv, rules)
    validate(config, rules)  # what was given: out_dir and init_from are read below
    if config['init_from'] == 'resume':
        config = resumed_config(config, given, defaults, SHAPE_KEYS)
        validate(config, rules)  # and what the checkpoint brought (its device, say)
    config['device'], config['dtype'] = auto_device(config['device']), auto_dtype(config['dtype'])
    if 'size' in given and config['init_from'] != 'resume':
        for key, value in zip(('n_layer', 'n_head', 'n_embd'), sizes[config['size']]):
            config[key] = config[key] if key in given else value
        if config['size'].startswith('bert'):  # a BERT size is a bidirectional masked LM
            if 'model' in given and config['model'] != 'bert':
                raise SystemExit(f"error: size={config['size']} is a BERT size; use --model=bert or a "
                                 f"gpt2 size")
            config['model'] = 'bert'
    if config['init_from'] not in ('scratch', 'resume'):  # GPT-2's weights: a causal GPT of their shape
        if config['model'] == 'bert':
            raise SystemExit(f"error: model=bert cannot start from GPT-2 weights "
                             f"(init_from={config['init_from']!r}); use --model=gpt")
        set_by_size = {'n_layer', 'n_head', 'n_embd'} if 'size' in given else set()
        for key in {'n_layer', 'n_head', 'n_embd', 'bias'} - given - set_by_size:
            config[key] = None  # the weights' (checkpoint.load_gpt2); a value given must be theirs
    check_across_keys(config, given)
    return config


def check_across_keys(config, given):
    if config['min_lr'] > config['learning_rate']:
        default = '' if 'min_lr' in given else ' (its default)'
        raise SystemExit(f"error: min_lr={config['min_lr']}{default} is above learning_rate="
                         f"{config['learning_rate']} (the cosine decays from learning_rate to min_lr); "
                         f"set --min_lr, e.g. to a tenth of learning_rate")
    if 'data' in config['psu_channels'] and config['fsdp']:
        raise SystemExit(f"error: psu_channels={config['psu_channels']!r} feeds back the model's own "
                         f"text, which a sharded model does not write; use --fsdp=False")
    if config['n_embd'] and config['n_head'] and config['n_embd'] % config['n_head']:  # None: GPT-2's
        raise SystemExit(f"error: n_embd={config['n_embd']} is not a multiple of n_head="
                         f"{config['n_head']} (each head gets n_embd // n_head dimensions)")
