"""dynamixer ablate: a two-variant grid on a tiny ImageFolder, tables and plot, reuse of finished runs, errors."""
import csv
import json
import math

import numpy as np
import pytest
import timm
import yaml
from PIL import Image

import dynamixer  # noqa: F401
from dynamixer import ablate
from dynamixer.cli import main

BASE = dict(patch_size=8, embed_dims=16, depths=[1], stage_strides=[1], num_segments=2, reduced_dims=2)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """Two classes of 32x32 images that differ in colour; train/ and val/."""
    root = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    for split, n in (('train', 8), ('val', 4)):
        for c, colour in (('red', (200, 30, 30)), ('blue', (30, 30, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f'{i}.png')
    return root


def grid(folder, **extra):
    return dict(dict(model='dynamixer_cifar_t', base=dict(BASE), seeds=[0],
                     train=dict(data=str(folder), epochs=1, batch_size=4, workers=0),
                     variants={'static': {'generation': 'static'}}), **extra)


def test_grid_runs_tabulates_and_reuses(folder, tmp_path, monkeypatch):
    out = tmp_path / 'abl'
    lines = []
    result = ablate.run_grid(grid(folder), str(out), log=lines.append)
    assert result['failed'] == 0, (out / 'runs' / 'base' / 'seed0' / 'train.log').read_text()[-2000:]
    assert sum('trained' in line for line in lines) == 2  # one progress line per run

    for name in ('results.md', 'results.csv', 'runs.csv', 'accuracy.png'):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / 'accuracy.png').read_bytes()[:4] == b'\x89PNG'
    rows = list(csv.DictReader(open(out / 'results.csv')))
    assert [r['variant'] for r in rows] == ['base', 'static']
    for row, kwargs in zip(rows, (BASE, dict(BASE, generation='static'))):
        model = timm.create_model('dynamixer_cifar_t', **kwargs, num_classes=2)  # counted as trained: 2 classes
        assert int(row['params']) == sum(p.numel() for p in model.parameters())
        assert 0 <= float(row['best_top1_mean']) <= 100 and int(row['runs']) == 1
    assert int(rows[0]['params']) != int(rows[1]['params'])
    table = (out / 'results.md').read_text()
    assert '| base |' in table and '| static | generation=static |' in table
    run_dir = out / 'runs' / 'static' / 'seed0'
    assert ablate.is_finished(run_dir, 1)
    model = timm.create_model(f'local-dir:{run_dir / "model"}', pretrained=True)  # an ordinary run
    assert model.stages[0].blocks[0].token_mixer.row_mix.generation == 'static'

    # again: nothing is retrained and the runs' files are untouched
    stamps = {p: p.stat().st_mtime_ns for p in (out / 'runs').rglob('*') if p.is_file()}

    def no_training(*args, **kwargs):
        raise AssertionError('a finished run was trained again')

    monkeypatch.setattr(ablate, '_train', no_training)
    lines.clear()
    again = ablate.run_grid(grid(folder), str(out), log=lines.append)
    assert [r['status'] for r in again['runs']] == ['reused', 'reused']
    assert sum('reused' in line for line in lines) == 2
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / 'runs').rglob('*') if p.is_file()}
    assert list(csv.DictReader(open(out / 'results.csv'))) == rows

    # a different grid in the same folder is refused rather than mixed in
    other = grid(folder)
    other['train']['epochs'] = 2
    with pytest.raises(ValueError, match='other settings'):
        ablate.run_grid(other, str(out), log=lines.append)


