"""timm's own model tests on our variants: tests/test_models.py of the installed timm's source distribution (the
file timm's CI runs on every model), restricted to the models ``import dynamixer`` registers, with our module in
its list of ``forward_intermediates`` models.

The file comes from PyPI once per timm version (``pip download timm==VERSION --no-binary :all: --no-deps``) and
is kept in ~/.cache/dynamixer ($XDG_CACHE_HOME/dynamixer). It runs in a subprocess, as timm runs it: it sets
process-wide TorchScript flags at import. Input sizes are timm's: the cfg's ``input_size``, capped per test
(96 px for features, 128 for backward, TorchScript and FX). dynamixer_m and dynamixer_l run dynamixer_s's code
at two to four times its cost: left out unless DYNAMIXER_TIMM_SUITE=all.

Allowed to differ, and nothing else: timm's assertion that a model has at least three feature levels, which the
two-stage variants cannot meet, and the cases timm itself skips for its size limits (``KNOWN_SKIPS``, each
checked by a test of ours instead).
"""
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import timm

from dynamixer.models import MODEL_ARGS

# read at import: the tests' fixtures point XDG_CACHE_HOME at a temporary folder later
CACHE = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'dynamixer'
LARGE = ('dynamixer_m', 'dynamixer_l')
TWO_STAGE = {name for name, args in MODEL_ARGS.items() if len(args['depths']) < 3}
THREE_LEVELS = ('test_model_forward_features', 'test_model_forward_intermediates')  # assert len(channels) >= 3
# (test, model): skipped by timm for its fixed-input-size limits (FX backward: 224 px), checked in test_models.py
KNOWN_SKIPS = {('test_model_backward_fx', 'vip_pyramid_t'): 'test_fx_backward_of_vip_pyramid_t_at_its_size'}
# every model must reach these (the cfg test under either name: timm files '*mixer_*' names as non-standard)
REQUIRED = ('test_model_forward', 'test_model_backward', 'test_model_forward_torchscript', 'test_model_forward_fx',
            'test_model_backward_fx', 'test_model_forward_fx_torchscript', 'test_model_forward_intermediates',
            'test_model_forward_intermediates_features', 'test_prune_intermediate_layers_contract')

CONFTEST = '''\
"""Written by dynamixer's tests/test_timm_suite.py: timm's test_models.py on dynamixer's variants only."""
import os

import timm

import dynamixer  # noqa: F401  registers the variants before the test file lists models

MODELS = set(os.environ['DYNAMIXER_TIMM_MODELS'].split(','))
_list_models, _list_pretrained = timm.list_models, timm.list_pretrained


def _ours(names):
    return [name for name in names if name.split('.')[0] in MODELS]


def list_models(filter='', module='', *args, **kwargs):
    if isinstance(module, (list, tuple)):  # FEAT_INTER_FILTERS: the modules with forward_intermediates
        module = [*module, 'dynamixer']
    return _ours(_list_models(filter, module, *args, **kwargs))


# the test file imports these names from timm when pytest imports it, after this conftest
timm.list_models = list_models
timm.list_pretrained = lambda *args, **kwargs: _ours(_list_pretrained(*args, **kwargs))


def pytest_collection_modifyitems(config, items):
    """Only the cases parametrized by model name, for our models (the rest name timm's own models)."""
    ours = [item for item in items if hasattr(item, 'callspec')
            and str(item.callspec.params.get('model_name', '')).split('.')[0] in MODELS]
    config.hook.pytest_deselected(items=[item for item in items if item not in ours])
    items[:] = ours
'''


def timm_test_file() -> Path:
    """The installed timm's tests/test_models.py, from its source distribution (downloaded once, cached)."""
    version = timm.__version__
    test_file = CACHE / f'timm-{version}' / 'test_models.py'
    if test_file.is_file():
        return test_file
    sdist = CACHE / f'timm-{version}.tar.gz'
    if not sdist.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, '-m', 'pip', 'download', f'timm=={version}', '--no-binary', ':all:', '--no-deps',
             '--dest', str(CACHE), '-q'], capture_output=True, text=True, timeout=600)
        if result.returncode or not sdist.is_file():
            reason = (result.stderr.strip().splitlines() or ['no error message'])[-1]
            pytest.fail(f'could not download the source distribution of timm {version} into {CACHE} ({reason}); '
                        f'the suite needs PyPI once per timm version, or the file {sdist.name} put there by hand.')
    with tarfile.open(sdist) as tar:
        text = tar.extractfile(f'timm-{version}/tests/test_models.py').read()
    test_file.parent.mkdir(parents=True, exist_ok=True)
    partial = test_file.with_suffix(f'.{os.getpid()}.tmp')
    partial.write_bytes(text)
    partial.replace(test_file)  # atomic: a concurrent run never reads half a file
    return test_file


