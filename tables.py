"""Tables and figures across run folders, from the report.json and log.jsonl each run leaves:

    python tables.py RUN_DIR...                  # Table 6.2 (ours / paper), other metrics, seeds
    python tables.py --fig3 RUN_DIR... [--out=fig3.png] [--bins=12]  # Fig. 3, loss-entropy density
    python tables.py --theorem55 RUN_DIR...     # Thm 5.5: exact KLs, mass on the empirical support
    python tables.py --map RUN_DIR... [--out=stability_map.png]  # Def. 3.1 stability vs quality
    python tables.py --readings RUN_DIR...      # PSU's readings x lambda, with the exact metrics
    python tables.py --trajectory RUN_DIR... [--out=trajectory.png]  # exact metrics over training
    python tables.py --corpus=FILE --text=FILE [--fraction=0.25]     # HF proportion of any text

A row is a setting at a seed: runs that differ in any setting but lambda (not in out_dir, device,
...) get rows of their own. The metrics themselves are metrics.py's; this file only reads and prints.
"""
import json
import math
import os
import sys

import numpy as np

from configurator import coerce, exit_if_help, validate
from data import count_words as word_counts, read_text

if __name__ == '__main__':  # before metrics.py imports torch, so that --help answers at once
    exit_if_help(sys.argv[1:], __doc__)

from metrics import high_frequency_proportion, high_frequency_set, words


# the table's columns: (name, metric, format; '%' = a percentage)
COLUMNS = [('hf', 'hf_proportion', '%'), ('H_pred', 'predictive_entropy', '.3f'), ('H_sample', 'sample_entropy', '.3f'),
           ('erank', 'effective_rank', '.1f'), ('modes', 'n_modes', ''), ('m(1-eps)', 'modes_for_mass', ''),
           ('top1', 'top1_mass', '%'), ('none', 'none_share', '%'), ('dist-2', 'distinct_2', '.3f'),
           ('rep-4', 'seq_rep_4', '.3f'), ('loops', 'loop_share', '%'), ('len', 'length_mean', '.2f'),
           ('eot', 'eot_mass', '.3f')]


def summary(m):
    """One line for the end of a run: the HF proportion (the corpus's too), the table's columns; and
    with distribution_metrics' keys a second: Theorem 5.5's estimates, each +- its standard error."""
    hf, corpus = fmt(m['hf_proportion'], '%'), fmt(m['corpus_hf_proportion'], '%')
    line = f"metrics: high-frequency words {hf} (corpus {corpus})" + ''.join(
        f" | {name} {fmt(m.get(k), spec)}" for name, k, spec in COLUMNS[1:])
    if 'forward_kl' not in m:  # not the synthetic corpus, or a window too short (then why)
        return line + (f"\ntheorem 5.5: not measured, {m['distribution_skipped']}" if 'distribution_skipped' in m else '')
    pm = lambda k, spec='.3f': f"{fmt(m[k], spec)}±{fmt(m[k + '_se'], spec)}"  # noqa: E731
    return (f"{line}\ntheorem 5.5: forward KL {pm('forward_kl')} | reverse KL {pm('reverse_kl')} | off-support "
            f"{pm('off_support', '%')} | entropy {pm('model_entropy')} (true {m['entropy_rate']:.3f}) | train share "
            f"{pm('train_share', '%')} (true mass {fmt(m['train_true_mass'], '%')}) | val gap {m['val_gap']:.3f}")


def fmt(v, spec):
    """A number for a table: '-' for None or NaN."""
    return '-' if v is None or math.isnan(v) else format(v, '.1%' if spec == '%' else spec)


PAPER_LAMBDAS = (0.0, 0.05, 0.2)  # PAPER: Table 6.2's high-frequency word proportion (%) at these
PAPER = {('gpt', 2025, '1B'): (27.5, 67.8, 100.0), ('gpt', 2026, '1B'): (26.7, 61.2, 100.0),
         ('gpt', 2027, '1B'): (26.3, 68.3, 100.0), ('bert', 2026, '1B'): (23.5, 56.3, 100.0),
         ('gpt', 2026, '2B'): (24.2, 58.2, 100.0), ('gpt', 2026, '3B'): (21.9, 56.1, 100.0)}