def test_expand_grid_axes_aliases_and_seeds():
    _, _, variants = ablate.expand_grid(dict(
        model='dynamixer_cifar_t', base=dict(BASE), seeds=[0],
        axes={'S': [1, 2], 'generation': ['dynamic', 'dense'], 'share_row_col': [False, True]},
        variants={'base': {'seeds': [0, 1]}, 'dense_too': {'generation': 'dense', 'seeds': [2]},
                  'plain': {'fast_path': False, 'seeds': []}}))
    names = [v['name'] for v in variants]
    # S=2 and generation=dynamic and share_row_col=off are the base itself; dense_too is generation=dense
    assert names == ['base', 'S=1', 'generation=dense', 'share_row_col=on', 'plain']
    seeds = {v['name']: v['seeds'] for v in variants}
    assert seeds['base'] == [0, 1] and seeds['generation=dense'] == [0, 2] and seeds['S=1'] == [0]
    assert seeds['plain'] == []  # speed only: measured, never trained
    assert variants[1]['kwargs'] == dict(BASE, num_segments=1)


def _cli(tmp_path, capsys, *args):
    code = main(['ablate', '--output', str(tmp_path / 'out'), *args])
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_grids_give_one_line(folder, tmp_path, capsys):
    code, err = _cli(tmp_path, capsys, '--grid', str(tmp_path / 'missing.yaml'))
    assert code == 2 and 'missing.yaml does not exist' in err and len(err.splitlines()) == 1

    path = tmp_path / 'grid.yaml'
    bad = grid(folder)
    bad['variants'] = {'oops': {'segmentz': 4}}
    path.write_text(yaml.safe_dump(bad))
    code, err = _cli(tmp_path, capsys, '--grid', str(path))
    assert code == 2 and "unknown knob 'segmentz' in variant 'oops'" in err and len(err.splitlines()) == 1

    path.write_text(yaml.safe_dump(dict(grid(folder), axes={'d': 3})))
    code, err = _cli(tmp_path, capsys, '--grid', str(path))
    assert code == 2 and "axis 'd' must list" in err

    path.write_text(yaml.safe_dump(dict(grid(folder), model='dynamixer_cifar_x')))
    code, err = _cli(tmp_path, capsys, '--grid', str(path))
    assert code == 2 and 'unknown model' in err

    path.write_text(yaml.safe_dump(dict(grid(folder), variants={'odd': {'num_segments': 3}})))
    code, err = _cli(tmp_path, capsys, '--grid', str(path))
    assert code == 2 and "variant 'odd' does not build" in err and len(err.splitlines()) == 1

    for claims, message in (([{'claim': 'x', 'better': 'base', 'worse': 'statik'}], "names 'statik', not a variant"),
                            ([{'claim': 'x', 'better': 'base'}], 'needs claim: (its text) and one of better/worse'),
                            ([{'claim': 'x', 'slower': 'base', 'than': 'static', 'by': [20, 25]}], 'fractions'),
                            ({'claim': 'x'}, 'claims must be a list')):
        path.write_text(yaml.safe_dump(dict(grid(folder), claims=claims)))
        code, err = _cli(tmp_path, capsys, '--grid', str(path))
        assert code == 2 and message in err and len(err.splitlines()) == 1, err

    path.write_text('model: [unclosed')
    code, err = _cli(tmp_path, capsys, '--grid', str(path))
    assert code == 2 and 'not valid YAML' in err
    assert not (tmp_path / 'out' / 'runs').exists()


def test_flags_make_a_grid(folder, tmp_path, capsys):
    code = main(['ablate', '--output', str(tmp_path / 'out'), '--model', 'dynamixer_cifar_t', '--data', str(folder),
                 '--epochs', '1', '--base', *[f'{k}={json.dumps(v)}' for k, v in BASE.items()],
                 '--vary', 'd=1,2', '--variant', 'sum:fusion=sum', '--seeds', '0', '1', '--dry-run'])
    out = capsys.readouterr().out
    assert code == 0
    assert '3 variants, 6 runs of 1 epochs' in out
    assert out.count('dynamixer.cli train') == 6 and 'runs/d=1/seed1' in out and 'runs/sum/seed0' in out
    order = [line.split('/runs/')[1].split()[0] for line in out.splitlines() if 'dynamixer.cli train' in line]
    assert order == ['base/seed0', 'd=1/seed0', 'sum/seed0', 'base/seed1', 'd=1/seed1', 'sum/seed1']
    assert not (tmp_path / 'out').exists()


