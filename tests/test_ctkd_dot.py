"""CTKD (kd/methods/ctkd.py) against the authors' zhengli97/CTKD, and DOT (kd.optim.DOT,
--optimizer dot) against mdistiller's engine/dot.py: their formulas written out here, and exact
resume through distill_student.py."""
import csv
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kd.train
from helpers import REPO, assert_one_line_error, run_in_process
from kd.checkpoint import load_checkpoint
from kd.errors import UserError
from kd.methods import METHODS
from kd.methods.ctkd import (GlobalTemperature, connector, ctkd_objective, grad_reverse,
                             grl_lambda, loss_at)
from kd.methods.kd import kd_loss
from kd.optim import DOT, DISTILLATION, TASK, make_optimization, split_loss

CPU = torch.device("cpu")


# --- the references, as their code reads --------------------------------------------------

class ReferenceGRL(torch.autograd.Function):
    """CTKD's models/temp_global.py GradientReversalFunction: identity, gradient * lambda_."""

    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads):
        return grads.new_tensor(ctx.lambda_) * grads, None


class ReferenceCosineDecay:
    """CTKD's train_student.py CosineDecay."""

    def __init__(self, max_value, min_value, num_loops):
        self._max_value, self._min_value, self._num_loops = max_value, min_value, num_loops

    def get_value(self, i):
        if i < 0:
            i = 0
        if i >= self._num_loops:
            i = self._num_loops
        value = (math.cos(i * math.pi / self._num_loops) + 1.0) * 0.5
        return value * (self._max_value - self._min_value) + self._min_value


def kl_div_sum(input, target):
    """F.kl_div(input, target, reduction='sum') as the reference's torch 1.11 computes it and its
    gradients: 0 where the target is 0 (today's xlogy form gives a NaN gradient there, which
    DKD's target mask, softmax(z / T - 1000 * gt), meets once T is learned)."""
    positive = target > 0
    safe = torch.where(positive, target, torch.ones_like(target))
    return torch.where(positive, target * (safe.log() - input), torch.zeros_like(target)).sum()


def reference_ctkd(logit_s, logit_t, target, global_t, decay_value, base, gamma, alpha, beta):
    """helper/loops.py train_distill with Global_T (t_start 1, t_end 20): loss = gamma * CE +
    alpha * DistillKL(T) + beta * (DKDloss(T), dkd_alpha 1, dkd_beta 2)."""
    temp = 1.0 + 20.0 * torch.sigmoid(ReferenceGRL.apply(global_t, decay_value))
    loss_cls = nn.CrossEntropyLoss()(logit_s, target)
    loss_div = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(logit_s / temp, dim=1),
                                                    F.softmax(logit_t / temp, dim=1)) * temp * temp
    if base == "kd":
        return gamma * loss_cls + alpha * loss_div
    gt = torch.zeros_like(logit_s).scatter_(1, target.unsqueeze(1), 1).bool()
    other = ~gt
    cat = lambda p: torch.cat([(p * gt).sum(1, keepdims=True), (p * other).sum(1, keepdims=True)],
                              dim=1)
    pred_s, pred_t = (cat(F.softmax(z / temp, dim=1)) for z in (logit_s, logit_t))
    tckd = kl_div_sum(torch.log(pred_s), pred_t) * temp ** 2 / target.shape[0]
    nckd = kl_div_sum(F.log_softmax(logit_s / temp - 1000.0 * gt, dim=1),
                      F.softmax(logit_t / temp - 1000.0 * gt, dim=1)) * temp ** 2 / target.shape[0]
    return gamma * loss_cls + alpha * loss_div + beta * (1.0 * tckd + 2.0 * nckd)


def reference_dot(params, d_p_list, momentum_buffer_list, kd_grad_buffer, kd_momentum_buffer,
                  kd_params, *, weight_decay, momentum, momentum_kd, lr):
    """mdistiller's engine/dot.py dot() (dampening 0)."""
    check_in = lambda t, items: any(t is i for i in items)
    for i, param in enumerate(params):
        d_p = d_p_list[i]
        if weight_decay != 0:
            d_p = d_p.add(param, alpha=weight_decay)
        buf = momentum_buffer_list[i]
        if buf is None:
            buf = torch.clone(d_p).detach()
            momentum_buffer_list[i] = buf
        elif check_in(param, kd_params):
            buf.mul_(momentum).add_(d_p)
        else:
            buf.mul_((momentum_kd + momentum) / 2.).add_(d_p)
        param.add_(buf, alpha=-lr)
    for i, (d_p, buf, p) in enumerate(zip(kd_grad_buffer, kd_momentum_buffer, kd_params)):
        if buf is None:
            buf = torch.clone(d_p).detach()
            kd_momentum_buffer[i] = buf
        elif check_in(p, params):
            buf.mul_(momentum_kd).add_(d_p)
        else:
            if weight_decay != 0:
                d_p = d_p.add(p, alpha=weight_decay)
            buf.mul_((momentum_kd + momentum) / 2.).add_(d_p)
        p.add_(buf, alpha=-lr)