# the default of each ablation setting: a row label names the settings a run changed
ABLATION = {'psu_channels': 'both', 'dmu_p': 1.0, 'dtu_r': 1.0, 'baara': False}


def cross_seed(reports):
    """{metric: (mean, std: ddof=1, 0 for one)} of the numbers all metric dicts (seeds) have."""
    number = (int, float)
    keys = [k for k, v in reports[0].items() if isinstance(v, number) and not isinstance(v, bool)
            and all(isinstance(r.get(k), number) for r in reports)]
    arr = {k: np.array([r[k] for r in reports], dtype=np.float64) for k in keys}
    return {k: (float(a.mean()), float(a.std(ddof=1) if len(a) > 1 else 0)) for k, a in arr.items()}


# not settings: the seed (the cross-seed stats are over it), psu_lambda (the column), bookkeeping
NOT_SETTINGS = ('seed', 'psu_lambda', 'out_dir', 'init_from', 'overwrite', 'device', 'compile')
IN_LABEL = ('model', 'size', 'n_layer', 'n_embd', 'data')  # the settings every row label shows


def read_log(path):
    """The records of a run folder's log.jsonl ([] without one)."""
    log = os.path.join(path, 'log.jsonl')
    return [json.loads(line) for line in open(log) if line.strip()] if os.path.isfile(log) else []


def read_report(d):
    """A run folder's (config, metrics, Def. 3.1's verdict dict, last eval row of its log: val_loss and, for
    a GPT, val_bpb), else a one-line error."""
    path = os.path.join(d, 'report.json')
    try:
        report = json.load(open(path))
        c, m, stability = report['config'], report.get('metrics') or {}, report.get('stability', {})
    except (OSError, ValueError, KeyError) as e:
        why = f'{type(e).__name__}: {e}'
        raise SystemExit(f"error: {path!r} is not a finished run's report ({why})")
    evals = [r for r in read_log(d) if 'val_loss' in r] or [{}]
    return c, m, stability, evals[-1]


def collect_rows(run_dirs):
    """-> (paper: row -> {lambda: the paper's value}, runs: sorted (row, lambda, metrics, verdict,
    last eval row)). A row: (model, seed, size, data, key=value for every other setting that differs
    between the runs that have it, and for ABLATION's from its default): a setting at a seed."""
    reports = [read_report(d) for d in run_dirs]
    differ = [k for k in dict.fromkeys(k for c, *_ in reports for k in c) if k not in NOT_SETTINGS
              and len({repr(c[k]) for c, *_ in reports if k in c}) > 1]
    datas = {c.get('data', '?') for c, *_ in reports}  # by basename, if that tells them apart
    full = len({os.path.basename(x) or x for x in datas}) < len(datas)
    paper, runs = {}, []
    for c, m, stability, last_eval in reports:
        data, size = c.get('data', '?'), str(c.get('size', '?'))
        changed = [f"{k}={c[k]}" for k, v in ABLATION.items() if k in c and c[k] != v]
        changed += [f"{k}={c.get(k)}" for k in differ if k not in ABLATION and k not in IN_LABEL]
        row = (c.get('model', '?'), c.get('seed'), f"{size}({c.get('n_layer')}x{c.get('n_embd')})",
               data if full else os.path.basename(data) or data, ' '.join(changed))
        scale = next((s for s in ('2B', '3B') if s.lower() in size), '1B')  # the paper's row
        paper[row] = dict(zip(PAPER_LAMBDAS, PAPER.get((c.get('model'), c.get('seed'), scale), ())))
        runs.append((row, float(c.get('psu_lambda', 0.0)), m, stability.get('verdict', '-'), last_eval))
    rows = list(paper)  # by row, first seen first, then by lambda
    return paper, sorted(runs, key=lambda run: (rows.index(run[0]), run[1]))