PEER = dict(model='mixer_s16_224', img_size=32, patch_size=8, embed_dim=16, num_blocks=1)


def test_time_budget_runs_and_a_timm_peer(folder, tmp_path, monkeypatch):
    """Every run gets the same minutes and plans its own epochs; a peer is any timm model from its own arguments;
    the finished runs are known by the epochs they planned, and reused."""
    out = tmp_path / 'abl'
    spec = dict(model='dynamixer_cifar_t', base=dict(BASE), seeds=[0],
                train=dict(data=str(folder), time_budget=0.1, epochs=1000, batch_size=4, workers=0),
                variants={'mixer': dict(PEER)})
    lines = []
    result = ablate.run_grid(spec, str(out), log=lines.append)
    assert result['failed'] == 0, (out / 'runs' / 'mixer' / 'seed0' / 'train.log').read_text()[-2000:]
    assert 'runs of 6 minutes' not in lines[0] and 'runs of 0.1 minutes' in lines[0]
    for name in ('base', 'mixer'):
        run_dir = out / 'runs' / name / 'seed0'
        planned = ablate.planned_epochs(run_dir)
        rows = ablate.read_metrics(run_dir)
        assert 1 <= planned < 1000 and len(rows) == planned  # the plan, carried out
        assert rows[-1]['wall_min'] <= 0.1 * 1.5
        assert ablate.is_finished(run_dir) and not ablate.is_finished(run_dir, planned + 1)
    config = json.loads((out / 'runs' / 'mixer' / 'seed0' / 'model' / 'config.json').read_text())
    assert config['architecture'] == 'mixer_s16_224'
    rows = {r['variant']: r for r in csv.DictReader(open(out / 'results.csv'))}
    from dynamixer.catalog import create_any_model
    peer = create_any_model('mixer_s16_224', **{k: v for k, v in PEER.items() if k != 'model'}, num_classes=2)
    assert int(rows['mixer']['params']) == sum(p.numel() for p in peer.parameters())  # as trained: 2 classes
    base = timm.create_model('dynamixer_cifar_t', **BASE, num_classes=2)
    assert int(rows['base']['params']) == sum(p.numel() for p in base.parameters())
    mixer_line = next(line for line in (out / 'results.md').read_text().splitlines() if line.startswith('| mixer |'))
    assert 'model=mixer_s16_224' in mixer_line and 'num_blocks=1' in mixer_line

    monkeypatch.setattr(ablate, '_train', lambda *a, **k: pytest.fail('a finished run was trained again'))
    again = ablate.run_grid(spec, str(out), log=lines.append)
    assert [r['status'] for r in again['runs']] == ['reused', 'reused']