# --- CTKD ---------------------------------------------------------------------------------

def ctkd_args(**changed):
    flags = dict(ctkd_loss="kd", ctkd_ce_weight=0.1, ctkd_weight=0.9, ctkd_t_min=1.0,
                 ctkd_t_max=21.0, ctkd_lambda_min=0.0, ctkd_lambda_max=1.0, ctkd_lambda_epochs=10,
                 logit_std=False)
    return SimpleNamespace(**{**flags, **changed})


def logits(seed=0, n=8, classes=10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, classes, generator=g, dtype=torch.float64),
            3 * torch.randn(n, classes, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


@pytest.mark.parametrize("base,weights", [("kd", (0.1, 0.9, 0.0)), ("dkd", (1.0, 0.0, 1.0))])
def test_ctkd_loss_and_gradients_are_the_references(base, weights):
    """float64: the value and the gradients (student logits and the temperature's parameter) of
    our objective at epoch 3, against loops.py's loss at the script's curriculum (decay_max 0,
    decay_min -1, 10 loops), with its DKD command's weights for dkd."""
    s, t, y = logits()
    gamma, alpha, beta = weights
    args = ctkd_args(ctkd_loss=base, ctkd_ce_weight=gamma, ctkd_weight=alpha or beta)
    module = connector(args, None, None, None).double()
    with torch.no_grad():
        module.global_T.fill_(0.3)
    ours_s = s.clone().requires_grad_()
    loss, terms = loss_at(args, 3)(ours_s, t, y, module(None, y))
    loss.backward()

    ref_s, global_t = s.clone().requires_grad_(), torch.tensor(0.3, dtype=torch.float64,
                                                               requires_grad=True)
    decay = ReferenceCosineDecay(max_value=0, min_value=-1, num_loops=10).get_value(3)
    expected = reference_ctkd(ref_s, t, y, global_t, decay, base, gamma, alpha, beta)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(ours_s.grad, ref_s.grad, rtol=1e-10, atol=1e-14)
    # lambda reaches the reversal as a float32 tensor (loss_at's): equal to float32 rounding
    assert module.global_T.grad.item() == pytest.approx(global_t.grad.item(), rel=1e-6)
    assert module.global_T.grad.item() != 0
    names = ["ce", "kd", "temperature"] if base == "kd" else ["ce", "tckd", "nckd", "temperature"]
    assert list(terms) == names
    assert terms["temperature"].item() == pytest.approx(1 + 20 / (1 + math.exp(-0.3)))
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, y).item())


def test_the_reversal_passes_the_temperature_on_and_scales_its_gradient_by_minus_lambda():
    x = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    y = grad_reverse(x, torch.tensor(0.3))
    assert torch.equal(y.detach(), x.detach())
    (y * 4).backward()
    assert x.grad.item() == pytest.approx(-0.3 * 4)

    s, t, labels = logits(1)
    module = GlobalTemperature(1.0, 21.0).double()

    def theta_grad(strength):
        module.zero_grad()
        loss, _ = ctkd_objective(s, t, labels, module(None, labels), "kd", 0.1, 0.9,
                                 torch.tensor(strength, dtype=torch.float64))
        loss.backward()
        return loss.item(), module.global_T.grad.item()
    plain_loss, plain = theta_grad(-1.0)  # -(-1): the gradient itself
    reversed_loss, reversed_ = theta_grad(0.3)
    assert reversed_loss == plain_loss and plain != 0
    assert reversed_ == pytest.approx(-0.3 * plain, rel=1e-12)


def test_the_curriculum_is_the_references_cosine_decay():
    reference = ReferenceCosineDecay(max_value=0, min_value=-1, num_loops=10)  # the script's
    for epoch in (0, 1, 2, 5, 9, 10, 11, 120):
        assert grl_lambda(epoch, 0.0, 1.0, 10) == pytest.approx(-reference.get_value(epoch),
                                                                abs=1e-15)
        strength = loss_at(ctkd_args(), epoch).keywords["grl_strength"]
        assert isinstance(strength, torch.Tensor) and strength.item() == pytest.approx(
            grl_lambda(epoch, 0.0, 1.0, 10))
    assert grl_lambda(1, 0.0, 1.0, 10) == pytest.approx(0.0245, abs=1e-4)
    other = ReferenceCosineDecay(max_value=-0.2, min_value=-2, num_loops=4)
    assert grl_lambda(3, 0.2, 2.0, 4) == pytest.approx(-other.get_value(3))


