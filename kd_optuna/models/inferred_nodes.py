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

Where the forward ends in something else (a functional op after the classifier, a tuple, a
pooled vector no module gives) it names nothing and a config must name the nodes. Module paths
are tap nodes: a path names the last graph node inside that module.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .registry import blank_forward

#: The blank images the forward reads: stride-32 networks keep a 2x2 map, which tells a
#: feature map from a pooled one; a model that cannot take them, or names nothing at that
#: size (AlexNet's map is 1x1 there), is tried at 224.
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


def infer_nodes(model: nn.Module) -> dict[str, str] | None:
    """``{"feat", "emb", "logit"}`` module paths of ``model`` read off one forward (module
    docstring), or None where its forward is not shaped so; the model's mode, parameters,
    buffers and the global RNG are left as they were."""
    for size in PROBE_SIZES:
        forward = _record_forward(model, (3, size, size))
        nodes = None if forward is None else _nodes(*forward)
        if nodes is not None:
            return nodes
    return None


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
    return call.output.dim() == 4 and call.output.shape[-2:] != (1, 1) and not isinstance(call.module, _POOLING)


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