def test_no_train_tabulates_what_is_finished_and_throughput_is_side_by_side(folder, tmp_path, monkeypatch):
    out = tmp_path / 'abl'
    assert ablate.run_grid(grid(folder, variants={}), str(out), log=lambda *_: None)['failed'] == 0
    monkeypatch.setattr(ablate, '_train', lambda *a, **k: pytest.fail('--no-train trained'))
    lines = []
    claims = [dict(claim='re-weighting beats a sum', better='base', worse='sum'),
              dict(claim='the mixer trains slower', slower='mixer', than='base', by=[0.0, 0.99])]
    speed_only = {'plain': {'fast_path': False, 'seeds': []}, 'plain_mixer': dict(PEER, seeds=[])}
    result = ablate.run_grid(grid(folder, variants={'sum': {'fusion': 'sum'}, 'mixer': dict(PEER), **speed_only},
                                  claims=claims),
                             str(out), train_missing=False, throughput=dict(batch_size=4, warmup=1, iters=2),
                             log=lines.append)
    assert [r['status'] for r in result['runs']] == ['reused', 'missing', 'missing']  # nothing for speed-only
    assert not (out / 'runs' / 'sum' / 'seed0' / 'metrics.jsonl').exists()
    table = {row['variant']: row for row in result['table']}
    assert table['base']['runs'] == 1 and table['sum']['runs'] == 0 and table['plain']['runs'] == 0
    for row in table.values():  # measured for every variant, trained or not
        assert row['train_img_per_sec_controlled'] > 0 and row['inference_img_per_sec_controlled'] > 0
    text = (out / 'results.md').read_text()
    assert 'controlled train img/s' in text and '| 1.00x |' in text
    assert '| sum | fusion=sum | — |' in text and 'n/a' in text
    # the claims close the results: the sum has no run yet; the throughput claim is judged on the controlled speeds
    assert [v['verdict'] for v in result['claims']][0] == 'pending' and '## Claims' in text
    assert result['claims'][1]['verdict'] in ('holds', 'reversed', 'not seen') and '| re-weighting beats a sum |' in text
    assert [r['variant'] for r in csv.DictReader(open(out / 'runs.csv'))] == ['base']
    # tabulating again keeps the measurement, except for a variant changed since
    changed = {'sum': {'fusion': 'sum', 'reduced_dims': 1}, 'mixer': dict(PEER), **speed_only}
    again = ablate.run_grid(grid(folder, variants=changed), str(out), train_missing=False, log=lines.append)
    kept = {row['variant']: row for row in again['table']}
    for name in ('base', 'mixer', 'plain'):
        assert kept[name]['train_img_per_sec_controlled'] == table[name]['train_img_per_sec_controlled']
    assert math.isnan(kept['sum']['train_img_per_sec_controlled'])
    assert any(line.startswith('throughput: the measurement of') for line in lines)
    assert 'controlled train img/s' in (out / 'results.md').read_text()


def test_every_run_needs_the_same_budget(folder, tmp_path):
    no_budget = grid(folder)
    del no_budget['train']['epochs']
    with pytest.raises(ValueError, match='epochs .* or time_budget'):
        ablate.run_grid(no_budget, str(tmp_path / 'a'), log=lambda *_: None)
    assert ablate.run_budget(dict(recipe='cifar')) == (None, 60.)  # the recipe's own hour
    assert ablate.run_budget(dict(recipe='cifar', time_budget=15)) == (None, 15.)
    assert ablate.run_budget(dict(epochs=3)) == (3, None)
    with pytest.raises(ValueError, match="recipe 'cifr'"):
        ablate.run_budget(dict(recipe='cifr'))
    bad_peer = grid(folder, variants={'mixer': dict(PEER, embed_dimz=3)})
    with pytest.raises(ValueError, match="variant 'mixer' does not build"):
        ablate.expand_grid(bad_peer)


def test_tables_show_the_runs_tta_and_keep_their_columns(tmp_path):
    """Runs that measured a last-epoch TTA get their own column (mean, min-max over seeds); without any, no
    column; every row of the Markdown table has as many cells as its header."""
    _, base, variants = ablate.expand_grid(dict(model='dynamixer_cifar_t', base=dict(BASE), seeds=[0, 1],
                                                variants={'static': {'generation': 'static'}}))
    run = dict(status='trained', best_top1=60., final_top5=99., final_val_loss=1., img_per_sec=10., epochs=3)
    results = [dict(run, variant='base', seed=0, final_top1=50., final_top1_tta=52.),
               dict(run, variant='base', seed=1, final_top1=54., final_top1_tta=58.),
               dict(run, variant='static', seed=0, final_top1=40., final_top1_tta=None)]
    for with_tta in (True, False):
        rows = results if with_tta else [dict(r, final_top1_tta=None) for r in results]
        table = ablate.summarise(variants, rows, num_classes=10)
        ablate.write_results(tmp_path, 'dynamixer_cifar_t', base, {}, table, rows)
        lines = [line for line in (tmp_path / 'results.md').read_text().splitlines() if line.startswith('|')]
        assert len({line.count('|') for line in lines}) == 1 and len(lines) == 4  # header, rule, two variants
        assert ('final val top-1 with TTA' in lines[0]) == with_tta
        if with_tta:
            assert '| 55.00 ± 4.24 (52.00–58.00) |' in lines[2]  # base: 52 and 58
            assert lines[3].count('n/a') == 1  # static measured no TTA
        assert '| 52.00 ± 2.83 (50.00–54.00) |' in lines[2]