def row_label(row):
    """A row's name: its parts."""
    return ' '.join(str(x) for x in row if x != '')


def print_row(name, cols, width, col_width=10):
    """A table line: the name in `width` characters, then each of cols in col_width."""
    print((name.ljust(width) + ''.join(str(s).ljust(col_width) for s in cols)).rstrip())


def print_table(paper, runs):
    """Table 6.2 (ours / paper), the other metrics with the stability verdict, cross-seed stats."""
    lams = sorted(set(PAPER_LAMBDAS) | {lam for _, lam, _, _, _ in runs})
    width = max(len(row_label(row)) for row in paper) + 2
    print("Table 6.2: high-frequency word proportion, ours / paper")
    print_row('row', [f'lambda={lam:g}' for lam in lams], width, 18)
    for row, values in paper.items():  # ours: the mean of the row's runs at each lambda
        ours = [[m['hf_proportion'] for r, x, m, _, _ in runs if (r, x) == (row, lam)
                 and m.get('hf_proportion') is not None] for lam in lams]
        hf = [fmt(np.mean(o) if o else None, '%') for o in ours]
        theirs = [fmt(values.get(lam, math.nan) / 100, '%') for lam in lams]
        print_row(row_label(row), [f'{a} / {b}' for a, b in zip(hf, theirs)], width, 18)
    corpus = sorted({fmt(m.get('corpus_hf_proportion'), '%') for _, _, m, _, _ in runs if m})
    print("paper: its 1B row, or 2B/3B for sizes gpt2-2b/gpt2-3b. "
          f"The corpus's own proportion: {', '.join(corpus) or '-'}")
    print("\nOther metrics and the stability verdict; "
          "last rows: the text metrics of each corpus cut like the samples")
    print_row('row', ['lambda'] + [name for name, _, _ in COLUMNS] + ['val_loss', 'val_bpb', 'verdict'], width)
    for row, lam, m, verdict, last_eval in runs:  # val_bpb: bits per byte of the validation text, across tokenizers
        cols = [fmt(m.get(k), spec) for _, k, spec in COLUMNS]
        losses = [fmt(last_eval.get('val_loss'), '.4f'), fmt(last_eval.get('val_bpb'), '.4f')]
        print_row(row_label(row), [f'{lam:g}'] + cols + losses + [verdict], width)
    refs = {row[3]: m['corpus'] for row, _, m, _, _ in runs if m.get('corpus')}  # by data: the last
    for data, ref in refs.items():
        print_row(f'corpus {data}', [''] + [fmt(ref.get(k), spec) for _, k, spec in COLUMNS], width)
    print_seeds(runs)


def print_seeds(runs):
    """Cross-seed mean ± std of the GPT rows that differ only in the seed."""
    seeds = {}  # (the row less model and seed, lambda) -> {seed: metrics}
    for row, lam, m, _, _ in runs:
        if row[0] == 'gpt':
            seeds.setdefault((row[2:], lam), {}).update({row[1]: m} if m else {})
    seeds = {group: s for group, s in seeds.items() if len(s) > 1}
    print("\nCross-seed mean ± std (GPT rows that differ only in the seed)"
          + ('' if seeds else ': none'))
    for (rest, lam), s in seeds.items():
        stats = cross_seed(list(s.values()))
        print(f"gpt {row_label(rest)} lambda={lam:g} seeds {sorted(s)}: " + ', '.join(
            f"{name} {stats[k][0]:.4g}±{stats[k][1]:.2g}" for name, k, _ in COLUMNS if k in stats))


