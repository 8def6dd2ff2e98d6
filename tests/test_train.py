"""kd/train.py's epoch and step on generated data: what the step minimises, what it leaves alone."""
import contextlib
import functools
import json
from types import SimpleNamespace

import pytest
import torch

from helpers import optimization, train_loader
import kd.distributed
from kd.data import DeviceLoader, load_split, normalize
from kd.errors import UserError
from kd.losses import ce_loss
from kd.methods import fitnet
from kd.methods.kd import kd_loss
from kd.models import build_student, build_teacher
from kd.inference import predict
from kd.record import Record
from kd.optim import make_optimization, warmup_cosine
from kd.train import Step, train_one_epoch, train_step

CPU = torch.device("cpu")


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)
    assert warmup_cosine(0, 0, 100) == pytest.approx(1.0)


def test_the_step_minimises_exactly_the_loss_function(fake_data):
    """train_step's loss is kd_loss of the student's logits and the teacher's, and its update is
    the SGD step on that loss's gradient."""
    torch.manual_seed(0)
    teacher, student = build_teacher(32).eval().requires_grad_(False), build_student()
    twin = build_student()
    twin.load_state_dict(student.state_dict())
    images, labels, keys = next(iter(train_loader(fake_data)))
    loss_fn = functools.partial(kd_loss, alpha=0.3, T=2.0)
    calls = []
    spy = lambda *a: calls.append(a) or loss_fn(*a)
    torch.manual_seed(1)  # the same dropout mask in both students
    online = lambda images, keys: teacher(images)
    step = Step(student, online, spy, optimization(student, 1))
    loss, logits, terms = train_step(step, images, labels, keys)

    assert len(calls) == 1 and calls[0][2] is labels
    with torch.no_grad():
        teacher_logits = teacher(images)
    assert torch.equal(calls[0][1], teacher_logits)
    twin.train()
    torch.manual_seed(1)
    expected, expected_terms = loss_fn(twin(images), teacher_logits, labels)
    assert torch.equal(loss, expected) and terms.keys() == {"ce", "kd"}
    assert torch.equal(terms["kd"], expected_terms["kd"])
    expected.backward()
    manual = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    manual.step()
    for (name, ours), theirs in zip(student.named_parameters(), twin.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6), name


def test_kd_epoch_trains_the_student_and_never_touches_the_teacher(fake_data):
    teacher, student = build_teacher(32), build_student()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    loader = train_loader(fake_data, batch_size=25, n_images=100)
    loss_fn = functools.partial(kd_loss, alpha=0.5, T=4.0)
    teacher.eval().requires_grad_(False)
    step = Step(student, lambda images, keys: teacher(images), loss_fn,
                optimization(student, len(loader), 2 / len(loader)))
    stats = train_one_epoch(step, loader, 1)
    for k, v in teacher.state_dict().items():  # weights and BatchNorm running stats alike
        assert torch.equal(v, teacher_before[k]), k
    assert not teacher.training
    bn_mean = "features.0.1.running_mean"
    assert not torch.equal(student.state_dict()[bn_mean], student_before[bn_mean])
    assert list(stats) == ["lr", "train_loss", "train_top1", "train_ce", "train_kd",
                           "epoch_time_s", "train_img_per_s"]
    assert stats["train_loss"] == pytest.approx(0.5 * stats["train_ce"] + 0.5 * stats["train_kd"],
                                                rel=1e-4)


def test_predict_covers_every_image_in_order(fake_data):
    split = load_split(fake_data, train=False)
    model = build_student().eval()
    logits = predict(model, DeviceLoader(split, 30, CPU, train=False), contextlib.nullcontext)
    with torch.no_grad():
        expected = model(normalize(split.images))
    assert logits.shape == (100, 100) and logits.dtype == torch.float32
    assert torch.allclose(logits, expected, atol=1e-4)


class NaNAtCall(torch.nn.Module):
    """A linear classifier whose output turns NaN from its nan_from-th call on."""

    def __init__(self, nan_from: int):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 100)
        self.calls, self.nan_from = 0, nan_from

    def forward(self, x):
        self.calls += 1
        out = self.linear(x.flatten(1))
        return out * float("nan") if self.calls >= self.nan_from else out