def suite_models() -> List[str]:
    if os.environ.get('DYNAMIXER_TIMM_SUITE') == 'all':
        return list(MODEL_ARGS)
    return [name for name in MODEL_ARGS if name not in LARGE]


def run_suite(models: List[str], folder: Path) -> List[Tuple[str, str, str, str]]:
    """(test, model, outcome, message) for every case timm's test file runs on ``models``."""
    (folder / 'test_models.py').write_bytes(timm_test_file().read_bytes())
    (folder / 'conftest.py').write_text(CONFTEST)
    report = folder / 'report.xml'
    env = dict(os.environ, DYNAMIXER_TIMM_MODELS=','.join(models), TORCH_DEVICE='cpu')
    env.pop('GITHUB_ACTIONS', None)  # timm drops its pretrained-loading and FX + TorchScript tests on its own CI
    env.pop('PYTEST_ADDOPTS', None)
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', str(folder / 'test_models.py'), '-q', '-p', 'no:cacheprovider',
         '--rootdir', str(folder), '-W', 'ignore::pytest.PytestUnknownMarkWarning', f'--junitxml={report}'],
        cwd=folder, env=env, capture_output=True, text=True, timeout=3600)
    if not report.is_file():
        pytest.fail(f'timm\'s test file did not run (exit {result.returncode}):\n{result.stdout[-3000:]}'
                    f'\n{result.stderr[-3000:]}')
    cases = []
    for case in ET.parse(report).iter('testcase'):
        name = case.get('name')
        test, params = name.split('[', 1)
        model = next(p.split('.')[0] for p in params.rstrip(']').split('-') if p.split('.')[0] in models)
        outcome, message = 'passed', ''
        for child in case:
            if child.tag in ('failure', 'error', 'skipped'):
                outcome, message = child.tag, (child.get('message') or '').strip()
        cases.append((test, model, outcome, message))
    return cases


def summary(cases) -> str:
    counts: Dict[str, Counter] = defaultdict(Counter)
    for test, _, outcome, _ in cases:
        counts[test][outcome] += 1
    return '\n'.join(f'{test:48} ' + ', '.join(f'{n} {outcome}' for outcome, n in sorted(c.items()))
                     for test, c in sorted(counts.items()))


def test_timm_model_suite_on_every_variant(tmp_path):
    models = suite_models()
    cases = run_suite(models, tmp_path)
    print(f'\ntimm {timm.__version__} tests/test_models.py on {", ".join(models)}: {len(cases)} cases\n'
          + summary(cases))

    unexpected = []
    for test, model, outcome, message in cases:
        if outcome == 'passed':
            continue
        if outcome == 'failure' and test in THREE_LEVELS and model in TWO_STAGE and '>= 3' in message:
            continue  # timm asks every model for three feature levels; these have two stages
        if outcome == 'skipped' and (test, model) in KNOWN_SKIPS and 'limit' in message:
            continue
        unexpected.append(f'{test}[{model}] {outcome}: {message.splitlines()[0] if message else ""}')
    assert not unexpected, 'timm\'s model tests beyond the allowed differences:\n' + '\n'.join(unexpected)

    ran = {(test, model) for test, model, _, _ in cases}
    missing = [f'{test}[{model}]' for model in models for test in REQUIRED if (test, model) not in ran]
    missing += [f'test_model_default_cfgs*[{model}]' for model in models
                if not {(t, model) for t in ('test_model_default_cfgs', 'test_model_default_cfgs_non_std')} & ran]
    assert not missing, 'timm\'s test file no longer reaches: ' + ', '.join(missing)
    pretrained = [m for m in models if any(n.startswith(m + '.') for n in timm.list_pretrained(m))]
    assert {('test_model_load_pretrained', m) for m in pretrained} <= ran


def test_the_suite_sees_only_our_models_and_fails_where_a_variant_breaks(tmp_path, monkeypatch):
    """The harness itself: a variant that breaks timm's contract fails there (here the cfg's pool_size, which
    the cfg tests compare with forward_features), and timm's own models stay out of the run."""
    broken = CONFTEST + ("\nfrom timm.models._registry import _model_pretrained_cfgs\n"
                         "_model_pretrained_cfgs['vip_cifar_xs.untrained'].pool_size = (3, 3)\n")
    monkeypatch.setattr(sys.modules[__name__], 'CONFTEST', broken)
    cases = run_suite(['vip_cifar_xs'], tmp_path)
    assert {model for _, model, _, _ in cases} == {'vip_cifar_xs'}
    outcomes = {test: outcome for test, _, outcome, _ in cases}
    assert outcomes['test_model_default_cfgs'] == 'failure'
    assert outcomes['test_model_forward'] == 'passed'
