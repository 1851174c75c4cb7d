"""The model registry: names, published parameter counts, forward shapes."""

import pytest
import torch

from kd_optuna.errors import KdOptunaError
from kd_optuna.models import MODEL_NAMES, UnknownModel, build_model

# Parameter counts for 100 classes as published with RepDistiller / CRD (Tian et al. 2020).
PUBLISHED_MILLIONS = {
    "resnet20": 0.28,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "ResNet50": 23.71,
}

ZOO = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet18", "ResNet50",
]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_parameter_count_matches_published_figure(name):
    millions = n_params(build_model(name, num_classes=100)) / 1e6
    assert millions == pytest.approx(PUBLISHED_MILLIONS[name], rel=0.02)


def test_registry_holds_the_whole_zoo_and_the_extras():
    for name in ZOO + ["digits_teacher", "digits_student", "resnet18", "resnet50", "mobilenet_v2", "vit_tiny_cifar"]:
        assert name in MODEL_NAMES


def test_digits_models_have_the_advertised_sizes():
    teacher, student = build_model("digits_teacher", 10), build_model("digits_student", 10)
    assert 80_000 <= n_params(teacher) <= 120_000
    assert 12_000 <= n_params(student) <= 18_000
    x = torch.randn(4, 1, 16, 16)
    assert teacher(x).shape == student(x).shape == (4, 10)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "ShuffleV2", "MobileNetV2"])
def test_cifar_forward_gives_one_logit_row_per_image(name):
    model = build_model(name, num_classes=7).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_class_count_sets_the_classifier_width():
    assert build_model("resnet8", 10).fc.out_features == 10
    assert build_model("resnet8", 100).fc.out_features == 100


def test_unknown_name_lists_known_models():
    with pytest.raises(UnknownModel) as info:
        build_model("resnet9000", 10)
    assert isinstance(info.value, KdOptunaError)
    assert "resnet9000" in str(info.value) and "resnet32x4" in str(info.value)


def test_bad_class_count_is_a_user_error():
    with pytest.raises(KdOptunaError):
        build_model("resnet8", 0)
