"""The tap: {feat, emb, logit} from one forward pass, sharing parameters and mode with the model."""

import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kd_optuna.models import MODEL_NAMES, MissingExtra, TapError, build_model, knowledge_shapes, tap_model

CNN_INPUTS = {"digits_teacher": (1, 16, 16), "digits_student": (1, 16, 16)}
IMAGENET = {"resnet18", "resnet34", "resnet50", "mobilenet_v2"}


def input_shape(name):
    if name in IMAGENET:
        return (3, 64, 64)
    return CNN_INPUTS.get(name, (3, 32, 32))


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in ("vit_tiny_cifar", "deit_tiny")])
def test_every_registered_model_taps_to_feature_map_embedding_and_logits(name):
    with torch.device("meta"):
        model = build_model(name, num_classes=5)
    shapes = knowledge_shapes(tap_model(model, name), input_shape(name))
    assert len(shapes["feat"]) == 3 and shapes["emb"] == shapes["feat"][:1] and shapes["logit"] == (5,)


@pytest.mark.parametrize(
    "name", ["digits_student", "resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "mobilenet_v2"]
)
def test_emb_is_the_pooled_feat_and_logit_is_the_models_output(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5).eval()
    tapped = tap_model(model, name)
    x = torch.randn(2, *input_shape(name))
    with torch.no_grad():
        out = tapped(x)
        expected_logits = model(x)
    torch.testing.assert_close(out["feat"].mean(dim=(2, 3)), out["emb"])
    torch.testing.assert_close(out["logit"], expected_logits)


def test_knowledge_shapes_per_sample():
    model = build_model("resnet20", num_classes=100).train()
    tapped = tap_model(model, "resnet20")
    shapes = knowledge_shapes(tapped, input_shape=(3, 32, 32))
    assert shapes == {"feat": (64, 8, 8), "emb": (64,), "logit": (100,)}
    assert model.training, "knowledge_shapes must restore the training mode"


def test_one_forward_pass_per_call():
    model = build_model("resnet8", 10)
    calls = []
    model.conv1.register_forward_hook(lambda *args: calls.append(1))
    tap_model(model, "resnet8")(torch.randn(2, 3, 32, 32))
    assert len(calls) == 1


def test_training_through_the_tap_trains_the_model():
    torch.manual_seed(0)
    model = build_model("digits_student", 10)
    tapped = tap_model(model, "digits_student")
    assert {id(p) for p in tapped.parameters()} == {id(p) for p in model.parameters()}
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    before = model.fc.weight.detach().clone()
    opt = torch.optim.SGD(tapped.parameters(), lr=0.1)
    F.cross_entropy(tapped(x)["logit"], y).backward()
    opt.step()
    assert not torch.equal(before, model.fc.weight)


def test_mode_follows_the_model_and_the_wrapper():
    torch.manual_seed(0)
    model = build_model("digits_student", 10)
    tapped = tap_model(model, "digits_student")
    x = torch.randn(8, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(tapped(x)["logit"], model(x))
    tapped.train()
    assert model.training and model.features[0][1].training
    running = model.features[0][1].running_mean.clone()
    tapped(x)
    assert not torch.equal(running, model.features[0][1].running_mean), "train mode updates BN statistics"


def test_dtype_conversion_reaches_the_extractor():
    tapped = tap_model(build_model("resnet8", 10), "resnet8").double()
    assert tapped(torch.randn(2, 3, 32, 32, dtype=torch.float64))["logit"].dtype == torch.float64


def test_wrong_node_name_lists_available_nodes():
    model = build_model("resnet8", 10)
    with pytest.raises(TapError) as info:
        tap_model(model, nodes={"feat": "layer9", "emb": "flatten", "logit": "fc"})
    message = str(info.value)
    assert "layer9" in message and "layer3" in message and "\n" not in message


def test_missing_knowledge_key_is_an_error():
    with pytest.raises(TapError, match="logit"):
        tap_model(build_model("resnet8", 10), nodes={"feat": "layer3", "emb": "flatten"})


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.pool(self.body(x)).flatten(1))


class Untraceable(Custom):
    def forward(self, x):
        h = self.body(x)
        if h.sum() > -1e9:  # data-dependent branch: torch.fx cannot trace it
            h = h * 1.0
        return self.head(self.pool(h).flatten(1))


def test_user_model_with_user_nodes_and_pooled_emb_flattened():
    model = Custom().eval()
    out = tap_model(model, nodes={"feat": "body", "emb": "pool", "logit": "head"})(torch.randn(3, 3, 8, 8))
    assert out["feat"].shape == (3, 8, 8, 8) and out["emb"].shape == (3, 8) and out["logit"].shape == (3, 4)


class MeanPooled(Custom):
    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))  # the pooled vector is no module's output


