"""The two-stage baselines (kd/methods/ab.py, ft.py, fsp.py) and the init stage they share
(kd.train.InitStage, RepDistiller's --init_epochs): each loss against RepDistiller's formula
written out (float64 values and gradients), FT's connector against its Paraphraser and
Translator, and the stage through distill_student.py: what trains in it and what does not, its
log, and an exact resume from inside it."""
import csv
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kd.train
from helpers import run_in_process
from kd.methods import ab, fsp, ft

G = lambda seed: torch.Generator().manual_seed(seed)
B = 6
SHAPES = [(8, 8, 8), (16, 4, 4), (32, 2, 2), (64, 2, 2)]


def maps(seed: int, shapes: list[tuple]) -> list[torch.Tensor]:
    return [torch.randn(B, *s, generator=G(seed + i), dtype=torch.float64)
            for i, s in enumerate(shapes)]


def assert_same(ours_fn, reference_fn, student: list[torch.Tensor], teacher: list[torch.Tensor]):
    """Equal values and gradients with respect to the student's inputs, in float64."""
    def value_and_grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in student]
        value = fn(*leaves, *teacher)
        return value, torch.autograd.grad(value, leaves)
    (ours, our_grads), (reference, reference_grads) = map(value_and_grads, (ours_fn, reference_fn))
    assert ours.dtype == torch.float64 and torch.allclose(ours, reference, rtol=1e-10)
    for a, b in zip(our_grads, reference_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-15)


def reference_ab(g_s, g_t, margin=1.0):
    """AB.py's ABLoss: weights 2^(i - n + 1), criterion_alternative_l2 summed, / B, / 1000 * 3."""
    total = 0.0
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        loss = ((s + margin) ** 2 * ((s > -margin) & (t <= 0)).float()
                + (s - margin) ** 2 * ((s <= margin) & (t > 0)).float())
        total = total + 2 ** (i - len(g_s) + 1) * torch.abs(loss).sum() / B / 1000 * 3
    return total


@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_ab_is_repdistillers_activation_boundary_loss(margin):
    s, t = maps(0, SHAPES), maps(10, SHAPES)
    assert_same(lambda *m: ab.ab_loss(m[:4], m[4:], margin),
                lambda *m: reference_ab(m[:4], m[4:], margin), s, t)


def reference_ft(f_s, f_t):
    """FT.py's FactorTransfer(p1=2, p2=1): normalize(f^2.mean(1).view(B, -1)), L1 mean."""
    factor = lambda f: F.normalize(f.pow(2).mean(1).view(B, -1))
    return (factor(f_s) - factor(f_t)).abs().mean()


def test_ft_is_repdistillers_factor_transfer():
    (s,), (t,) = maps(0, [(32, 4, 4)]), maps(1, [(32, 4, 4)])
    assert_same(ft.ft_loss, reference_ft, [s], [t])


def reference_fsp(g_s, g_t):
    """FSP.py's compute_fsp (pairs pooled to the smaller size, (bot * top).mean(-1)) and
    compute_loss ((s - t)^2 .mean()), summed over the pairs."""
    def matrices(g):
        out = []
        for bot, top in zip(g, g[1:]):
            if bot.shape[2] > top.shape[2]:
                bot = F.adaptive_avg_pool2d(bot, top.shape[2])
            elif bot.shape[2] < top.shape[2]:
                top = F.adaptive_avg_pool2d(top, bot.shape[2])
            bot, top = bot.unsqueeze(1), top.unsqueeze(2)
            bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
            top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
            out.append((bot * top).mean(-1))
        return out
    return sum((s - t).pow(2).mean() for s, t in zip(matrices(g_s), matrices(g_t)))


def test_fsp_is_repdistillers_flow_matrix_loss():
    s, t = maps(0, SHAPES), maps(10, SHAPES)
    assert_same(lambda *m: fsp.fsp_loss(m[:4], m[4:]), lambda *m: reference_fsp(m[:4], m[4:]),
                s, t)


class FixedShapes:
    def __init__(self, shapes):
        self.shapes = [torch.Size(s) for s in shapes]


def test_ft_connector_is_repdistillers_paraphraser_and_translator():
    """Paraphraser(t_shape, k=0.5, use_bn=False) and Translator(s_shape, t_shape, k=0.5,
    use_bn=True) of models/util.py: 3x3 convs (transposed in the decoder), their parameters
    counted from the reference's layer list."""
    cs, ct = 24, 64
    connector = ft.FactorConnector(FixedShapes([(4, 8, 8)] * 3 + [(cs, 4, 4)]),
                                   FixedShapes([(8, 8, 8)] * 3 + [(ct, 2, 2)]))
    conv = lambda a, b: a * b * 9 + b
    mid = ct // 2
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(connector.encoder) == conv(ct, ct) + conv(ct, mid) + conv(mid, mid)
    assert count(connector.decoder) == conv(mid, mid) + conv(mid, ct) + conv(ct, ct)
    assert count(connector.translator) == (conv(cs, cs) + conv(cs, mid) + conv(mid, mid)
                                           + 2 * (cs + mid + mid))  # BatchNorm's weight, bias
    kinds = [type(m).__name__ for m in connector.decoder]
    assert kinds == ["ConvTranspose2d", "LeakyReLU"] * 3
    assert all(m.negative_slope == 0.1 for m in connector.encoder if hasattr(m, "negative_slope"))