def fig3(run_dirs, out='fig3.png', bins=12):
    """Fig. 3: density of the logged (loss, 'entropy' else 'psu_entropy'): a hexbin PNG, or a text
    table of counts without matplotlib."""
    pts = [(r['loss'], r.get('entropy', r.get('psu_entropy')))
           for d in run_dirs for r in read_log(d) if 'loss' in r]
    pts = np.array([p for p in pts if p[1] is not None], dtype=np.float64).reshape(-1, 2)
    if not len(pts):
        raise SystemExit("error: no logged step has both 'loss' and 'entropy' (or 'psu_entropy') "
                         f"in {', '.join(run_dirs)}")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        counts, le, he = np.histogram2d(pts[:, 0], pts[:, 1], bins=bins)
        print("fig. 3 (matplotlib not installed, text table): logged steps per (loss, entropy) "
              f"bin, {len(pts)} steps")
        print('entropy \\ loss ' + ''.join(f'{x:>7.3f}' for x in (le[:-1] + le[1:]) / 2))
        for y, row in reversed(list(zip((he[:-1] + he[1:]) / 2, counts.T))):
            print(f'{y:>15.3f}' + ''.join(f'{int(c):>7d}' if c else '      .' for c in row))
        return
    ax = Figure(figsize=(5, 4)).subplots()
    hexes = ax.hexbin(pts[:, 0], pts[:, 1], gridsize=2 * bins, bins='log', mincnt=1)
    ax.figure.colorbar(hexes, label='logged steps')
    ax.set(xlabel='training loss (nats)', ylabel='predictive entropy (nats)',
           title=f'loss-entropy, {len(pts)} steps')
    ax.figure.savefig(out, dpi=120, bbox_inches='tight')
    print(f"fig. 3: {len(pts)} logged steps of {len(run_dirs)} run(s) -> {out}")


# ----------------------------------------------------------------------------- Thm 5.5 and stability vs quality
# the Theorem 5.5 table's columns: (name, metric, format), after size, lambda, channel, steps, val_loss
THEOREM_COLUMNS = [('fwd_KL', 'forward_kl', '.3f'), ('rev_KL|S', 'reverse_kl', '.3f'),
                   ('off_supp', 'off_support', '%'), ('H_model', 'model_entropy', '.3f'),
                   ('train', 'train_share', '%'), ('true_mass', 'train_true_mass', '%'),
                   ('excess', 'excess', '%'), ('modes', 'n_modes', ''), ('hf', 'hf_proportion', '%')]
# the map: Def. 3.1's components (x) against the quality measures (y)
STABILITY = [('param_norm_growth', 'parameter-norm growth (cond. 1)'),
             ('grad_norm_slope', 'gradient-norm trend (cond. 2)'),
             ('update_norm_slope', 'update-norm trend (cond. 3)')]
QUALITY = [('forward_kl', 'forward KL (nats/token)'), ('off_support', 'off-support share'),
           ('excess', 'excess concentration')]


def theorem_rows(run_dirs):
    """One dict per run: its folder, the settings the table shows, its metrics with excess =
    train_share - train_true_mass (Thm 5.5's excess concentration on the empirical support), its
    Def. 3.1 verdict and components, the last val_loss. In 'other', the run's settings that differ
    from the value most of the runs share (a classical stabiliser, say)."""
    reports = [read_report(d) for d in run_dirs]
    shown = ('n_sentences', 'psu_lambda', 'psu_channels', 'max_iters', 'lr_decay_iters')
    values = {k: [repr(c[k]) for c, *_ in reports if k in c] for k in dict.fromkeys(k for c, *_ in reports for k in c)
              if k not in NOT_SETTINGS + shown}
    usual = {k: max(dict.fromkeys(v), key=v.count) for k, v in values.items()}  # ties: the first run's value
    rows = []
    for d, (c, m, stability, last_eval) in zip(run_dirs, reports):
        excess = m['train_share'] - m['train_true_mass'] if m.get('train_share') is not None else None
        lam = float(c.get('psu_lambda', 0.0))
        rows.append(dict(run=d, size=c.get('n_sentences'), lam=lam, steps=c.get('max_iters'),
                         channel=c.get('psu_channels') if lam > 0 else '-', val_loss=last_eval.get('val_loss'),
                         other=' '.join(f"{k}={c[k]}" for k in usual if k in c and repr(c[k]) != usual[k]),
                         metrics={**m, 'excess': excess}, stability=stability))
    return sorted(rows, key=lambda r: (r['size'] or 0, r['other'], r['steps'] or 0, r['lam'], r['channel']))


