"""fit: reaches 100 % train accuracy on a tiny problem, is bit-reproducible, applies options."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatcli.data import Split
from flatcli.errors import FlatcliError, UsageError
from flatcli.train import (
    EpochStats,
    TrainConfig,
    build_optimizer,
    fisher_penalty,
    fit,
    lr_at,
)

K = 3


def _images(n: int, seed: int) -> Split:
    """Three classes of 1x4x4 images: class-dependent mean pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    centers = torch.randn(K, 1, 4, 4, generator=torch.Generator().manual_seed(99))
    x = centers[y] + 0.8 * torch.randn(n, 1, 4, 4, generator=g)
    return Split(x, y)


def _mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, K)
    )


def _cnn_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(64, K),
    )


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_short_fit_reaches_full_train_accuracy_and_stops():
    train, test = _images(60, 0), _images(60, 1)
    config = TrainConfig(optimizer="adam", lr=1e-2, epochs=300, batch_size=16, target_train_acc=1.0)
    seen: list[EpochStats] = []
    result = fit(_mlp(), train, test, K, config, on_epoch=seen.append)
    assert result.reached_target and result.train_acc == 1.0
    assert result.epochs < 300 and result.epochs == len(result.history)
    assert seen == result.history and [s.epoch for s in seen] == list(range(1, result.epochs + 1))
    assert result.steps == result.epochs * 4
    assert result.gap_acc == pytest.approx(result.train_acc - result.test_acc)
    assert result.gap_loss == pytest.approx(result.test_loss - result.train_loss)
    assert 0 <= result.test_acc <= 1 and result.seconds > 0
    assert all(b.seconds >= a.seconds for a, b in zip(seen, seen[1:], strict=False))
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data and len(data["history"]) == result.epochs


def test_reported_metrics_are_eval_mode_on_the_labels_trained_on():
    train, test = _images(30, 0), _images(20, 1)
    model = _mlp(dropout=0.5)
    result = fit(model, train, test, K, TrainConfig(epochs=2, augment="flip"))
    assert not model.training  # left in eval mode
    with torch.no_grad():
        logits = model(train.x)
    assert result.train_loss == pytest.approx(float(F.cross_entropy(logits, train.y)), rel=1e-6)
    assert result.train_acc == float((logits.argmax(1) == train.y).float().mean())
    assert result.history[-1].test_acc == result.test_acc


def test_same_seed_same_weights_bit_for_bit():
    train = _images(40, 0)
    config = TrainConfig(
        epochs=3,
        batch_size=8,
        augment="crop1-flip",
        fisher_reg=True,
        reg_subbatches=2,
        clip=5.0,
        nesterov=True,
        seed=11,
    )
    states = []
    for _ in range(2):
        model = _cnn_bn()
        fit(model, train, None, K, config)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    other = _cnn_bn()
    fit(other, train, None, K, TrainConfig(**{**config.to_dict(), "seed": 12}))
    assert not torch.equal(
        _flat(other), torch.cat([states[0][k].reshape(-1) for k, _ in other.named_parameters()])
    )


def test_global_rng_is_left_as_it_was():
    model = _mlp(dropout=0.5)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(model, _images(20, 0), None, K, TrainConfig(epochs=1))
    assert torch.equal(torch.rand(3), expected)


def _one_full_batch_step(config_kwargs, model=None):
    """fit for one epoch, one batch: returns (w0, w1, model0, train, stats)."""
    train = _images(24, 0)
    model = model if model is not None else _mlp()
    model0 = copy.deepcopy(model)
    config = TrainConfig(epochs=1, batch_size=24, **config_kwargs)
    result = fit(model, train, None, K, config)
    return _flat(model0), _flat(model), model0, train, result.history[0]


def _manual_grad(model, loss):
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def test_label_smoothing_is_the_objective_minimised():
    eps, lr = 0.2, 0.5
    w0, w1, model0, train, stats = _one_full_batch_step(
        {"label_smoothing": eps, "lr": lr, "momentum": 0.0}
    )
    model0.train()
    smoothed = F.cross_entropy(model0(train.x), train.y, label_smoothing=eps)
    assert stats.objective == pytest.approx(float(smoothed.detach()), rel=1e-6)
    # by hand: soft targets (1 - eps) onehot + eps / K
    logp = F.log_softmax(model0(train.x), dim=1)
    soft = F.one_hot(train.y, K) * (1 - eps) + eps / K
    by_hand = -(soft * logp).sum(1).mean()
    torch.testing.assert_close(smoothed, by_hand)
    torch.testing.assert_close(w1, w0 - lr * _manual_grad(model0, smoothed), rtol=1e-5, atol=1e-7)


def test_sgd_weight_decay_step():
    lr, wd = 0.3, 0.1
    w0, w1, model0, train, _ = _one_full_batch_step({"lr": lr, "momentum": 0.0, "weight_decay": wd})
    g = _manual_grad(model0.train(), F.cross_entropy(model0(train.x), train.y))
    torch.testing.assert_close(w1, w0 - lr * (g + wd * w0), rtol=1e-5, atol=1e-7)


def test_adam_step_matches_torch_adam():
    lr, wd = 1e-2, 1e-3
    w0, w1, model0, train, _ = _one_full_batch_step(
        {"optimizer": "adam", "lr": lr, "weight_decay": wd}
    )
    opt = torch.optim.Adam(model0.parameters(), lr=lr, weight_decay=wd)
    F.cross_entropy(model0.train()(train.x), train.y).backward()
    opt.step()
    # fit saw the batch in shuffled order: sums differ in the last bits
    torch.testing.assert_close(w1, _flat(model0), rtol=1e-5, atol=1e-7)
    # first Adam step moves every weight with a nonzero gradient by about lr
    moved = (w1 - w0).abs()
    assert float(moved.max()) == pytest.approx(lr, rel=1e-3)