def test_claims_are_judged_against_the_noise_floor_of_the_runs(tmp_path):
    """Mean final top-1 differences against two standard errors (binomial on the held-out images plus the pooled
    seed variance); 'loses little' claims fail only on a clear loss; slowdowns from the controlled throughput."""
    def row(name, runs, mean, std, speed=float('nan')):
        return dict(variant=name, runs=runs, final_top1_mean=mean, final_top1_std=std, val_images=5000,
                    train_img_per_sec_controlled=speed)
    table = [row('base', 2, 80., 0.5, 100.), row('static', 2, 77., 0.3, 120.), row('d=1', 1, 79., 0.),
             row('vip', 2, 79.5, 0.4, 80.), row('mixer', 0, float('nan'), float('nan'), 50.)]
    # pooled over the variants with two runs (one dof each): the median sample variance over the median of chi2(1)
    seed_var = 0.4 ** 2 / 0.454936
    assert ablate.run_noise(table) == (pytest.approx(seed_var, rel=1e-4), 5000)
    erratic = row('S=8,16', 2, 63., 6.)  # seeds 4 and 2 epochs apart: must not set every floor
    assert ablate.run_noise(table + [erratic])[0] == pytest.approx((0.4 ** 2 + 0.5 ** 2) / 2 / 0.454936, rel=1e-4)
    floor = 2 * ((0.8 * 0.2 / 5000 * 1e4 + seed_var) / 2 + (0.77 * 0.23 / 5000 * 1e4 + seed_var) / 2) ** 0.5
    claims = [dict(claim='dynamic beats static', better='base', worse='static'),
              dict(claim='static beats dynamic', better='static', worse='base'),
              dict(claim='base beats d=1', better='base', worse='d=1'),
              dict(claim='vip loses little', loses_little='vip', against='base'),
              dict(claim='static loses little', loses_little='static', against='base'),
              dict(claim='mixer beats base', better='mixer', worse='base'),
              dict(claim='vip 14-25% slower', slower='vip', than='base', by=[0.14, 0.25]),
              dict(claim='static slower', slower='static', than='base', by=[0.14, 0.25]),
              dict(claim='mixer 14-25% slower', slower='mixer', than='base', by=[0.14, 0.25]),
              dict(claim='d=1 slower', slower='d=1', than='base', by=[0.1, 0.2])]
    verdicts = ablate.judge_claims(claims, table)
    assert verdicts[0]['delta'] == pytest.approx(3.) and verdicts[0]['floor'] == pytest.approx(floor, rel=1e-4)
    assert floor < 3. and [v['verdict'] for v in verdicts] == [
        'holds', 'reversed', 'not seen', 'holds', 'reversed', 'pending', 'holds', 'reversed', 'not seen', 'pending']
    assert verdicts[6]['delta'] == pytest.approx(0.2)
    lines = ablate.claims_section(verdicts, table)
    rows = [line for line in lines if line.startswith('| ')]
    assert len(rows) == 1 + len(claims) and '| +3.00 |' in rows[1] and f'| {floor:.2f} | holds |' in rows[1]
    assert '20.0% slower' in rows[7] and '20.0% faster' in rows[8] and ablate.claims_section([], table) == []