def print_theorem55(rows):
    """The Theorem 5.5 table: one line per run, the exact distribution metrics beside the proxies."""
    print("Theorem 5.5, measured: KLs in nats/token; train = generated sentences found verbatim in the "
          "training split, true_mass = the truth's mass on that set, excess = train - true_mass")
    head = ['size', 'lambda', 'channel', 'steps', 'val_loss'] + [name for name, _, _ in THEOREM_COLUMNS]
    print_row('', head + ['verdict', 'other'], 0, 11)
    for r in rows:
        m = r['metrics']
        cols = [fmt(m.get(k), spec) for _, k, spec in THEOREM_COLUMNS]
        print_row('', [r['size'], f"{r['lam']:g}", r['channel'], r['steps'], fmt(r['val_loss'], '.3f')] + cols
                  + [r['stability'].get('verdict', '-'), r['other']], 0, 11)


def stability_map(rows, out='stability_map.png'):
    """Stability vs quality: each run's Def. 3.1 components (x) against each quality measure (y),
    a 3 x 3 grid of scatter plots (PNG), or without matplotlib a text table with Spearman's rank
    correlation of each pair. Runs without the distribution metrics (not synthetic) are left out."""
    rows = [r for r in rows if r['metrics'].get('forward_kl') is not None and 'grad_norm_slope' in r['stability']]
    if len(rows) < 2:
        raise SystemExit("error: the map needs at least 2 finished synthetic runs with forward_kl in report.json")
    xs = {k: np.array([r['stability'][k] for r in rows], dtype=np.float64) for k, _ in STABILITY}
    ys = {k: np.array([r['metrics'][k] for r in rows], dtype=np.float64) for k, _ in QUALITY}
    stable = np.array([r['stability']['verdict'] == 'stable' for r in rows])
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"stability vs quality (matplotlib not installed, text): Spearman rank correlation over {len(rows)} runs")
        print_row('', [''] + [name for _, name in QUALITY], 0, 34)
        for kx, name in STABILITY:
            print_row('', [name] + [f'{spearman(xs[kx], ys[ky]):+.2f}' for ky, _ in QUALITY], 0, 34)
        return
    axes = Figure(figsize=(11, 9)).subplots(3, 3, sharex='col', sharey='row')
    for i, (ky, ylabel) in enumerate(QUALITY):
        for j, (kx, xlabel) in enumerate(STABILITY):
            ax = axes[i, j]
            for mask, style in ((stable, dict(marker='o', label='stable (Def. 3.1)')),
                                (~stable, dict(marker='x', label='not stable'))):
                ax.scatter(xs[kx][mask], ys[ky][mask], **style)
            ax.set_title(f'rank corr. {spearman(xs[kx], ys[ky]):+.2f}', fontsize=9)
            ax.set(xlabel=xlabel if i == 2 else None, ylabel=ylabel if j == 0 else None)
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].figure.suptitle(f'Def. 3.1 stability (x) vs generative quality (y), {len(rows)} runs')
    axes[0, 0].figure.savefig(out, dpi=110, bbox_inches='tight')
    print(f"stability map: {len(rows)} runs -> {out}")


def spearman(a, b):
    """Spearman's rank correlation, tied values given their mean rank (nan when either side is constant)."""
    ra, rb = mean_ranks(a), mean_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def mean_ranks(v):
    """Ranks 0..n-1 of v's values, each run of equal values given the mean of its ranks."""
    _, which, counts = np.unique(v, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - counts + (counts - 1) / 2)[which]


# -----------------------------------------------------------------------------
# the readings of the paper's feedback system side by side, and the exact metrics over training

READING_COLUMNS = [('hf', 'hf_proportion', '%'), ('fwd_KL', 'forward_kl', '.3f'),
                   ('off-supp', 'off_support', '%'), ('excess', 'excess', '%'),
                   ('H-H*', 'entropy_gap', '.3f'), ('tail_lost', 'tail_lost', '%')]