def test_the_temperature_stays_in_its_range_and_starts_where_the_references_does():
    module = GlobalTemperature(1.0, 21.0)
    assert module(None, None).item() == pytest.approx(1 + 20 * torch.sigmoid(torch.tensor(1.0)))
    for theta in (-50.0, -3.0, 0.0, 3.0, 50.0):
        with torch.no_grad():
            module.global_T.fill_(theta)
        assert 1.0 <= module(None, None).item() <= 21.0
    assert list(module.state_dict()) == ["global_T"]
    with pytest.raises(UserError, match="--ctkd_t_max 2 must exceed --ctkd_t_min 3"):
        connector(ctkd_args(ctkd_t_min=3.0, ctkd_t_max=2.0), None, None, None)
    method = METHODS["ctkd"]
    assert method.logits_only and not method.online and method.connector is connector


# --- DOT ----------------------------------------------------------------------------------

def test_a_dot_step_is_mdistillers_update_rule():
    """Three steps in float64 of parameters with both gradients, only the distillation's (a
    connector's) and only the task's, against dot() as mdistiller writes it."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    ours = [nn.Parameter(p.clone()) for p in start]
    theirs = [p.clone() for p in start]
    settings = dict(lr=0.1, momentum=0.9, delta=0.075, weight_decay=5e-4)
    dot = DOT(ours, **settings)
    task_buffers, kd_buffers = [None, None], [None, None]  # theirs: (both, task) and (both, kd)
    for _ in range(3):
        task_grads = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
        kd_grads = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
        ours[0].grad, ours[2].grad, ours[1].grad = task_grads[0], task_grads[1], None
        dot.distillation_grads = {ours[0]: kd_grads[0], ours[1]: kd_grads[1]}
        dot.step()
        reference_dot([theirs[0], theirs[2]], task_grads, task_buffers, kd_grads, kd_buffers,
                      [theirs[0], theirs[1]], weight_decay=5e-4, momentum=0.9 - 0.075,
                      momentum_kd=0.9 + 0.075, lr=0.1)
        for p, q in zip(ours, theirs):
            assert torch.allclose(p.detach(), q, rtol=0, atol=1e-15)
    assert torch.allclose(dot.state[ours[0]][TASK], task_buffers[0], rtol=0, atol=1e-15)
    assert torch.allclose(dot.state[ours[0]][DISTILLATION], kd_buffers[0], rtol=0, atol=1e-15)
    assert torch.allclose(dot.state[ours[1]][DISTILLATION], kd_buffers[1], rtol=0, atol=1e-15)
    assert DISTILLATION not in dot.state[ours[2]] and TASK not in dot.state[ours[1]]
    assert dot.distillation_grads == {}


def test_the_split_gives_the_gradients_of_separate_backward_passes():
    """DOT.backward on kd's loss, and on CTKD's with its temperature (a parameter only the
    distillation reaches): the task gradient is alpha * CE's, the distillation gradient
    (1 - alpha) * T^2 KL's, as two losses backpropagated apart."""
    torch.manual_seed(0)
    model = nn.Linear(6, 10).double()
    temperature = GlobalTemperature(1.0, 21.0).double()
    x, t, y = torch.randn(8, 6, dtype=torch.float64), *logits(2)[1:]
    for objective in ("kd", "ctkd"):
        params = [*model.parameters(), temperature.global_T]
        dot = DOT(params, lr=0.1, momentum=0.9, delta=0.075)
        if objective == "kd":
            run = lambda: kd_loss(model(x), t, y, alpha=0.3, T=4.0)
        else:
            run = lambda: ctkd_objective(model(x), t, y, temperature(None, y), "kd", 0.3, 0.7,
                                         torch.tensor(0.5))
        loss, terms = run()
        model.zero_grad(set_to_none=True)
        dot.backward(loss, terms)
        task_grads = [p.grad for p in params]
        loss, terms = run()
        task, distillation = 0.3 * terms["ce"], loss - 0.3 * terms["ce"]
        expected_kd = torch.autograd.grad(distillation, params, retain_graph=True,
                                          allow_unused=True)
        expected_task = torch.autograd.grad(task, params, allow_unused=True)
        for p, ours, expected in zip(params, task_grads, expected_task):
            assert (ours is None) == (expected is None)
            assert ours is None or torch.allclose(ours, expected, rtol=1e-12, atol=1e-15)
        for p, expected in zip(params, expected_kd):
            ours = dot.distillation_grads.get(p)
            assert (ours is None) == (expected is None)
            assert ours is None or torch.allclose(ours, expected, rtol=1e-12, atol=1e-15)
        assert task_grads[-1] is None and (objective == "kd") == (expected_kd[-1] is None)
    loss, terms = run()
    task, distillation = split_loss(loss, terms["ce"])
    assert torch.allclose(task, 0.3 * terms["ce"]) and torch.allclose(task + distillation, loss)


