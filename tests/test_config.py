"""Behaviour of skinkd.config: strict validation, layered precedence, YAML round trip, CLI plumbing."""
import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from dataclasses import asdict

import pytest
import yaml

from skinkd.core import scratch_dir
from skinkd.schema import Config, ConfigError
from skinkd.config import describe, load_config, parse_override, resolve_paths, save_config

from conftest import REPO


def write(path, text):
    path.write_text(text)
    return path


def test_unknown_key_names_full_path_and_suggestion(tmp_path):
    cfg = write(tmp_path / 'c.yaml', 'augment:\n  brightnes: 0.3\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value) == (f"config file {cfg}: unknown config key 'augment.brightnes': "
                            "did you mean 'brightness'?")


def test_unknown_section_suggests_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'trian': did you mean 'train'\?"):
        load_config(write(tmp_path / 'c.yaml', 'trian:\n  epochs: 3\n'))


def test_unknown_key_inside_distill_term_list(tmp_path):
    text = 'distill:\n  terms:\n    - {kind: hint, tap: aspp, wieght: 2}\n'
    with pytest.raises(ConfigError, match=r"'distill.terms\[0\].wieght': did you mean 'weight'\?"):
        load_config(write(tmp_path / 'c.yaml', text))


@pytest.mark.parametrize('text, message', [
    ('train:\n  epochs: 2.5\n', "'train.epochs' must be an integer, got 2.5"),
    ('train:\n  channels_last: yes please\n', "'train.channels_last' must be true/false, got 'yes please'"),
    ('train:\n  lr: fast\n', "'train.lr' must be a number, got 'fast'"),
    ('data:\n  split_file: 3\n', "'data.split_file' must be a string, got 3"),
    ('data: [1, 2]\n', "config section 'data' must be a mapping of keys to values, got list"),
    ('distill:\n  terms: {kind: hint}\n', "'distill.terms' must be a list"),
])
def test_wrong_types(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path / 'c.yaml', text))
    assert message in str(e.value)


@pytest.mark.parametrize('override, message', [
    ('train.lr=0', "'train.lr' is 0.0; it must be > 0.0"),
    ('train.epochs=0', "'train.epochs' is 0; it must be >= 1"),
    ('augment.hflip_p=1.5', "'augment.hflip_p' is 1.5; it must be <= 1.0"),
    ('teacher.output_stride=32', "'teacher.output_stride' is 32; allowed: 8, 16"),
    ('train.optimizer=adam', "'train.optimizer' is 'adam'; allowed: sgd, adamw"),
    ('data.val_fraction=0.6', "sum < 1"),
    ('augment.scale_min=1.5', "'augment.scale_min' (1.5) must be <= 'augment.scale_max' (1.1)"),
])
def test_range_errors_name_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override, 'data.test_fraction=0.4'] if 'val_fraction' in override else [override])
    assert message in str(e.value)
    assert str(e.value).startswith('--set ')


def test_precedence_across_all_four_levels(tmp_path):
    cfg_file = write(tmp_path / 'c.yaml', 'train:\n  epochs: 5\n  lr: 0.1\n  batch_size: 4\n  seed: 7\n')
    cfg = load_config(cfg_file, overrides=['train.lr=0.2', 'train.batch_size=2'], params={'train.batch_size': 3})
    assert Config().train.weight_decay == cfg.train.weight_decay   # default survives
    assert cfg.train.seed == 7                                     # file over default
    assert cfg.train.epochs == 5
    assert cfg.train.lr == 0.2                                     # --set over file
    assert cfg.train.batch_size == 3                               # notebook parameter over --set


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match='must look like key=value'):
        load_config(overrides=['train.epochs'])
    with pytest.raises(ConfigError, match="'train.epochs' is a value, not a section"):
        load_config(overrides=['train.epochs.x=1'])
    assert parse_override('data.split_file=null') == ('data.split_file', None)


