"""Tap nodes read off a CNN classifier's forward, for the models no rule of the tap knows.

One eval-mode forward of a blank batch, with a hook on every module, records each module's
output in the order the modules finish; of a classifier that ends ``... -> feature map ->
global pooling -> [flatten] -> [head layers] -> linear``, it names

- ``logit``: the module whose output the model returns, e.g. ``fc``, ``classifier.3``, or
  ``head.flatten`` after a 1x1-convolution classifier;
- ``emb``: the module before the classifier layer (dropout, flatten skipped) whose output
  holds as many numbers per image as that layer reads, e.g. ``avgpool`` (N, 512, 1, 1),
  which the tap flattens;
- ``feat``: the last module before ``emb`` that gives a feature map (N, C, H, W) larger than
  1x1 and is no pooling layer, e.g. ``layer4``, ``features``.

Module paths are tap nodes: a path names the last graph node inside that module.

Where no module gives one of them (a vector pooled by a function, ``x.mean((2, 3))``, a
functional op after the classifier layer), the same three are read off the model's torch.fx
graph, named as ``create_feature_extractor`` names its nodes, by following each op's tensor
input back from the returned node: ``logit`` is that node, ``emb`` the vector the linear (or
1x1-convolution) classifier reads, flatten and dropout skipped, and ``feat`` the last map
larger than 1x1 that the vector was pooled from, or a token model's (N, P + h*w, D) tokens,
which the tap reads as the patch grid. DenseNet, ShuffleNetV2, MNASNet, torchvision's ViT,
CaiT and XCiT are read so. Where neither reading fits (a tuple output, no linear classifier) it names
nothing and a config must name the nodes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from .registry import blank_forward
from .vit import prefix_tokens, tokens_to_map

#: The blank images the forward reads: stride-32 networks keep a 2x2 map, which tells a
#: feature map from a pooled one; a model that cannot take them, or names nothing at that
#: size (AlexNet's map is 1x1 there), is tried at 224, and then on the images it will read
#: and at the size it declares (a model built for one size only: timm's ``botnet26t_256``).
PROBE_SIZES = (64, 224)

#: Layers that only reshape or drop: the classifier layer and ``emb`` are looked for past them.
_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.Flatten)
_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.LPPool2d)


class _Call(NamedTuple):
    """One module's forward, recorded when it returned."""

    path: str
    module: nn.Module
    input: torch.Tensor
    output: torch.Tensor