def test_dot_refuses_a_loss_without_ce_and_the_fp16_scaler():
    model = nn.Linear(3, 2)
    dot = DOT(model.parameters(), lr=0.1, momentum=0.9, delta=0.075)
    with pytest.raises(UserError, match="hard-label CE term 'ce'"):
        dot.backward(model(torch.ones(1, 3)).sum(), {"kd": torch.tensor(0.0)})
    args = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_epochs=0, epochs=1,
                           amp=True, amp_dtype="fp16")
    with pytest.raises(UserError, match="--amp_dtype fp16"):
        make_optimization(args, model, 1, torch.device("cuda"), dot_delta=0.075)
    assert isinstance(make_optimization(args, model, 1, CPU, dot_delta=0.075).optimizer, DOT)
    with pytest.raises(ValueError):
        DOT(model.parameters(), lr=0.1, momentum=0.9, delta=0.1)


@pytest.mark.parametrize("argv,phrase", [
    (["--dot_delta", "0.05"], "--dot_delta is read by --optimizer dot, not by sgd"),
    (["--optimizer", "dot", "--dot_delta", "0.2"], "momenta 0.7 and 1.1"),
    (["--optimizer", "dot", "--momentum", "0.05"], "momenta -0.025 and 0.125"),
])
def test_bad_dot_settings_are_one_line(argv, phrase, in_process):
    assert_one_line_error(in_process("distill_student.py", argv), phrase)


def test_dot_under_torchrun_is_refused(in_process, monkeypatch):
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert_one_line_error(in_process("distill_student.py", ["--optimizer", "dot"]),
                          "--optimizer dot runs in one process")


# --- exact resume -------------------------------------------------------------------------

def distill_cmd(out_dir, data, teacher, *extra):
    return [sys.executable, str(REPO / "distill_student.py"), "--out_dir", str(out_dir),
            "--teacher_ckpt", str(teacher), "--data_dir", data, "--no-download", "--epochs", "2",
            "--batch_size", "100", "--eval_batch_size", "100", "--lr", "0.02", *extra]


def run_to_end(cmd):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        result = run_in_process(cmd[1], cmd[2:], mp)
    assert result.returncode == 0, result.stderr[-2000:]


def log_rows(folder):
    with open(folder / "log.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "train_img_per_s")}
                for row in csv.DictReader(f)]


def assert_equal_tensors(ours, theirs):
    if isinstance(ours, torch.Tensor):
        assert torch.equal(ours, theirs)
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert_equal_tensors(ours[key], theirs[key])
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_equal_tensors(a, b)
    else:
        assert ours == theirs


@pytest.mark.slow  # two runs of two epochs each, in-process
def test_stopped_after_epoch_1_and_resumed_is_the_uninterrupted_run(
        runs_root, fake_data, tmp_path, monkeypatch):
    """As tests/test_resume.py's connectors: a run stopped after its first epoch's last.pt and
    resumed ends bitwise where the uninterrupted one does: student, CTKD's temperature, and the
    optimizer's state, DOT's second momentum included (CTKD under DOT: the student's parameters
    have both buffers, the temperature the distillation's alone; DOT steps any method's student
    the same way)."""
    teacher = runs_root / "teacher" / "best.pt"
    flags = ["--method", "ctkd", "--optimizer", "dot", "--val_size", "200"]  # 1 step an epoch
    reference_run, folder = tmp_path / "reference", tmp_path / "run"
    run_to_end(distill_cmd(reference_run, fake_data, teacher, *flags))
    with monkeypatch.context() as mp:  # a stop signal, as seen after the first epoch's write
        mp.setattr(kd.train, "stop_requested", lambda: (folder / "last.pt").exists())
        cmd = distill_cmd(folder, fake_data, teacher, *flags)
        stopped = run_in_process(cmd[1], cmd[2:], mp)
        assert stopped.returncode != 0 and "--resume" in stopped.stderr
    assert load_checkpoint(str(folder / "last.pt"))["epoch"] == 1
    run_to_end(distill_cmd(folder, fake_data, teacher, *flags, "--resume"))

    assert log_rows(folder) == log_rows(reference_run)
    ours, theirs = (torch.load(f / "last.pt", weights_only=True) for f in (folder, reference_run))
    for key in ("model", "optimizer", "scheduler"):
        assert_equal_tensors(ours[key], theirs[key])
    buffers = [set(s) for s in ours["optimizer"]["state"].values()]  # by parameter, in order
    assert buffers == [{TASK, DISTILLATION}] * (len(buffers) - 1) + [{DISTILLATION}]
    assert list(ours["connector"]) == ["global_T"]
    assert_equal_tensors(ours["connector"], theirs["connector"])
    assert 1 < float(log_rows(folder)[-1]["train_temperature"]) < 21