def decoder_name(c):
    """'t=1', 't=0.7', 'top-k 10', 't=0.7 top-k 10 top-p 0.9': the run's decoder, briefly."""
    parts = [f"t={c.get('temperature', 1.0):g}"] if c.get('temperature', 1.0) != 1.0 else []
    parts += [f"top-k {c['top_k']}"] if c.get('top_k') else []
    parts += [f"top-p {c['top_p']:g}"] if c.get('top_p', 1.0) < 1 else []
    return ' '.join(parts) or 't=1'


def reading_rows(run_dirs):
    """{(data, model, reading): {lambda: [(metrics, verdict), one per seed]}}: a reading is PSU's
    channel (data: with the decoder that writes the fed-back text); lambda 0 is no PSU, shown with
    the decoder of its end-of-run metrics."""
    table = {}
    for d in run_dirs:
        c, m, stability, _ = read_report(d)
        lam = float(c.get('psu_lambda', 0.0))
        reading = c.get('psu_channels', 'both') if lam > 0 else '-'
        if lam == 0 or 'data' in reading:
            reading += f" ({decoder_name(c)})"
        if m.get('model_entropy') is not None:
            m = {**m, 'entropy_gap': m['model_entropy'] - m['entropy_rate']}
        key = (os.path.basename(c.get('data', '?')) or c.get('data'), c.get('model', '?'), reading)
        table.setdefault(key, {}).setdefault(lam, []).append((m, stability.get('verdict', '-')))
    return table


def print_readings(table):
    """Every reading x lambda: the high-frequency share (ours / the paper's 1B model's, GPT-2's mean
    over its three seeds) and Theorem 5.5's exact quantities, each the mean +- std over seeds."""
    paper = {model: {lam: np.mean([v[i] for k, v in PAPER.items() if k[0] == model and k[2] == '1B'])
                     / 100 for i, lam in enumerate(PAPER_LAMBDAS)} for model in ('gpt', 'bert')}
    print("PSU's readings x lambda: mean +- std over the seeds (n); excess = train share - its true "
          "mass; H-H* = model entropy - true rate (nats/token); lambda > 0.2: beyond the paper")
    head = ['lambda', 'n', 'hf paper'] + [name for name, _, _ in READING_COLUMNS] + ['stable']
    width = max(len(' '.join(k)) for k in table) + 2
    print_row('data model reading', head, width, 14)
    for key in sorted(table):
        for lam in sorted(table[key]):
            runs = table[key][lam]
            cols = [f'{lam:g}', len(runs), fmt(paper.get(key[1], {}).get(lam), '%')]
            for _, k, spec in READING_COLUMNS:
                v = np.array([m[k] for m, _ in runs if m.get(k) is not None], dtype=np.float64)
                sd = f"+-{fmt(v.std(ddof=1), spec)}" if len(v) > 1 else ''
                cols.append(fmt(v.mean(), spec) + sd if len(v) else '-')
            cols.append(f"{sum(v == 'stable' for _, v in runs)}/{len(runs)}")
            print_row(' '.join(key), cols, width, 14)


def trajectory(run_dirs, out='trajectory.png'):
    """Theorem 5.5's exact metrics at every eval (log.jsonl) against the step: one panel per metric,
    one line per run (PNG); without matplotlib a text table per metric."""
    from metrics import EXACT
    runs = [(os.path.basename(os.path.normpath(d)), [r for r in read_log(d) if 'forward_kl' in r])
            for d in run_dirs]
    runs = [(name, rows) for name, rows in runs if rows]
    if not runs:
        raise SystemExit("error: no run among these logged exact metrics (a synthetic GPT run with "
                         "eval_dist_samples > 0)")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("exact metrics over training (matplotlib not installed, text):")
        for k in EXACT:
            print(f"{k}:")
            for name, rows in runs:
                print_row(name, [f"{r['iter']}:{fmt(r.get(k), '.3f')}" for r in rows], 40, 12)
        return
    axes = Figure(figsize=(13, 7), layout='constrained').subplots(2, 4).ravel()
    for ax, k in zip(axes, EXACT):
        for name, rows in runs:
            ax.plot([r['iter'] for r in rows], [r.get(k) for r in rows], label=name, marker='.')
        ax.set(title=k, xlabel='step')
    axes[-1].axis('off')
    axes[-1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc='center')
    axes[0].figure.suptitle("Theorem 5.5's exact metrics over training (eval_dist_samples "
                            "sentences at each eval)")
    axes[0].figure.savefig(out, dpi=110, bbox_inches='tight')
    print(f"trajectory: {len(runs)} runs -> {out}")


