"""Checkpoints: our format with metadata and hash, plain state dicts, RepDistiller's layout."""

import pytest
import torch

from kd_optuna.train.checkpoints import CheckpointError, load_model, load_state, read_checkpoint, save_checkpoint
from kd_optuna.errors import KdOptunaError
from kd_optuna.models import build_model


def bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def repdistiller_resnet8_shapes(num_classes):
    """RepDistiller's resnet8 parameter names and shapes, written out from its models/resnet.py."""
    shapes = {"conv1.weight": (16, 3, 3, 3), **bn("bn1", 16)}
    for stage, (cin, cout) in enumerate([(16, 16), (16, 32), (32, 64)], start=1):
        p = f"layer{stage}.0"
        shapes.update({f"{p}.conv1.weight": (cout, cin, 3, 3), **bn(f"{p}.bn1", cout),
                       f"{p}.conv2.weight": (cout, cout, 3, 3), **bn(f"{p}.bn2", cout)})
        if cin != cout:
            shapes.update({f"{p}.downsample.0.weight": (cout, cin, 1, 1), **bn(f"{p}.downsample.1", cout)})
    shapes.update({"fc.weight": (num_classes, 64), "fc.bias": (num_classes,)})
    return shapes


def random_state(shapes):
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(100)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(shape, generator=g) * 0.1
    return state


def test_repdistiller_ckpt_epoch_240_layout_loads_without_conversion(tmp_path):
    state = random_state(repdistiller_resnet8_shapes(100))
    path = tmp_path / "ckpt_epoch_240.pth"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.05, momentum=0.9)
    torch.save({"epoch": 240, "model": state, "best_acc": torch.tensor(72.5), "optimizer": optimizer.state_dict()}, path)
    model, meta = load_model(path, "resnet8", 100)
    assert meta is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_zoo_uses_the_fields_parameter_names():
    expected = {
        "wrn_16_2": ["block1.layer.0.convShortcut.weight", "block3.layer.1.bn2.running_var", "bn1.weight", "fc.bias"],
        "vgg8": ["block0.0.weight", "block0.0.bias", "block1.1.running_mean", "block4.1.weight", "classifier.weight"],
        "MobileNetV2": ["conv1.0.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.bias",
                        "classifier.0.weight"],
        "ShuffleV1": ["conv1.weight", "layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"],
        "ShuffleV2": ["layer1.0.conv5.weight", "layer1.3.bn3.weight", "conv2.weight", "bn2.bias", "linear.bias"],
        "resnet8x4": ["layer1.0.downsample.0.weight", "layer3.0.bn2.weight", "fc.weight"],
        "ResNet50": ["layer1.0.shortcut.0.weight", "layer4.2.conv3.weight", "layer4.2.bn3.bias", "linear.weight"],
    }
    for name, keys in expected.items():
        assert set(keys) <= set(build_model(name, 100).state_dict()), name


def test_our_checkpoint_round_trips_with_metadata(tmp_path):
    model = build_model("digits_student", 10)
    path = save_checkpoint(tmp_path / "t.pt", model, model_name="digits_student", num_classes=10,
                           dataset="digits", accuracy=0.98)
    loaded, meta = load_model(path)
    assert meta["model_name"] == "digits_student" and meta["num_classes"] == 10 and meta["dataset"] == "digits"
    assert meta["accuracy"] == 0.98 and len(meta["sha256"]) == 64 and meta["version"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert not loaded.training


def test_wrong_class_count_names_both(tmp_path):
    path = save_checkpoint(tmp_path / "t.pt", build_model("resnet8", 10), model_name="resnet8", num_classes=10,
                           dataset="cifar10", accuracy=0.9)
    with pytest.raises(CheckpointError) as info:
        load_state(path, "resnet8", 100)
    assert "resnet8 with 10 classes" in str(info.value) and "resnet8 with 100 classes" in str(info.value)


def test_plain_state_dict_of_another_architecture_names_both(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(build_model("wrn_16_1", 100).state_dict(), path)
    with pytest.raises(KdOptunaError) as info:
        load_state(path, "resnet8", 100)
    message = str(info.value)
    assert "wrn_16_1 with 100 classes" in message and "resnet8 with 100 classes" in message


def test_dataparallel_prefix_is_removed(tmp_path):
    model = build_model("resnet8", 10)
    path = tmp_path / "dp.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    assert set(load_state(path, "resnet8", 10)) == set(model.state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda state: {f"model.{k}": v for k, v in state.items()},  # a module holding it as self.model
        lambda state: {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3,
                       "pytorch-lightning_version": "2.4.0"},  # a Lightning checkpoint
        lambda state: {f"_orig_mod.{k}": v for k, v in state.items()},  # torch.compile
        lambda state: {"state_dict": {f"module.model.{k}": v for k, v in state.items()}},  # DDP around a wrapper
    ],
)
def test_wrapper_prefixes_are_removed(tmp_path, wrap):
    model = build_model("resnet8", 10)
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(model.state_dict()), path)
    loaded, _ = load_model(path, "resnet8", 10)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


class _HoldsModel(torch.nn.Module):
    """A model whose own state dict keys all start with ``model.``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.model = torch.nn.Linear(4, num_classes)


def test_a_model_whose_own_keys_start_with_a_wrapper_prefix_loads_as_saved(tmp_path, monkeypatch):
    from kd_optuna.models import registry

    monkeypatch.setitem(registry._REGISTRY, "holds_model", registry.ModelEntry(_HoldsModel, None, (4,)))
    model = _HoldsModel(3)
    path = tmp_path / "own.pth"
    torch.save(model.state_dict(), path)
    loaded, _ = load_model(path, "holds_model", 3)
    assert torch.equal(loaded.model.weight, model.model.weight)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    assert torch.equal(load_model(path, "holds_model", 3)[0].model.weight, model.model.weight)


def test_a_checkpoint_without_batchnorm_counters_loads(tmp_path):
    """PyTorch before 0.4.1 saved no num_batches_tracked; load_state_dict fills them with 0, so do we."""
    model = build_model("resnet8", 10)
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    loaded, _ = load_model(path, "resnet8", 10)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_torchvision_model_with_another_class_count_is_named_not_unknown(tmp_path):
    """mobilenet_v3_small is outside the zoo: its 1000-class weights read 'an unknown architecture'."""
    path = tmp_path / "mnv3.pth"
    torch.save(build_model("mobilenet_v3_small", 1000).state_dict(), path)
    with pytest.raises(CheckpointError, match="holds mobilenet_v3_small with 1000 classes, but mobilenet_v3_small "
                                              "with 3 classes was asked for"):
        load_state(path, "mobilenet_v3_small", 3)


def test_tampered_weights_fail_the_hash(tmp_path):
    path = save_checkpoint(tmp_path / "t.pt", build_model("digits_student", 10), model_name="digits_student",
                           num_classes=10, dataset="digits", accuracy=0.9)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["fc.bias"] += 1.0
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(path)


class NotWeights:
    pass


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": build_model("digits_student", 10).state_dict(), "extra": NotWeights()}, path)
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors .*NotWeights") as info:
        read_checkpoint(path)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nothing.pt")