def test_build_optimizer_applies_the_options():
    params = list(_mlp().parameters())
    sgd = build_optimizer(
        params, TrainConfig(lr=0.2, momentum=0.8, nesterov=True, weight_decay=5e-4)
    )
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.2,
        0.8,
        True,
        5e-4,
    )
    adam = build_optimizer(params, TrainConfig(optimizer="adam", weight_decay=1e-4))
    assert isinstance(adam, torch.optim.Adam)
    assert adam.param_groups[0]["lr"] == 1e-3 and adam.param_groups[0]["weight_decay"] == 1e-4


def test_momentum_is_applied_across_steps():
    """Two steps of heavy-ball SGD differ from plain SGD; fit's result matches torch's."""
    train = _images(24, 0)
    config = TrainConfig(epochs=2, batch_size=24, lr=0.1, momentum=0.9)
    model, ref = _mlp(), _mlp()
    fit(model, train, None, K, config)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref.train()
    for _ in range(2):
        opt.zero_grad()
        # fit shuffles the batch; the mean loss over the full batch does not depend on order
        F.cross_entropy(ref(train.x), train.y).backward()
        opt.step()
    torch.testing.assert_close(_flat(model), _flat(ref), rtol=1e-5, atol=1e-6)


def test_gradient_clipping_bounds_the_step():
    lr, tau = 1.0, 1e-3
    w0, w1, *_ = _one_full_batch_step({"lr": lr, "momentum": 0.0, "clip": tau})
    assert float((w1 - w0).norm()) == pytest.approx(lr * tau, rel=1e-4)


def test_fisher_regulariser_is_added_to_the_loss():
    lr, beta, alpha, m = 0.1, 50.0, 1e-3, 4
    w0, w1, model0, train, stats = _one_full_batch_step(
        {
            "lr": lr,
            "momentum": 0.0,
            "fisher_reg": True,
            "reg_beta": beta,
            "reg_alpha": alpha,
            "reg_subbatches": m,
            "dtype": "float64",
        },
    )
    # fit shuffles the batch with its generator: redo the permutation it drew
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    x, y = train.x[perm].double(), train.y[perm]
    model0.double()
    model0.train()
    loss = F.cross_entropy(model0(x), y)
    penalty = fisher_penalty(model0, x, y, alpha=alpha, subbatches=m)
    assert stats.reg == pytest.approx(float(penalty.value.detach()), rel=1e-9)
    total = float((loss + beta * penalty.value).detach())
    assert stats.objective == pytest.approx(total, rel=1e-12)
    params = list(model0.parameters())
    g_loss = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    g_reg = torch.cat([g.reshape(-1) for g in torch.autograd.grad(penalty.value, params)])
    torch.testing.assert_close(w1, w0 - lr * (g_loss + beta * g_reg), rtol=1e-10, atol=1e-12)
    assert float((beta * g_reg).norm()) > 1e-3 * float(g_loss.norm())  # it made a difference


def test_fisher_regulariser_trains_a_batchnorm_cnn_with_augmentation():
    config = TrainConfig(
        epochs=2, batch_size=10, augment="crop4-flip", fisher_reg=True, reg_subbatches=3, clip=1.0
    )
    result = fit(_cnn_bn(), _images(25, 0), _images(10, 1), K, config)
    assert all(s.reg is not None for s in result.history)


def test_schedule_and_log_every():
    config = TrainConfig(lr=0.1, schedule="step", milestones=[2, 4], epochs=7, log_every=3)
    result = fit(_mlp(), _images(20, 0), None, K, config)
    assert [s.epoch for s in result.history] == [3, 6, 7]
    assert [s.lr for s in result.history] == [lr_at(config, e - 1) for e in (3, 6, 7)]
    assert result.test_acc is None and result.gap_acc is None and result.gap_loss is None
    cosine = TrainConfig(lr=0.1, schedule="cosine", epochs=4)
    lrs = [s.lr for s in fit(_mlp(), _images(20, 0), None, K, cosine).history]
    assert lrs == [lr_at(cosine, e) for e in range(4)]


def test_float64_training():
    model = _mlp()
    fit(model, _images(20, 0), None, K, TrainConfig(epochs=1, dtype="float64"))
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_bad_inputs_are_usage_errors():
    train = _images(20, 0)
    with pytest.raises(UsageError, match=r"training labels must lie in \[0, 2\)"):
        fit(_mlp(), train, None, 2, TrainConfig(epochs=1))
    flat = Split(train.x.flatten(1), train.y)
    with pytest.raises(UsageError, match="needs image inputs"):
        fit(_mlp(), flat, None, K, TrainConfig(epochs=1, augment="flip"))
    bad_test = Split(train.x, train.y + 5)
    with pytest.raises(UsageError, match="test labels"):
        fit(_mlp(), train, bad_test, K, TrainConfig(epochs=1))


def test_divergence_is_reported():
    train = Split(_images(20, 0).x * 1e30, _images(20, 0).y)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, K))
    with pytest.raises(FlatcliError, match="training diverged: the objective is nan"):
        fit(linear, train, None, K, TrainConfig(epochs=3, lr=1e30))
