import urllib.error

import pytest
import torch
import torchvision
from torchvision.models import resnet50

from kd.errors import UserError
from kd.models import build_student, build_teacher


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_student_outputs_100_logits(stem):
    model = build_student(stem).eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 100)


@pytest.mark.parametrize("stem,side", [("cifar", 4), ("imagenet", 1)])
def test_student_final_feature_map(stem, side):
    features = build_student(stem).features.eval()
    assert features(torch.randn(1, 3, 32, 32)).shape[-2:] == (side, side)


@pytest.mark.parametrize("img_size", [32, 64, 128, 224])
def test_teacher_outputs_100_logits_at_any_size(img_size):
    teacher = build_teacher(img_size).eval()
    seen = []
    teacher.net.conv1.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[-1]))
    with torch.inference_mode():
        assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert seen == [img_size]


def test_teacher_loads_local_imagenet_weights(tmp_path):
    net = resnet50()
    torch.save(net.state_dict(), tmp_path / "r50.pth")
    teacher = build_teacher(32, pretrained="imagenet", weights_path=str(tmp_path / "r50.pth"))
    assert torch.equal(teacher.net.conv1.weight, net.conv1.weight)
    assert teacher.net.fc.out_features == 100


def test_offline_imagenet_download_names_the_way_out(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="--weights.*--pretrained none"):
        build_teacher(32, pretrained="imagenet")


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(build_student().state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="do not fit"):
        build_teacher(32, pretrained="imagenet", weights_path=str(tmp_path / "wrong.pth"))


def test_classifier_heads_and_upsampling_under_autocast():
    """The head computes float32 logits under bf16 autocast; the teacher upsamples in bf16."""
    student, teacher = build_student().eval(), build_teacher(64).eval()
    seen = []
    teacher.net.conv1.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].dtype))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = student.classifier[:-1](student.avgpool(student.features(x)).flatten(1))
        logits = student(x)
        assert teacher(x).dtype == torch.float32 and seen == [torch.bfloat16]
    assert logits.dtype == torch.float32
    head = student.classifier[-1]
    assert torch.allclose(logits, features.float() @ head.weight.T + head.bias, atol=1e-5)
    assert list(student.state_dict())[-2:] == ["classifier.3.weight", "classifier.3.bias"]