def test_plot_adds_a_controlled_speed_panel_and_log_scales_a_wide_axis(tmp_path, monkeypatch):
    """Peers that cost 3x the GMACs go on a log axis; the speed panel appears only once speed was measured."""
    import matplotlib.figure
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', lambda fig, *a, **k: figures.append(fig))

    def row(name, params, gmacs, speed, top1):
        return dict(variant=name, runs=2, params=params, gmacs=gmacs, train_img_per_sec_controlled=speed,
                    final_top1_mean=top1, final_top1_min=top1 - 0.2, final_top1_max=top1 + 0.2)
    table = [row('base', 2.0e6, 0.044, 600., 77.), row('mixer', 1.96e6, 0.133, 310., 61.)]
    ablate.plot(tmp_path / 'a.png', table)
    table = [dict(r, train_img_per_sec_controlled=float('nan')) for r in table]
    ablate.plot(tmp_path / 'b.png', table)
    measured, unmeasured = ([(ax.get_xlabel(), ax.get_xscale()) for ax in f.axes] for f in figures)
    assert measured == [('parameters (M)', 'linear'), ('GMACs (batch 1)', 'log'),
                        ('training img/s (controlled)', 'linear')]
    assert unmeasured == measured[:2]


def test_plot_labels_of_a_tight_cluster_do_not_cover_each_other(tmp_path):
    """Variants of one size and accuracy sit together; each label gets its own line, log ticks read 0.04."""
    import matplotlib.figure
    saved = []
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return original(fig, *args, **kwargs)
    names = ['base', 'd=4', 'generation=dense', 'S=2,4', 'share_row_col=on', 'fusion=sum']
    table = [dict(variant=n, runs=1, params=2.0e6 + 1e3 * i, gmacs=0.044, train_img_per_sec_controlled=float('nan'),
                  final_top1_mean=77. - 0.05 * i, final_top1_min=77., final_top1_max=77.) for i, n in enumerate(names)]
    table.append(dict(table[0], variant='mixer', params=1.96e6, gmacs=0.133, final_top1_mean=61.))
    mp = pytest.MonkeyPatch()
    mp.setattr(matplotlib.figure.Figure, 'savefig', keep)
    try:
        ablate.plot(tmp_path / 'c.png', table)
    finally:
        mp.undo()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = saved[0]
    canvas = FigureCanvasAgg(fig)  # plot closed the figure; draw it again to measure its labels
    canvas.draw()
    renderer = canvas.get_renderer()
    from matplotlib.text import Text
    for ax in fig.axes:
        boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text, without its leader line
        assert len(boxes) == len(table)
        overlaps = [(a.get_text(), b.get_text()) for i, (a, ba) in enumerate(zip(ax.texts, boxes))
                    for b, bb in list(zip(ax.texts, boxes))[i + 1:] if ba.overlaps(bb)]
        assert not overlaps, overlaps
    ticks = [t.get_text() for t in fig.axes[1].get_xticklabels(which='both') if t.get_text()]
    assert ticks and all('^' not in t and 'times' not in t for t in ticks), ticks


def test_compiled_throughput_lifts_dynamo_recompile_limit_for_every_variant(monkeypatch):
    """Variants of one class compile one forward; past dynamo's limit of 8 they would silently run eager."""
    import torch._dynamo
    from dynamixer import bench
    limits = []

    class Runner:
        def __init__(self, net, mode, x, precision, compile):
            assert compile

        def prepare_state(self):
            pass

        def step(self):
            limits.append(torch._dynamo.config.recompile_limit)
    monkeypatch.setattr(bench, 'StepRunner', Runner)
    _, _, variants = ablate.expand_grid(dict(
        model='dynamixer_cifar_t', base=dict(BASE), axes={'S': [1, 4], 'd': [1, 4, 8], 'generation': ['static', 'dense'],
                                                          'share_row_col': [True], 'fusion': ['sum']}))
    assert len(variants) == 10
    before = torch._dynamo.config.recompile_limit
    speeds = ablate.controlled_throughput(variants, compile=True, batch_size=2, warmup=1, iters=1, log=lambda *_: None)
    assert set(speeds) == {v['name'] for v in variants} and all(s['train'] > 0 for s in speeds.values())
    assert min(limits) >= 2 * len(variants)  # one compiled entry per variant and mode
    assert torch._dynamo.config.recompile_limit == before  # only for the measurement