class SharedActivation(Custom):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = self.body[1]

    def forward(self, x):
        h = self.act(self.conv2(self.body(x)))  # the ReLU runs twice: its path names two graph nodes
        return self.head(self.pool(h).flatten(1))


class UntraceableMeanPooled(Untraceable):
    def forward(self, x):
        h = self.body(x)
        if h.sum() > -1e9:  # no torch.fx graph, and the pooled vector is no module's output
            h = h * 1.0
        return self.head(h.mean((2, 3)))


class ConvolutionHead(Custom):
    """SqueezeNet's shape: a convolution gives the class maps, pooled into the logits; no
    vector embedding exists."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.pool(self.head(self.body(x))).flatten(1)


class TupleOutput(Custom):
    def forward(self, x):
        h = self.pool(self.body(x)).flatten(1)
        return self.head(h), h


class DictOutput(Custom):
    def forward(self, x):
        return {"logits": self.head(self.body(x).mean((2, 3)))}


class ModeDependentPooling(Custom):
    def forward(self, x):
        h = self.body(x)
        h = self.pool(h).flatten(1) if self.training else h.mean((2, 3))  # "mean" is in the eval graph only
        return self.head(h)


@pytest.mark.parametrize("model", [UntraceableMeanPooled, ConvolutionHead, TupleOutput, DictOutput,
                                   ModeDependentPooling])
def test_model_whose_nodes_cannot_be_read_off_its_forward_asks_for_them(model):
    with pytest.raises(TapError, match="or read off its forward: pass nodes="):
        tap_model(model())


class OneSize(Custom):
    def forward(self, x):
        torch._assert(x.shape[-1] == 40, "built for 40 px images")
        return super().forward(x)


class FixedGrid(Custom):
    def forward(self, x):
        return self.head(self.pool(self.body(x).reshape(x.shape[0], 8, 4, 4)).flatten(1))  # 4x4 images only


def test_a_tapped_forward_that_fails_raises_without_printing_the_traced_code(capfd):
    """torch.fx's GraphModule.__call__ printed its generated code to stderr, 20 lines a failing
    forward, before the one-line error create-study gives for a model that cannot take the images."""
    tapped = tap_model(FixedGrid(), nodes={"feat": "body", "emb": "pool", "logit": "head"})
    assert tapped.mechanism == "fx" and tapped(torch.randn(2, 3, 4, 4))["logit"].shape == (2, 4)
    with pytest.raises(RuntimeError, match="is invalid for input of size"):
        tapped(torch.randn(2, 3, 8, 8))
    assert capfd.readouterr().err == ""


def test_a_model_built_for_one_size_has_its_nodes_read_on_the_images_it_will_read():
    from kd_optuna.models.inferred_nodes import infer_nodes

    assert infer_nodes(OneSize()) is None
    assert infer_nodes(OneSize(), (3, 40, 40)) == {"feat": "body", "emb": "pool", "logit": "head"}
    declared = OneSize()
    declared.pretrained_cfg = {"input_size": (3, 40, 40)}  # as timm's models say the size they were built for
    assert infer_nodes(declared) == {"feat": "body", "emb": "pool", "logit": "head"}


@pytest.mark.parametrize("model, nodes", [
    (MeanPooled, {"feat": "body.1", "emb": "mean", "logit": "head"}),
    (SharedActivation, {"feat": "body.1_1", "emb": "pool", "logit": "head"}),  # the second call of body.1
])
def test_a_classifier_pooled_by_a_function_or_with_a_shared_module_is_read_off_its_graph(model, nodes):
    """Where no module gives the pooled vector, or a module runs twice, the nodes are
    torch.fx graph nodes: the tapped tensors are the model's own."""
    from kd_optuna.models.inferred_nodes import infer_nodes

    model = model().eval()
    assert infer_nodes(model) == nodes
    tapped = tap_model(model)
    assert tapped.mechanism == "fx"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = tapped(x)
        torch.testing.assert_close(out["logit"], model(x))
        torch.testing.assert_close(out["emb"], out["feat"].mean((2, 3)))
    assert out["feat"].shape == (2, 8, 8, 8)