def infer_nodes(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> dict[str, str] | None:
    """``{"feat", "emb", "logit"}`` tap nodes of ``model`` read off one forward, module paths
    first, else torch.fx graph nodes (module docstring), or None where its forward is not
    shaped so; the model's mode, parameters, buffers and the global RNG are left as they were.
    ``input_shape`` (C, H, W): the images it will read, probed after ``PROBE_SIZES``."""
    shapes = [(3, size, size) for size in PROBE_SIZES]
    for shape in (input_shape, _declared_input_shape(model)):
        if shape is not None and tuple(shape) not in shapes:
            shapes.append(tuple(shape))
    for shape in shapes:
        forward = _record_forward(model, shape)
        nodes = None if forward is None else _nodes(*forward)
        if nodes is not None:
            return nodes
    for shape in shapes:
        traced = _traced_forward(model, shape)
        nodes = None if traced is None else _graph_nodes(model, *traced)
        if nodes is not None and _in_both_graphs(model, nodes.values()):
            return nodes
    return None


def _declared_input_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """The (C, H, W) a model says it was built for: a timm model's ``pretrained_cfg``, e.g.
    (3, 256, 256), or a torchvision ViT's ``image_size``."""
    import torchvision

    if isinstance(model, torchvision.models.VisionTransformer):
        return (3, model.image_size, model.image_size)
    config = getattr(model, "pretrained_cfg", None)
    size = config.get("input_size") if isinstance(config, dict) else None
    return tuple(size) if isinstance(size, (tuple, list)) and len(size) == 3 else None


def _record_forward(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[list[_Call], Any] | None:
    """The modules' calls with a tensor input and output, in the order they returned, and the
    model's output, for one eval-mode forward of a blank batch (2, *input_shape); None when the
    forward fails."""
    calls: list[_Call] = []

    def recorder(path):
        def hook(module, inputs, output):
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                calls.append(_Call(path, module, inputs[0], output))
        return hook

    handles = [m.register_forward_hook(recorder(path)) for path, m in model.named_modules() if path]
    try:
        with torch.random.fork_rng(devices=[]):
            output = blank_forward(model, input_shape)
    except Exception:
        return None
    finally:
        for handle in handles:
            handle.remove()
    return calls, output


def _per_image(tensor: torch.Tensor) -> int:
    return tensor[0].numel()


def _feature_map(call: _Call) -> bool:
    """Whether the call gave a feature map the network computed: (N, C, H, W) larger than 1x1
    (a pooled map is 1x1), not the output of a pooling layer (an adaptive one may only
    resample the map: VGG's 7x7)."""
    return _feature_map_value(call.output) and not isinstance(call.module, _POOLING)


def _feature_map_value(value) -> bool:
    """(N, C, H, W) larger than 1x1."""
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-2:] != (1, 1)


def _last(calls: list[_Call], test) -> int | None:
    """The index of the last call that passes ``test``, or None."""
    return next((i for i in range(len(calls) - 1, -1, -1) if test(calls[i])), None)


def _nodes(calls: list[_Call], output: Any) -> dict[str, str] | None:
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        return None
    leaves = [c for c in calls if next(c.module.children(), None) is None]
    logit_at = _last(leaves, lambda c: c.output is output)
    if logit_at is None:
        return None
    classifier_at = _last(leaves[:logit_at + 1], lambda c: not isinstance(c.module, _PASS_THROUGH))
    if classifier_at is None:
        return None
    emb_at = _last(leaves[:classifier_at], lambda c: not isinstance(c.module, _PASS_THROUGH))
    if emb_at is None or _per_image(leaves[emb_at].output) != _per_image(leaves[classifier_at].input):
        return None
    emb = leaves[emb_at]
    feat_at = _last(calls[:next(i for i, c in enumerate(calls) if c is emb)], _feature_map)
    if feat_at is None:
        return None
    nodes = {"feat": calls[feat_at].path, "emb": emb.path, "logit": leaves[logit_at].path}
    paths = [c.path for c in calls]
    if any(paths.count(path) > 1 for path in nodes.values()):  # a module called twice names two graph nodes
        return None
    return nodes


def _op_module_types() -> list[type]:
    """torchvision.ops' modules, which its feature extractor keeps whole (leaf modules)."""
    import torchvision

    return [t for t in vars(torchvision.ops).values() if isinstance(t, type) and issubclass(t, nn.Module)]


class _GraphRecorder(nn.Module):
    """``model`` run through its torch.fx graph, traced in the mode it is in and named as
    ``create_feature_extractor`` names its nodes: forward(x) -> (graph, qualified names,
    each node's value)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        import torchvision
        from torchvision.models.feature_extraction import NodePathTracer

        tracer = NodePathTracer(autowrap_modules=(math, torchvision.ops), leaf_modules=_op_module_types())
        graph = tracer.trace(self.model)
        values: dict[fx.Node, Any] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, node):
                values[node] = super().run_node(node)
                return values[node]

        Recorder(fx.GraphModule(tracer.root, graph)).run(x)
        return graph, tracer.node_to_qualname, values


def _traced_forward(model: nn.Module, input_shape: tuple[int, int, int]):
    """``_GraphRecorder``'s eval-mode reading of a blank batch (2, *input_shape), or None when
    torch.fx cannot trace or run the model."""
    try:
        with torch.random.fork_rng(devices=[]):
            return blank_forward(_GraphRecorder(model), input_shape)
    except Exception:
        return None


_PASS_THROUGH_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, F.dropout)
_PASS_THROUGH_METHODS = ("flatten", "view", "reshape", "squeeze", "contiguous")
_POOLING_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d)


def _module(model: nn.Module, node) -> nn.Module | None:
    return model.get_submodule(node.target) if node.op == "call_module" else None


def _passes_through(model: nn.Module, node) -> bool:
    """Whether ``node`` only reshapes or drops (flatten, view, dropout, ...)."""
    if node.op == "call_module":
        return isinstance(_module(model, node), _PASS_THROUGH)
    if node.op == "call_function":
        return node.target in _PASS_THROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_THROUGH_METHODS


def _pools(model: nn.Module, node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(model, node), _POOLING)
    return node.op == "call_function" and node.target in _POOLING_FUNCTIONS


def _is_classifier_layer(model: nn.Module, node) -> bool:
    """A linear layer (module or ``F.linear``) or a 1x1 convolution."""
    module = _module(model, node)
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (1, 1)
    return isinstance(module, nn.Linear) or (node.op == "call_function" and node.target is F.linear)


def _first_input(node):
    """The node whose value ``node`` reads first (its tensor argument), or None."""
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def _before_pass_through(model: nn.Module, node):
    while node is not None and _passes_through(model, node):
        node = _first_input(node)
    return node


def _is_vector(value) -> bool:
    """(N, D) or a pooled (N, D, 1, 1)."""
    return isinstance(value, torch.Tensor) and (
        value.dim() == 2 or (value.dim() == 4 and value.shape[-2:] == (1, 1))
    )


def _graph_nodes(model: nn.Module, graph, names: dict, values: dict) -> dict[str, str] | None:
    """The nodes of a classifier ``... -> feature map -> pooling (module or function) -> vector
    ops -> linear``: ``logit`` the returned node, ``emb`` what the classifier layer reads,
    ``feat`` the last map larger than 1x1 that the vector was pooled from, following each
    op's tensor input back."""
    output = next(n for n in graph.nodes if n.op == "output")
    logit = output.args[0]
    if not isinstance(logit, fx.Node) or logit not in names:
        return None
    if not isinstance(values.get(logit), torch.Tensor) or values[logit].dim() != 2:
        return None
    classifier = _before_pass_through(model, logit)
    if classifier is None or not _is_classifier_layer(model, classifier):
        return None
    emb = _before_pass_through(model, _first_input(classifier))
    if emb is None or emb not in names or not _is_vector(values.get(emb)):
        return None
    feat = emb
    while feat is not None and (_is_vector(values.get(feat)) or _pools(model, feat)):
        feat = _first_input(feat)
    if feat is None or feat not in names:
        return None
    if not (_feature_map_value(values[feat]) or _patch_tokens(model, values[feat], _per_image(values[emb]))):
        return None
    return {"feat": names[feat], "emb": names[emb], "logit": names[logit]}


def _patch_tokens(model: nn.Module, value, width: int) -> bool:
    """Whether ``value`` is a token model's (N, P + h*w, width) tokens, which the tap reads as
    the (N, width, h, w) patch grid (``tokens_to_map``): torchvision's ViT, CaiT, XCiT."""
    prefix = prefix_tokens(model)
    if prefix is None or not isinstance(value, torch.Tensor) or value.dim() != 3:
        return False
    grid = tokens_to_map(prefix)(value)
    return _feature_map_value(grid) and grid.shape[1] == width


def _in_both_graphs(model: nn.Module, nodes) -> bool:
    """Whether the train-mode graph has the nodes read off the eval-mode one (the tap's
    extractor traces both)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        train, evaluation = get_graph_node_names(model, suppress_diff_warning=True)
    except Exception:
        return False
    return all(n in train and n in evaluation for n in nodes)