def test_round_trip_of_resolved_config(tmp_path):
    cfg = resolve_paths(load_config(REPO / 'configs' / 'demo.yaml', ['train.lr=3e-4', 'distill.terms=[]']), tmp_path)
    again = load_config(save_config(cfg, tmp_path / 'run' / 'config.yaml'))
    assert again == cfg
    assert again.distill.terms == [] and again.data.root == str(tmp_path / 'data' / 'synthetic')


@pytest.mark.parametrize('text, message', [('', 'is empty'), ('   \n# only a comment\n', 'is empty'),
                                           ('- a\n- b\n', 'must hold a mapping'), ('42\n', 'must hold a mapping'),
                                           ('train: [\n', 'is not valid YAML')])
def test_empty_or_non_mapping_file(tmp_path, text, message):
    path = write(tmp_path / 'bad.yaml', text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_shipped_configs_are_valid_and_documented():
    shipped = sorted((REPO / 'configs').glob('*.yaml'))
    assert {'config.yaml', 'demo.yaml', 'demo_pool.yaml'} <= {p.name for p in shipped}
    for path in shipped:
        data = yaml.safe_load(path.read_text())
        cfg = load_config(path)
        assert asdict(cfg)['data']['root'] == data['data']['root']
    for name in ('demo.yaml', 'demo_pool.yaml'):  # offline: generated data, no pretrained weights
        demo = load_config(REPO / 'configs' / name)
        assert demo.teacher.pretrained is None and demo.student.pretrained is None and demo.data.synthetic_n > 0
    pool = load_config(REPO / 'configs' / 'demo_pool.yaml').distill  # the HAM10000 recipe's path, on synthetic data
    assert pool.unlabeled and pool.unlabeled_synthetic_n > 0 and pool.soft_labels == 'cached'
    assert [t.kind for t in pool.terms] == ['logit']
    keys = [k for k, _, _ in describe()]
    assert 'distill.terms' in keys and 'train.grad_clip' in keys and len(keys) == len(set(keys))


def test_cli_helpers_report_config_errors_in_one_line(tmp_path):
    code = ('import argparse\nfrom skinkd.config import add_config_args, config_from_args\nfrom skinkd.core import cli_main\n'
            '@cli_main\ndef main():\n    a = add_config_args(argparse.ArgumentParser()).parse_args()\n'
            '    print(config_from_args(a).train.epochs)\nmain()\n')
    script = write(tmp_path / 'tool.py', code)
    ok = subprocess.run([sys.executable, script, '--set', 'train.epochs=4'], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == '4'
    bad = subprocess.run([sys.executable, script, '--set', 'train.epoch=4'], capture_output=True, text=True)
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr
    assert bad.stderr.strip() == "tool.py: error: --set train.epoch: unknown config key 'train.epoch': did you mean 'epochs'?"


def _make_scratch(prefix):
    "Create a scratch folder with a file in it; return its path (run in a worker process)."
    path = scratch_dir(prefix)
    (path / 'checkpoint.pt').write_bytes(b'x' * 1000)
    return str(path)


def test_scratch_dir_is_deleted_when_a_process_or_a_worker_exits():
    "Notebook examples and smoke runs must not leave checkpoints behind: nbdev_test runs them in pool workers."
    code = "from skinkd.config import scratch_dir; p = scratch_dir(); (p / 'f').write_text('x'); print(p)"
    path = Path(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip())
    assert path.name.startswith('skinkd-') and not path.exists()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('fork')) as pool:
        path = Path(pool.submit(_make_scratch, 'skinkd-worker-').result())
        assert (path / 'checkpoint.pt').exists()  # alive while the worker lives
    assert not path.exists()


def test_stage_recipes_teacher_overrides_win_for_the_teacher_only(tmp_path):
    from skinkd.config import stage_recipe
    path = write(tmp_path / 'c.yaml', 'train:\n  epochs: 8\n  lr: 1.0e-3\n  batch_size: 4\n  teacher:\n    epochs: 24\n    lr: 2.0e-3\n')
    cfg = load_config(path, ['train.teacher.lr=3e-3', 'train.warmup_epochs=2'], {'train.teacher.batch_size': 2})
    teacher, raw, distill = (stage_recipe(cfg.train, s) for s in ('teacher', 'raw', 'distill'))
    assert (teacher.epochs, teacher.lr, teacher.batch_size, teacher.warmup_epochs) == (24, 3e-3, 2, 2.0)  # file < --set < params
    assert (raw.epochs, raw.lr, raw.batch_size) == (8, 1e-3, 4) and raw == distill
    assert load_config(save_config(cfg, tmp_path / 'run' / 'config.yaml')) == cfg      # the overrides survive the run folder
    assert 'teacher:\n    epochs: 24' in (tmp_path / 'run' / 'config.yaml').read_text()


@pytest.mark.parametrize('override, message', [
    ('train.teacher.epoch=3', "unknown config key 'train.teacher.epoch': did you mean 'epochs'?"),
    ('train.teacher.warmup=1', "unknown config key 'train.teacher.warmup': did you mean 'warmup_epochs'?"),
    ('train.teacher.lr=0', "config key 'train.teacher.lr' is 0.0; it must be > 0.0"),
    ('train.teacher.schedule=linear', "'train.teacher.schedule' is 'linear'; allowed: poly, cosine, onecycle, constant"),
    ('train.teacher.early_stopping=x', "config key 'train.teacher.early_stopping' must be an integer, got 'x'"),
    ('train.student.epochs=3', "config key 'train.student' does not exist: the raw and distilled students always share"),
    ('train.raw.lr=1', "config key 'train.raw' does not exist"),
])
def test_stage_override_validation(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert message in str(e.value)


def test_describe_lists_the_teacher_overrides_and_the_real_defaults():
    rows = {k: (d, h) for k, d, h in describe()}
    assert rows['teacher.backbone'][0] == 'resnet101' and rows['student.backbone'][0] == 'resnet18'
    for key in ('epochs', 'lr', 'schedule', 'warmup_epochs', 'batch_size', 'early_stopping'):
        default, help = rows[f'train.teacher.{key}']
        assert default is None and help.startswith('teacher: ') and f'(null: as train.{key})' in help


def test_recipe_differences_name_every_student_key():
    from skinkd.config import recipe_differences
    base = load_config(overrides=['train.epochs=8'])
    assert recipe_differences(base, load_config(overrides=['train.epochs=8', 'train.teacher.epochs=30', 'data.num_workers=0'])) == []
    diff = recipe_differences(base, load_config(overrides=['train.epochs=8', 'student.backbone=resnet34', 'data.image_size=128']))
    assert diff == ["data.image_size (256 vs 128)", "student.backbone ('resnet18' vs 'resnet34')"]


@pytest.mark.parametrize('content, message', [
    ('train:\n  note: caf\xe9\n'.encode('latin-1'), 'is not UTF-8 text (byte 0xe9'),
    (('a: &a [x, x, x, x, x, x, x, x, x]\n' + ''.join(f'{c}: &{c} [{", ".join([f"*{p}"] * 9)}]\n'
                                                      for p, c in zip('abcdefgh', 'bcdefghi'))).encode(), 'expands to more than 100,000 values'),
    (b'a: &a [*a]\n', 'refers to itself'),
])
def test_hostile_yaml_gets_one_short_line(tmp_path, content, message):
    "A non-UTF-8 file, a 1.4 KB 'billion laughs' alias bomb and a recursive alias: one line each, in a real process."
    (tmp_path / 'c.yaml').write_bytes(content)
    r = subprocess.run(['skinkd_distill', '--mode', 'raw', '--config', str(tmp_path / 'c.yaml'), '--out', str(tmp_path / 'r')],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and message in r.stderr and 'Traceback' not in r.stderr
    assert len(r.stderr) < 500 and not (tmp_path / 'r').exists()  # the bomb once produced a 580 MB message
