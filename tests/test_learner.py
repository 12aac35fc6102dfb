"""The training loop's bookkeeping, in process on a tiny network: gradient accumulation (including a short
last group), early stopping, the best checkpoint, and refusing to overwrite or mis-resume a run."""
import pytest
import torch
from torch import nn

from skinkd.core import SkinkdError
from skinkd.schema import ModelConfig
from skinkd.config import load_config, resolve_paths
from skinkd.checkpoints import load_checkpoint
from skinkd.losses import SegLoss
from skinkd.learner import RunRecord, Learner, SegTask


def batches(n, seed=0):
    """`n` batches of 2 images whose mask is 'red channel > 0': learnable by a 1x1 conv."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(2, 3, 16, 16, generator=g)
        out.append({'image': x, 'mask': (x[:, :1] > 0).float(), 'index': torch.tensor([2 * i, 2 * i + 1])})
    return out


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))


def learner(tmp_path, n_train=5, sets=(), model=None):
    cfg = resolve_paths(load_config(overrides=['train.optimizer=sgd', 'train.momentum=0', 'train.weight_decay=0',
                                               'train.schedule=constant', 'train.channels_last=false', 'train.lr=0.1',
                                               'train.amp=none',  # exact fp32 references; the precision tests set auto
                                               f'output.run_dir={tmp_path / "run"}', *sets]))
    loaders = {'train': batches(n_train), 'val': batches(2, seed=1)}
    return Learner(model or tiny_net(), SegTask(SegLoss('bce')), loaders, RunRecord(cfg, ModelConfig(), 'student', 'raw'))


def record_gradients_at_each_step(lrn) -> list:
    "The gradients the optimiser sees at each of its steps (a step pre-hook; opt.step itself stays untouched)."
    seen = []
    lrn.opt.register_step_pre_hook(lambda opt, args, kwargs: seen.append([p.grad.clone() for p in lrn.model.parameters()]))
    return seen


@pytest.mark.filterwarnings('error::UserWarning')  # torch warns if the scheduler steps before the optimiser
def test_accumulation_steps_once_per_group_and_weights_a_short_last_group_fully(tmp_path):
    lrn = learner(tmp_path, n_train=5, sets=['train.accumulate=4', 'train.epochs=1'])
    grads = record_gradients_at_each_step(lrn)
    before = [p.detach().clone() for p in lrn.model.parameters()]
    lrn.train_epoch()
    assert len(grads) == 2 and lrn.sched.last_epoch == 2           # ceil(5 / 4) optimiser steps
    probe = tiny_net()                                               # the same weights before any step...
    for p, b in zip(probe.parameters(), before): p.data.copy_(b)
    first = [sum(g) for g in zip(*[torch.autograd.grad(SegLoss('bce')(probe(b['image']), b['mask']), list(probe.parameters()))
                                   for b in batches(5)[:4]])]
    assert all(torch.allclose(g / 4, h, atol=1e-6) for g, h in zip(first, grads[0]))  # ...mean over the full group
    assert all(g.abs().sum() > 0 for g in grads[1])


@pytest.mark.filterwarnings('error::UserWarning')
def test_short_last_group_is_not_scaled_down(tmp_path):
    lrn = learner(tmp_path, n_train=5, sets=['train.accumulate=4', 'train.epochs=1'])
    seen = record_gradients_at_each_step(lrn)
    lrn.train_epoch()
    probe = tiny_net()
    for p, q in zip(probe.parameters(), lrn.model.parameters()): p.data.copy_(q.detach())
    # rebuild the weights at the second step: undo the last SGD update (lr 0.1, no momentum)
    for p, g in zip(probe.parameters(), seen[1]): p.data.add_(0.1 * g)
    b = batches(5)[4]
    alone = torch.autograd.grad(SegLoss('bce')(probe(b['image']), b['mask']), list(probe.parameters()))
    assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(alone, seen[1]))  # the 1-batch group counts fully


def test_early_stopping_after_patience_and_best_checkpoint(tmp_path):
    lrn = learner(tmp_path, sets=['train.epochs=6', 'train.early_stopping=1', 'train.lr=1e-12'])
    lrn.fit()                                                        # predictions never change: no improvement
    assert len(lrn.history) == 2 and lrn.stopped and lrn.bad_epochs == 1
    best = load_checkpoint(tmp_path / 'run' / 'checkpoints' / 'best.pt')
    assert best['epoch'] == 1


def test_best_checkpoint_holds_the_best_validation_dice(tmp_path):
    lrn = learner(tmp_path, sets=['train.epochs=4', 'train.lr=0.5'])
    lrn.fit()
    dice = [row['val_dice'] for row in lrn.history]
    best = load_checkpoint(tmp_path / 'run' / 'checkpoints' / 'best.pt')
    assert best['metrics']['dice'] == pytest.approx(max(dice)) and best['epoch'] == 1 + dice.index(max(dice))
    assert load_checkpoint(tmp_path / 'run' / 'checkpoints' / 'last.pt')['epoch'] == 4


def test_existing_run_is_never_overwritten_and_resume_checks_settings(tmp_path):
    learner(tmp_path, sets=['train.epochs=1']).fit()
    with pytest.raises(SkinkdError, match='already holds a run'):
        learner(tmp_path, sets=['train.epochs=2']).fit()
    with pytest.raises(SkinkdError, match=r'changed since it was written: train.optimizer, train.batch_size'):
        learner(tmp_path, sets=['train.epochs=2', 'train.resume=true', 'train.optimizer=adamw', 'train.batch_size=4']).fit()
    ckpts = tmp_path / 'run' / 'checkpoints'
    full = (ckpts / 'last.pt').read_bytes()
    (ckpts / 'last.pt').write_bytes((ckpts / 'best.pt').read_bytes())  # a weights-only best.pt cannot resume
    with pytest.raises(SkinkdError, match=r'holds weights only \(a best.pt\); resume needs the last.pt'):
        learner(tmp_path, sets=['train.epochs=2', 'train.resume=true']).fit()
    (ckpts / 'last.pt').write_bytes(full)
    resumed = learner(tmp_path, sets=['train.epochs=2', 'train.resume=true', 'train.amp=auto'])
    resumed.fit()
    assert [r['epoch'] for r in resumed.history] == [1, 2]


def test_no_batches_per_process_is_an_error(tmp_path):
    cfg_sets = ['train.limit_train_batches=1']
    lrn = learner(tmp_path, sets=cfg_sets)
    lrn.loaders['train'] = []
    with pytest.raises(SkinkdError, match='fewer images per process than train.batch_size'):
        Learner(tiny_net(), lrn.task, lrn.loaders, RunRecord(lrn.cfg, ModelConfig(), 'student', 'raw'))


def test_bf16_autocast_on_cpu_trains(tmp_path):
    lrn = learner(tmp_path, sets=['train.epochs=2', 'train.amp=bf16', 'train.lr=0.5'])
    seen = []
    task_loss = lrn.task.loss
    lrn.task.loss = lambda m, b: (lambda out: (seen.append(m(b['image']).dtype), out)[1])(task_loss(m, b))
    lrn.fit()
    assert seen and all(d == torch.bfloat16 for d in seen)          # the forward really ran in bf16
    assert all(torch.isfinite(torch.tensor(r['train_loss'])) for r in lrn.history)
    assert all(p.dtype == torch.float32 for p in lrn.model.parameters())  # weights stay fp32