# the options that take a value, with configurator.py's rules (bins per axis: a histogram of bins^2 counts), and
# the mode each option is read in: an option given without its mode is refused, not silently ignored
OPTIONS, RULES = dict(fraction=0.25, bins=12), dict(fraction='(0, 1]', bins='[1, 1000]')
READ_WITH = dict(out=('fig3', 'map', 'trajectory'), bins=('fig3',), fraction=('corpus', 'text'))
MODES = ('fig3', 'theorem55', 'map', 'readings', 'trajectory')  # switches: --fig3, not --fig3=VALUE


def main(argv):
    """The CLI: the module docstring, which -h or --help prints; mistakes are one-line errors."""
    exit_if_help(argv, __doc__)
    flags = dict(a[2:].partition('=')[::2] for a in argv if a.startswith('--'))
    dirs, text = [a for a in argv if not a.startswith('--')], 'corpus' in flags or 'text' in flags
    if unknown := [k for k in flags if k not in (*OPTIONS, *READ_WITH, *MODES, 'corpus', 'text')]:
        raise SystemExit(f"error: unknown option --{unknown[0]} (--help: the options)")
    if valued := [k for k in MODES if flags.get(k)]:
        k = valued[0]
        raise SystemExit(f"error: --{k} takes no value, not {flags[k]!r}: python tables.py --{k} RUN_DIR...")
    if stray := [k for k, modes in READ_WITH.items() if k in flags and not any(m in flags for m in modes)]:
        raise SystemExit(f"error: --{stray[0]} is read only with {' or '.join('--' + m for m in READ_WITH[stray[0]])}")
    c = {k: coerce(k, flags[k], v) if k in flags else v for k, v in OPTIONS.items()}
    validate(c, RULES)
    fraction, bins = c['fraction'], c['bins']
    several = sum(k in flags for k in MODES) + text > 1  # one mode at a time, not the first of them silently
    if several or ((dirs or not flags.get('corpus') or not flags.get('text')) if text else not dirs):
        raise SystemExit("error: usage: python tables.py [--fig3 | --theorem55 | --map | --readings | "
                         "--trajectory] RUN_DIR... | "
                         "--corpus=FILE --text=FILE (--help: more)")
    if missing := [d for d in dirs if not os.path.isdir(d)]:
        why = 'is not a folder' if os.path.exists(missing[0]) else 'does not exist'
        raise SystemExit(f"error: run folder {missing[0]!r} {why}")
    if text:
        counts, ws = word_counts(read_text(flags['corpus'])), words(read_text(flags['text']))
        hf = high_frequency_set(counts, fraction)
        print(f"high-frequency word proportion: {high_frequency_proportion(ws, hf):.2%} of "
              f"{len(ws):,} words (corpus: {high_frequency_proportion(counts, hf):.2%}; "
              f"the {len(hf)} most frequent words, covering {fraction:g} of it)")
    elif 'fig3' in flags:
        fig3(dirs, flags.get('out') or 'fig3.png', bins)
    elif 'theorem55' in flags:
        print_theorem55(theorem_rows(dirs))
    elif 'map' in flags:
        stability_map(theorem_rows(dirs), flags.get('out') or 'stability_map.png')
    elif 'readings' in flags:
        print_readings(reading_rows(dirs))
    elif 'trajectory' in flags:
        trajectory(dirs, flags.get('out') or 'trajectory.png')
    else:
        print_table(*collect_rows(dirs))


if __name__ == '__main__':
    main(sys.argv[1:])