def test_a_record_of_runs_is_tabulated_again_and_extended_without_its_run_folders(folder, tmp_path, monkeypatch,
                                                                                   capsys):
    """grid.json + runs.csv + throughput.json stand in for run folders that are gone; new runs join them."""
    first = tmp_path / 'first'
    two_seeds = grid(folder, seeds=[0, 1])
    done = ablate.run_grid(two_seeds, str(first), throughput=dict(batch_size=4, warmup=1, iters=1),
                           log=lambda *_: None)
    assert done['failed'] == 0 and json.loads((first / 'grid.json').read_text())['variants']['static']
    record = tmp_path / 'record'  # what a study commits: no run folders
    record.mkdir()
    for name in ('grid.json', 'runs.csv', 'throughput.json'):
        (record / name).write_bytes((first / name).read_bytes())

    monkeypatch.setattr(ablate, '_train', lambda *a, **k: pytest.fail('a recorded run was trained again'))
    lines = []
    again = ablate.run_grid(two_seeds, str(tmp_path / 'again'), train_missing=False, records=str(record),
                            log=lines.append)
    assert [r['status'] for r in again['runs']] == ['recorded'] * 4
    for old, new in zip(done['table'], again['table']):
        for key in ('params', 'gmacs', 'runs', 'final_top1_mean', 'final_top1_min', 'final_top1_max',
                    'best_top1_mean', 'train_img_per_sec_controlled', 'val_images'):
            assert new[key] == pytest.approx(old[key], rel=1e-5), key
    assert sum('recorded in' in line for line in lines) == 4
    rows = list(csv.DictReader(open(tmp_path / 'again' / 'runs.csv')))
    assert [r['status'] for r in rows] == ['recorded'] * 4 and rows[0]['num_classes'] == '2'

    # a record without best epochs or in-run speeds (recovered from a doc) leaves those columns out, not guessed
    recovered = (record / 'runs.csv').read_text().splitlines()
    header = recovered[0].split(',')
    blanked = [','.join('' if header[i] in ('best_top1', 'img_per_sec') else cell
                        for i, cell in enumerate(line.split(',')))
               for line in recovered[1:]]
    (record / 'runs.csv').write_text('\n'.join([recovered[0], *blanked]) + '\n')
    # a variant changed since the record is left out of it; a new variant is missing until trained
    changed = grid(folder, seeds=[0, 1], variants={'static': {'generation': 'static', 'reduced_dims': 1},
                                                   'sum': {'fusion': 'sum'}})
    lines.clear()
    partial = ablate.run_grid(changed, str(tmp_path / 'partial'), train_missing=False, records=str(record),
                              log=lines.append)
    status = {(r['variant'], r['seed']): r['status'] for r in partial['runs']}
    assert status == {('base', 0): 'recorded', ('static', 0): 'missing', ('sum', 0): 'missing',
                      ('base', 1): 'recorded', ('static', 1): 'missing', ('sum', 1): 'missing'}
    assert any('static changed since' in line for line in lines)
    base = partial['table'][0]
    assert base['runs'] == 2 and math.isnan(base['best_top1_mean']) and not math.isnan(base['final_top1_mean'])
    text = (tmp_path / 'partial' / 'results.md').read_text()
    assert '| base |' in text and 'nan' not in text and '| n/a |' in text

    # a record of other training settings is refused, in one line from the CLI
    other = grid(folder, seeds=[0, 1])
    other['train']['epochs'] = 2
    with pytest.raises(ValueError, match='another grid'):
        ablate.run_grid(other, str(tmp_path / 'other'), train_missing=False, records=str(record), log=lambda *_: None)
    code, err = _cli(tmp_path, capsys, '--model', 'dynamixer_cifar_t', '--data', str(folder), '--epochs', '1',
                     '--no-train', '--records', str(tmp_path / 'nowhere'))
    assert code == 2 and 'expected a folder with grid.json and runs.csv' in err and len(err.splitlines()) == 1