@pytest.mark.parametrize("model, mechanism", [(Custom, "fx"), (Untraceable, "hooks")])
def test_a_cnn_classifier_s_nodes_are_read_off_its_forward(model, mechanism):
    from kd_optuna.models.inferred_nodes import infer_nodes

    model = model().eval()
    assert infer_nodes(model) == {"feat": "body", "emb": "pool", "logit": "head"}
    tapped = tap_model(model)
    assert tapped.mechanism == mechanism
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = tapped(x)
        torch.testing.assert_close(out["logit"], model(x))
        torch.testing.assert_close(out["emb"], model.pool(model.body(x)).flatten(1))


@pytest.mark.parametrize("name, nodes", [
    ("mobilenet_v3_small", {"feat": "features", "emb": "classifier.1", "logit": "classifier.3"}),
    ("efficientnet_b0", {"feat": "features", "emb": "avgpool", "logit": "classifier.1"}),
    ("regnet_x_400mf", {"feat": "trunk_output", "emb": "avgpool", "logit": "fc"}),
    ("convnext_tiny", {"feat": "features", "emb": "classifier.0", "logit": "classifier.2"}),  # LayerNorm after the pool
    ("timm:resnet10t", {"feat": "layer4", "emb": "global_pool.pool", "logit": "fc"}),
    ("timm:regnetx_002", {"feat": "final_conv", "emb": "head.global_pool.pool", "logit": "head.flatten"}),
    ("densenet121", {"feat": "relu", "emb": "adaptive_avg_pool2d", "logit": "classifier"}),  # pooled by functions
    ("shufflenet_v2_x0_5", {"feat": "conv5.2", "emb": "mean", "logit": "fc"}),
    ("mnasnet0_5", {"feat": "layers.16", "emb": "mean", "logit": "classifier.1"}),
])
def test_library_cnn_nodes_read_off_the_forward(name, nodes):
    """The last feature map, the vector the classifier layer reads (a 1x1-convolution head's
    too), and the returned logits; the model's state and mode are left as they were."""
    from kd_optuna.models.inferred_nodes import infer_nodes

    if name.startswith("timm:"):
        pytest.importorskip("timm")
    model = build_model(name, 3).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert infer_nodes(model) == nodes
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    tapped = tap_model(model, name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tapped(x)
        torch.testing.assert_close(out["logit"], model(x))
    assert out["feat"].dim() == 4 and out["feat"].shape[-2:] == (2, 2) and out["emb"].dim() == 2


def test_untraceable_model_falls_back_to_hooks():
    model = Untraceable().eval()
    tapped = tap_model(model, nodes={"feat": "body", "emb": "pool", "logit": "head"})
    assert tapped.mechanism == "hooks"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = tapped(x)
        torch.testing.assert_close(out["logit"], model(x))
    assert out["emb"].shape == (2, 8)


def test_torchvision_models_are_recognised_without_a_name():
    import torchvision

    tapped = tap_model(torchvision.models.resnet18(weights=None, num_classes=3))
    assert knowledge_shapes(tapped, (3, 64, 64)) == {"feat": (512, 2, 2), "emb": (512,), "logit": (3,)}


def test_timm_cnn_with_user_nodes():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    tapped = tap_model(model, nodes={"feat": "layer4", "emb": "global_pool", "logit": "fc"})
    assert tapped.mechanism == "fx"
    assert knowledge_shapes(tapped, (3, 64, 64)) == {"feat": (512, 2, 2), "emb": (512,), "logit": (3,)}


def test_vit_student_distils_logits_and_embeddings_from_a_cnn_teacher():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    teacher = tap_model(build_model("resnet8", 10).eval(), "resnet8")
    student = tap_model(build_model("vit_tiny_cifar", 10, depth=2), "vit_tiny_cifar")
    assert student.mechanism == "fx"
    shapes = knowledge_shapes(student, (3, 32, 32))
    assert shapes == {"feat": (192, 8, 8), "emb": (192,), "logit": (10,)}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    adapter = nn.Linear(192, 64)
    kd = F.kl_div(F.log_softmax(s["logit"] / 4, 1), F.softmax(t["logit"] / 4, 1), reduction="batchmean")
    emb = F.mse_loss(adapter(s["emb"]), t["emb"])
    (kd + emb).backward()
    assert torch.isfinite(kd + emb)
    grad = student.model.patch_embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_a_timm_vit_is_recognised_and_its_tokens_become_a_grid():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    assert knowledge_shapes(tap_model(model), (1, 16, 16)) == {"feat": (32, 4, 4), "emb": (32,), "logit": (10,)}
    x = torch.randn(2, 1, 16, 16)
    out = tap_model(model, nodes={"feat": "blocks.0", "emb": "fc_norm", "logit": "head"})(x)
    assert out["feat"].shape == (2, 32, 4, 4)
    patches = tap_model(model, nodes={"feat": "patch_embed", "emb": "fc_norm", "logit": "head"})(x)["feat"]
    torch.testing.assert_close(patches, model.patch_embed.proj(x), msg="grid keeps each patch at its place")


def test_a_torchvision_vit_s_nodes_are_read_off_its_graph_and_its_tokens_become_a_grid():
    """feat: the encoder's patch tokens as the grid (class token dropped, each patch at its
    place); emb: the class token the heads read; read at the ViT's own image_size."""
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    tapped = tap_model(model)
    assert tapped.nodes["feat"] == "encoder.ln" and tapped.nodes["logit"] == "heads.head"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = tapped(x)
        tokens = model.encoder(torch.cat([model.class_token.expand(2, -1, -1), model._process_input(x)], dim=1))
        torch.testing.assert_close(out["logit"], model(x))
    torch.testing.assert_close(out["emb"], tokens[:, 0])
    assert out["feat"].shape == (2, 32, 4, 4)
    torch.testing.assert_close(out["feat"][:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])


def test_input_size_lets_a_cifar_teacher_read_larger_images():
    torch.manual_seed(0)
    teacher = build_model("resnet8", 10).eval()
    tapped = tap_model(teacher, "resnet8", input_size=32)
    big = torch.nn.functional.interpolate(torch.randn(2, 3, 32, 32), size=64, mode="nearest")
    assert knowledge_shapes(tapped, (3, 64, 64)) == {"feat": (64, 8, 8), "emb": (64,), "logit": (10,)}
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(big, size=(32, 32), mode="bilinear", antialias=True)
        torch.testing.assert_close(tapped(big)["logit"], teacher(resized))


def test_vit_without_timm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.models.vision_transformer", None)
    with pytest.raises(MissingExtra, match="pip install timm"):
        build_model("vit_tiny_cifar", 10)


def test_a_timm_cait_is_not_taken_for_a_vit_and_its_class_token_and_patch_grid_are_read_off_its_graph():
    """CaiT has patch_embed, norm and head but no fc_norm: the ViT rule named fc_norm, and a
    config that named no node failed on 'tap node(s) fc_norm not in Cait's graph'. Its class
    token (x[:, 0]) is now read off its graph as emb, and its tokens as the feat grid."""
    pytest.importorskip("timm")
    from kd_optuna.models import build_model_skeleton
    from kd_optuna.models.inferred_nodes import infer_nodes
    from kd_optuna.models.tap import known_nodes

    model = build_model_skeleton("timm:cait_xxs24_224", 3)
    assert known_nodes(model) is None
    assert infer_nodes(model) == {"feat": "norm", "emb": "getitem_1", "logit": "head"}
    assert knowledge_shapes(tap_model(model), (3, 224, 224)) == {"feat": (192, 14, 14), "emb": (192,), "logit": (3,)}


def test_timm_token_models_outside_the_vit_rule_ask_for_nodes_and_their_token_feat_becomes_a_grid():
    """Distilled DeiT matched the ViT rule, whose fc_norm its head never calls and whose head is
    not its output (the mean of head and head_dist): create-study failed on 'fc_norm not in its
    graph'. It now asks; with the nodes named, its tokens (two prefix tokens) and CaiT's become
    the patch grid, as a ViT's do."""
    pytest.importorskip("timm")
    from timm.models.cait import Cait
    from timm.models.deit import VisionTransformerDistilled

    small = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, num_classes=5)
    distilled = VisionTransformerDistilled(depth=1, **small).eval()
    with pytest.raises(TapError, match="no tap nodes known for VisionTransformerDistilled or read off its forward"):
        tap_model(distilled)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = tap_model(distilled, nodes={"feat": "norm", "emb": "getitem_2", "logit": "truediv"})(x)
        torch.testing.assert_close(out["logit"], distilled(x))
        tokens = distilled.forward_features(x)
    torch.testing.assert_close(out["emb"], tokens[:, 0])
    torch.testing.assert_close(out["feat"][:, :, 1, 2], tokens[:, 2 + 1 * 4 + 2])
    cait = Cait(depth=1, depth_token_only=1, **small).eval()
    with torch.no_grad():
        out = tap_model(cait, nodes={"feat": "norm", "emb": "head_drop", "logit": "head"})(x)
        torch.testing.assert_close(out["logit"], cait(x))
    assert out["feat"].shape == (2, 32, 4, 4)