def test_nan_loss_stops_with_epoch_and_step(fake_data):
    model, loader = NaNAtCall(nan_from=3), train_loader(fake_data)
    with pytest.raises(UserError, match="NaN or infinite at epoch 7, step 3"):
        train_one_epoch(Step(model, None, ce_loss, optimization(model, len(loader))), loader,
                        epoch=7)


@pytest.mark.filterwarnings("ignore:.*GradScaler is enabled, but CUDA is not available")
@pytest.mark.parametrize("amp,amp_dtype,fused", [(True, "fp16", False), (False, "fp16", True)])
def test_fused_sgd_only_without_the_fp16_scaler(amp, amp_dtype, fused):
    """Fused SGD leaves its momentum uninitialised when the scaler skips the first step."""
    args = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=0.0, warmup_epochs=0.0, epochs=1,
                           amp=amp, amp_dtype=amp_dtype)
    model = torch.nn.Linear(4, 2)  # CPU parameters: fused SGD exists on CPU too
    opt = make_optimization(args, model, 10, torch.device("cuda"))  # the decision, not a GPU
    assert opt.optimizer.defaults["fused"] is fused


def test_feature_step_trains_student_and_connector_never_the_teacher(fake_data):
    """A FitNet step: the regressor and the student learn from the hint, the teacher's weights
    and BatchNorm statistics stay as they were."""
    torch.manual_seed(0)
    teacher, student = build_teacher(32).eval().requires_grad_(False), build_student()
    connector = fitnet.connector(SimpleNamespace(hint_stage=2), student, teacher, None)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    connector_before = {k: v.clone() for k, v in connector.state_dict().items()}
    loader = train_loader(fake_data, batch_size=25, n_images=50)
    opt = optimization(torch.nn.ModuleList([student, connector]), len(loader))
    loss_fn = functools.partial(fitnet.fitnet_objective, ce_weight=1.0, hint_weight=100.0)
    step = Step(student, lambda images, keys: teacher(images), loss_fn, opt, connector)
    stats = train_one_epoch(step, loader, 1)
    assert stats["train_hint"] > 0 and "train_ce" in stats
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    for k in ("conv.weight", "bn.weight", "bn.running_mean"):
        assert not torch.equal(connector.state_dict()[k], connector_before[k]), k
    assert connector.training and not teacher.training


def test_a_blown_up_run_is_named_in_the_console_and_summary(tmp_path, capsys):
    """kd.train.Record at the end of each epoch: a test NLL over 10x a uniform prediction's is
    a warning when it happens and the run's status in summary.json."""
    args = SimpleNamespace(out_dir=str(tmp_path), val_size=0, save_every=1, epochs=2,
                           resume=False, overwrite=False)
    record = Record(args, {"arch": "mobilenet_v3_small"}, is_main=True)
    record.begin()
    for epoch, nll in ((1, 4.2), (2, 3.3e13)):
        row = {"epoch": epoch, "lr": 0.1, "train_loss": 2.0, "test_loss": nll, "test_top1": 1.0,
               "test_top5": 5.0, "epoch_time_s": 1.0, "train_img_per_s": 10.0}
        record.end_epoch(row, {"model": {}}, {"epoch": epoch})
    summary = record.finish()
    err = capsys.readouterr().err
    assert "warning: epoch 2: the test NLL is 3.3e+13" in err and "epoch 1:" not in err
    assert summary["status"] == "blown up" and summary["blown_up_epochs"] == [2]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "blown up"


def test_an_init_stages_gradients_are_averaged_over_the_ranks(monkeypatch):
    """kd.distributed.average_gradients on rank 0 of 2, the all-reduce stood in for (it adds
    rank 1's gradients, three times rank 0's): every gradient ends as the ranks' mean, in its
    own shape; a parameter without a gradient keeps none."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4)),
              torch.nn.Parameter(torch.randn(2))]
    for p in params[:2]:  # whole numbers: the sums and halves below are exact
        p.grad = torch.randint(-8, 8, p.shape).float()
    own = [p.grad.clone() for p in params[:2]]
    rank_1 = torch.cat([3 * g.reshape(-1) for g in own])
    monkeypatch.setattr(kd.distributed.dist, "all_reduce", lambda flat: flat.add_(rank_1))
    kd.distributed.average_gradients(params, kd.distributed.World(0, 0, 2))
    assert all(torch.equal(p.grad, 2 * g) for p, g in zip(params, own))
    assert params[2].grad is None
