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

import torch
from torch import nn

#: The blank images the forward reads: stride-32 networks keep a 2x2 map, which tells a
#: feature map from a pooled one; a model that cannot take them, or names nothing at that
#: size (AlexNet's map is 1x1 there), is tried at 224.
PROBE_SIZES = (64, 224)

#: Layers that only reshape or drop: the classifier layer and ``emb`` are looked for past them.
_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.Flatten)
_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.LPPool2d)


def infer_nodes(model: nn.Module) -> dict[str, str] | None:
    """``{"feat", "emb", "logit"}`` module paths of ``model`` read off one forward (module
    docstring), or None where its forward is not shaped so; the model's mode, parameters,
    buffers and the global RNG are left as they were."""
    for size in PROBE_SIZES:
        finished = _finished_modules(model, (3, size, size))
        nodes = None if finished is None else _nodes(*finished)
        if nodes is not None:
            return nodes
    return None


def _finished_modules(model: nn.Module, input_shape: tuple[int, int, int]):
    """``(records, output)``: per module, in the order they finish, ``(path, module, input,
    output)`` for tensor inputs and outputs; and the model's output. None when the forward fails."""
    records: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []

    def record(path):
        def hook(module, inputs, output):
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                records.append((path, module, inputs[0], output))
        return hook

    handles = [m.register_forward_hook(record(path)) for path, m in model.named_modules() if path]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            output = model(torch.zeros((2, *input_shape), device=device))
    except Exception:
        return None
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return records, output


def _per_image(tensor: torch.Tensor) -> int:
    return tensor[0].numel()


def _feature_map(module: nn.Module, output: torch.Tensor) -> bool:
    """Whether ``output`` is a feature map the network computed: (N, C, H, W) larger than 1x1
    (a pooled map is 1x1), not the output of a pooling layer (an adaptive one may only
    resample the map: VGG's 7x7)."""
    return output.dim() == 4 and output.shape[-2:] != (1, 1) and not isinstance(module, _POOLING)


def _nodes(records, output) -> dict[str, str] | None:
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        return None
    leaves = [r for r in records if not any(True for _ in r[1].children())]
    logit_at = next((i for i in range(len(leaves) - 1, -1, -1) if leaves[i][3] is output), None)
    if logit_at is None:
        return None
    classifier_at = next((i for i in range(logit_at, -1, -1) if not isinstance(leaves[i][1], _PASS_THROUGH)), None)
    if classifier_at is None:
        return None
    classifier_input = leaves[classifier_at][2]
    emb = next((r for r in reversed(leaves[:classifier_at]) if not isinstance(r[1], _PASS_THROUGH)), None)
    if emb is None or _per_image(emb[3]) != _per_image(classifier_input):
        return None
    emb_at = next(i for i, r in enumerate(records) if r[3] is emb[3] and r[0] == emb[0])
    feat = next((r for r in reversed(records[:emb_at]) if _feature_map(r[1], r[3])), None)
    if feat is None:
        return None
    nodes = {"feat": feat[0], "emb": emb[0], "logit": leaves[logit_at][0]}
    calls = [r[0] for r in records]
    if any(calls.count(path) > 1 for path in nodes.values()):  # a module called twice names two graph nodes
        return None
    return nodes
