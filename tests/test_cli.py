"""The ``dynamixer`` command itself: ``dynamixer list`` and argument checking at the edge."""
import subprocess
import sys

import pytest
import timm

import dynamixer
from dynamixer import cli
from dynamixer.bench import count_macs


def test_list_shows_each_cifar_variant_with_its_size_and_tags(capsys):
    assert cli.main(['list', 'dynamixer_cifar*']) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith('dynamixer_')}
    assert set(lines) == set(timm.list_models('dynamixer_cifar*'))
    for name, line in lines.items():
        model = timm.create_model(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        assert f'{params:.2f}M' in line and '32x32' in line
        assert f'{count_macs(model, (3, 32, 32)) / 1e9:.3f}' in line
    assert 'cifar10_1h' in lines['dynamixer_cifar_xs'] and lines['dynamixer_cifar_t'].rstrip().endswith('-')


def test_list_of_an_unknown_pattern_is_a_one_line_error(capsys):
    assert cli.main(['list', 'resnet*', '--no-macs']) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and "no registered model matches 'resnet*'" in err


@pytest.mark.parametrize('argv, expect', [
    (['train', '--epochs', '-1'], 'argument --epochs: expected an integer >= 1'),
    (['train', '--batch-size', '0'], 'argument --batch-size: expected an integer >= 1'),
    (['train', '--lr', 'nan'], 'argument --lr: expected a number > 0'),
    (['train', '--val-split', '1.5'], 'argument --val-split: expected a number >= 0 and < 1'),
    (['train', '--hflip', '2'], 'argument --hflip: expected a number >= 0 and <= 1'),
    (['train', '--epochs', '2.5'], 'argument --epochs: expected an integer >= 1'),
    (['train', '--seed', 'x'], 'argument --seed: expected an integer >= 0 and < 4294967296'),
    (['bench', '--iters', '0'], 'argument --iters: expected an integer >= 1'),
    (['eval', '--model-dir', 'm', '--batch-size', '-3'], 'argument --batch-size: expected an integer >= 1'),
    (['predict', '--model-dir', 'm', '--topk', '0', 'a.png'], 'argument --topk: expected an integer >= 1'),
])
def test_bad_numbers_are_one_line_naming_flag_value_and_limits(capsys, argv, expect):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'dynamixer {argv[0]}: error: ') and expect in err, err
    assert repr(argv[argv.index(expect.split()[1].rstrip(':')) + 1]) in err  # the value given


def test_bad_number_in_a_config_file_names_the_setting_and_the_file(tmp_path, capsys):
    config = tmp_path / 'c.yaml'
    config.write_text('epochs: 0\n')
    assert cli.main(['train', '--config', str(config), '--output', str(tmp_path / 'run')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'epochs: 0 in {config}: expected an integer >= 1' in err, err
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('argv', [['--help'], ['train', '--help'], ['eval', '--help'], ['predict', '--help'],
                                  ['bench', '--help'], ['export', '--help'], ['convert', '--help'], ['list', '--help'],
                                  ['visualize', '--help'], ['ablate', '--help'], ['train', '--epochs', '-1']])
def test_help_and_bad_flags_load_neither_torch_nor_timm(argv):
    """What makes `dynamixer --help` answer at once: nothing heavy is imported before a command runs."""
    code = ('import sys\nfrom dynamixer import cli\ntry:\n    cli.main(ARGV)\nexcept SystemExit:\n    pass\n'
            'print(sorted(m for m in ("torch", "timm", "numpy") if m in sys.modules))').replace('ARGV', repr(argv))
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == '[]', done.stdout + done.stderr


@pytest.mark.parametrize('order', ['dynamixer first', 'timm first'])
def test_import_dynamixer_registers_the_variants_with_timm_either_way(order):
    first, second = ('dynamixer', 'timm') if order == 'dynamixer first' else ('timm', 'dynamixer')
    code = (f'import sys\nimport {first}\nloaded = "torch" in sys.modules\nimport {second}\n'
            f'print(loaded, timm.create_model("dynamixer_cifar_xs").num_classes, '
            f'len(timm.list_models(module="dynamixer")))')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == [str(order == 'timm first'), '10', str(len(dynamixer.list_models()))], done.stderr


def test_help_says_each_default_once_and_the_digits_defaults_too():
    text = cli._module_parser('train').format_help()
    flat = ' '.join(text.split())
    assert '--epochs EPOCHS training epochs (default: 40; 20 for digits)' in flat
    assert '--model-ema, --no-model-ema' in flat and '(default: off; on for digits)' in flat
    assert 'patch_size=2 depths=(2,2,2,2) embed_dims=(64,64,64,64)' in flat  # the digits model, readable
    for name in cli.COMMANDS:
        help_text = ' '.join(cli._module_parser(name).format_help().split())
        for entry in help_text.split(' --')[1:]:
            assert entry.count('(default:') + entry.count('; default:') <= 1, (name, entry)
    convert = cli._module_parser('convert').format_help()
    assert cli.COMMANDS['convert'][1].split()[0].capitalize() in convert and 'ViP fork' not in convert


def test_list_is_counted_once_then_read_from_the_cache(tmp_path, monkeypatch, capsys):
    from dynamixer import catalog
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert cli.main(['list', 'dynamixer_cifar_xs']) == 0
    first = capsys.readouterr().out
    assert len(list((tmp_path / 'dynamixer').glob('list-*.json'))) == 1

    def counted_again(*args, **kwargs):
        raise AssertionError('the models were built again')
    monkeypatch.setattr(catalog, 'describe', counted_again)
    assert cli.main(['list', 'dynamixer_cifar_xs']) == 0
    assert capsys.readouterr().out == first and '2.00M' in first
    monkeypatch.setattr('dynamixer.__version__', '99.0')  # another version: counted again
    with pytest.raises(AssertionError, match='built again'):
        catalog.cached_rows()