def states(*modules) -> list[dict]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def test_fts_init_stage_is_the_paraphraser_alone():
    """FT's stage trains the paraphraser's encoder and decoder and nothing else, and puts only
    them in train mode (the student's BatchNorm statistics stay); the test below runs AB's
    through the script (FT's 150 M-parameter connector would take half a minute there)."""
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    connector = ft.FactorConnector(FixedShapes([(4, 8, 8)] * 3 + [(8, 4, 4)]),
                                   FixedShapes([(8, 8, 8)] * 3 + [(16, 2, 2)]))
    trained = {id(p) for p in ft.INIT.parameters(student, connector)}
    assert trained == {id(p) for m in (connector.encoder, connector.decoder)
                       for p in m.parameters()}
    assert ft.INIT.training(student, connector) == [connector.encoder, connector.decoder]


def ab_run(runs_root, fake_data, folder, mp, *extra):
    """distill_student.py --method ab, 2 init epochs and 1 epoch, in this process."""
    return run_in_process("distill_student.py", [
        "--out_dir", folder, "--teacher_ckpt", runs_root / "teacher" / "best.pt", "--method",
        "ab", "--init_epochs", "2", "--data_dir", fake_data, "--no-download", "--epochs", "1",
        "--batch_size", "50", "--eval_batch_size", "100", "--val_size", "200", *extra], mp)


@pytest.fixture(scope="module")
def ab_reference(runs_root, fake_data, tmp_path_factory):
    """An AB run never stopped, with the three models' states before and after its init stage."""
    folder, seen = tmp_path_factory.mktemp("ab") / "reference", {}
    real = kd.train.initialize

    def spy(args, teacher, model, connector, *rest):
        seen["before"] = states(model, teacher.module, connector)
        real(args, teacher, model, connector, *rest)
        seen["after"] = states(model, teacher.module, connector)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kd.train, "initialize", spy)
        result = ab_run(runs_root, fake_data, folder, mp)
    assert result.returncode == 0, result.stderr[-2000:]
    return SimpleNamespace(folder=folder, result=result, **seen)


def test_the_init_stage_trains_only_its_parameters(ab_reference):
    """AB's stage trains the student's feature layers and the connectors; the teacher never
    changes, nor the student's classifier. Then the main stage trains."""
    (student0, teacher0, connector0), (student1, teacher1, connector1) = (ab_reference.before,
                                                                          ab_reference.after)
    assert all(torch.equal(teacher0[k], teacher1[k]) for k in teacher0)
    assert all(torch.equal(student0[k], student1[k]) for k in student0
               if k.startswith("classifier"))
    moved = lambda before, after, prefix: {k for k in before if k.startswith(prefix)
                                           and not torch.equal(before[k], after[k])}
    assert moved(student0, student1, "features.") and moved(connector0, connector1, "")
    rows = list(csv.DictReader(open(ab_reference.folder / "init_log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[0]["init_loss"]) > 0
    assert "init_ab" in rows[0]
    assert len(list(csv.DictReader(open(ab_reference.folder / "log.csv")))) == 1
    assert "init epoch 2/2" in ab_reference.result.stdout


@pytest.mark.slow  # two runs in-process
def test_a_run_stopped_inside_the_init_stage_resumes_exactly(ab_reference, runs_root, fake_data,
                                                             tmp_path, monkeypatch):
    """Stopped after init epoch 1 of 2, then resumed: the same init_log.csv, log.csv, student
    and connector as the run that was never stopped."""
    reference, folder = ab_reference.folder, tmp_path / "run"
    with monkeypatch.context() as mp:  # a stop signal, as seen once init epoch 1 is saved
        mp.setattr(kd.train, "stop_requested", lambda: (folder / "last.pt").exists())
        stopped = ab_run(runs_root, fake_data, folder, mp)
    assert stopped.returncode != 0 and "last.pt holds init epoch 1" in stopped.stderr
    assert ab_run(runs_root, fake_data, folder, monkeypatch, "--resume").returncode == 0
    for name in ("init_log.csv", "log.csv"):
        drop = {"epoch_time_s", "train_img_per_s"}
        ours, theirs = ([{k: v for k, v in r.items() if k not in drop}
                         for r in csv.DictReader(open(f / name))] for f in (folder, reference))
        assert ours == theirs, name
    ours, theirs = (torch.load(f / "last.pt", weights_only=True) for f in (folder, reference))
    for part in ("model", "connector"):
        assert all(torch.equal(ours[part][k], theirs[part][k]) for k in theirs[part])
