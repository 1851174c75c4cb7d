"""The tap: any classifier's ``{feat, emb, logit}`` from one forward pass, without editing it.

``tap_model(model, name)`` or ``tap_model(model, nodes={"feat": ..., "emb": ..., "logit": ...})``
wraps ``model`` in a :class:`TappedModel` whose forward returns

- ``feat``: the last-stage feature map, the tensor that global pooling reduces to ``emb``,
  (N, C, H, W) for CNNs; for a ViT the patch-token grid (N, D, h, w) (class token dropped),
- ``emb``: the pooled vector before the classifier (N, D) (flattened if the node gives more dims),
- ``logit``: the classifier output (N, K).

The graph is built with torchvision's ``models.feature_extraction.create_feature_extractor``
(torch.fx). The extractor shares the model's modules and parameters, so training the tapped
model trains the model; ``train()``/``eval()`` on either one is honoured. A model torch.fx
cannot trace falls back to forward hooks on the named modules (node names must then be module
paths), with the same result and still one forward pass.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import KdOptunaError
from .inferred_nodes import infer_nodes
from .registry import model_entry
from .vit import is_timm_token_model, prefix_tokens, tokens_to_map

KNOWLEDGE = ("feat", "emb", "logit")


class TapError(KdOptunaError, ValueError):
    """Tap node names that the model's graph does not have, or a model with no known nodes."""


def _is_timm_vit(model: nn.Module) -> bool:
    """timm's VisionTransformer and its kin (DeiT, ...), whose tap the ViT rule names; CaiT
    (no ``fc_norm``) and distilled DeiT (its output averages ``head`` and ``head_dist``) are not."""
    has_rule_nodes = all(hasattr(model, a) for a in ("norm", "fc_norm"))
    return is_timm_token_model(model) and has_rule_nodes and not hasattr(model, "head_dist")


def known_nodes(model: nn.Module) -> dict[str, str] | None:
    """The tap nodes of a model a rule knows: zoo ``tap_nodes``, torchvision ResNet and
    MobileNetV2, timm ViT; else None."""
    nodes = getattr(model, "tap_nodes", None)
    if nodes is not None:
        return dict(nodes)
    if _is_timm_vit(model):
        return {"feat": "norm", "emb": "fc_norm", "logit": "head"}
    import torchvision

    if isinstance(model, torchvision.models.ResNet):
        return {"feat": "layer4", "emb": "flatten", "logit": "fc"}
    if isinstance(model, torchvision.models.MobileNetV2):
        return {"feat": "features", "emb": "flatten", "logit": "classifier"}
    return None


def _graph_nodes(model: nn.Module) -> list[str]:
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        return get_graph_node_names(model, suppress_diff_warning=True)[1]
    except Exception:
        return [n for n, _ in model.named_modules() if n]


#: Up to this many graph nodes are listed in full in an error; beyond, a shortened list.
LISTED_NODES = 40


def _available_nodes(names: list[str]) -> str:
    """The nodes a user can name: all of them when few, else the top-level ones and the last 10."""
    if len(names) <= LISTED_NODES:
        return f"its nodes: {', '.join(names)}"
    top = list(dict.fromkeys(n.split(".")[0] for n in names))
    return (
        f"its {len(names)} nodes include the top-level {', '.join(top)} (a module path names its last node) "
        f"and end with {', '.join(names[-10:])}"
    )


def describe_nodes(model: nn.Module) -> str:
    """The nodes of ``model``'s graph a user can name (shortened when many), for error messages."""
    return _available_nodes([n for n in _graph_nodes(model) if n != "x"])


def default_nodes(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> dict[str, str] | None:
    """The tap nodes ``model`` is recognised by (:func:`known_nodes`), else those read off its
    forward (:func:`kd_optuna.models.inferred_nodes.infer_nodes`: CNN classifiers; last on
    ``input_shape`` images), or None when a config must name them."""
    return known_nodes(model) or infer_nodes(model, input_shape)


def _present(node: str, graph: list[str]) -> bool:
    return node in graph or any(g.startswith(node + ".") for g in graph)


def check_nodes(model: nn.Module, nodes: Mapping[str, str]) -> None:
    """Trace ``model`` once (``get_graph_node_names``, train and eval graphs) and raise TapError,
    one line, naming the first of ``nodes`` (feat, emb, logit -> node name) that is in neither
    graph and the nodes that exist. An untraceable model is checked against its module paths."""
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        train, evaluation = get_graph_node_names(model, suppress_diff_warning=True)
        graph = list(dict.fromkeys(evaluation + train))
        kind = "graph"
    except Exception:
        graph = [n for n, _ in model.named_modules() if n]
        kind = "modules (torch.fx cannot trace it)"
    for key in KNOWLEDGE:
        if key in nodes and not _present(nodes[key], graph):
            shown = [g for g in graph if g != "x"] or graph
            raise TapError(
                f"{key} node {nodes[key]!r} is not in {type(model).__name__}'s {kind}; {_available_nodes(shown)}"
            )


def _fx_extractor(model: nn.Module, node_names: list[str]) -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor

    return create_feature_extractor(model, return_nodes={n: n for n in node_names})


class _HookExtractor(nn.Module):
    """Fallback for untraceable models: forward hooks record the named modules' outputs."""

    def __init__(self, model: nn.Module, node_names: list[str]):
        super().__init__()
        modules = dict(model.named_modules())
        missing = [n for n in node_names if n not in modules]
        if missing:
            raise TapError(
                f"torch.fx cannot trace {type(model).__name__} and {', '.join(missing)} "
                f"are not module paths; module paths: {', '.join(n for n in modules if n and '.' not in n)}"
            )
        self.model = model
        self.node_names = node_names
        self._outputs: dict[str, torch.Tensor] = {}
        for n in node_names:
            modules[n].register_forward_hook(self._recorder(n))

    def _recorder(self, name: str):
        def hook(module, args, output):
            self._outputs[name] = output

        return hook

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._outputs = {}
        self.model(x)
        out, self._outputs = self._outputs, {}
        return out


class TappedModel(nn.Module):
    """``model`` plus a feature extractor: forward(x (N, ...)) -> {feat, emb, logit}.

    ``model`` is a registered submodule (``tapped.parameters()`` are the model's parameters,
    ``tapped.model.state_dict()`` is the plain model's checkpoint); the extractor is kept out of
    the module tree so nothing is counted or saved twice, and ``to()``/``train()`` reach it."""

    def __init__(
        self,
        model: nn.Module,
        nodes: Mapping[str, str],
        extractor: nn.Module,
        feat_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mechanism: str = "fx",
        input_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.model = model
        self.nodes = dict(nodes)
        self.mechanism = mechanism
        self.input_size = input_size
        object.__setattr__(self, "_extractor", extractor)
        object.__setattr__(self, "_feat_transform", feat_transform)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._extractor._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> "TappedModel":
        super().train(mode)
        self._extractor.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._extractor.training != self.model.training:
            self._extractor.train(self.model.training)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        raw = self._extractor.forward(x)  # not __call__: fx's prints the generated code of a failing op to stderr
        out = {k: raw[self.nodes[k]] for k in KNOWLEDGE}
        if self._feat_transform is not None:
            out["feat"] = self._feat_transform(out["feat"])
        if out["emb"].dim() > 2:
            out["emb"] = torch.flatten(out["emb"], 1)
        return out


def tap_model(
    model: nn.Module,
    name: str | None = None,
    nodes: Mapping[str, str] | None = None,
    *,
    input_size: int | tuple[int, int] | None = None,
) -> TappedModel:
    """Wrap ``model`` so that one forward pass returns ``{feat, emb, logit}``.

    Node names come from ``nodes`` if given, else from the registry entry ``name``, else from
    the model itself (zoo models carry ``tap_nodes``; torchvision ResNet / MobileNetV2 and timm
    ViT are recognised; other classifiers' nodes are read off one forward,
    :mod:`kd_optuna.models.inferred_nodes`). ``nodes`` needs the keys feat, emb, logit; values are
    torch.fx node names as listed by ``torchvision.models.feature_extraction.get_graph_node_names``
    (a module path names the last node inside it). A wrong name raises TapError listing the
    available nodes. On a timm token model (ViT, DeiT, CaiT...) or a torchvision ViT, a token
    ``feat`` (N, P + h*w, D) becomes the patch grid (N, D, h, w).
    ``input_size`` resizes inputs (bilinear, antialiased) to that (H, W) before the model, so a
    32x32 CIFAR teacher can sit beside a 224x224 ViT student (seed F.3).
    """
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    feat_transform = None
    if nodes is None and name is not None:
        entry = model_entry(name)
        nodes = entry.nodes
        if entry.feat_transform is not None:
            feat_transform = entry.feat_transform(model)
    if nodes is None:
        nodes = default_nodes(model)
    prefix = prefix_tokens(model)
    if feat_transform is None and prefix is not None:
        feat_transform = tokens_to_map(prefix)
    if nodes is None:
        raise TapError(
            f"no tap nodes known for {type(model).__name__} or read off its forward: "
            f"pass nodes={{'feat': ..., 'emb': ..., 'logit': ...}}; {_available_nodes(_graph_nodes(model))}"
        )
    missing = [k for k in KNOWLEDGE if k not in nodes]
    if missing:
        raise TapError(f"tap nodes need the keys feat, emb, logit; missing: {', '.join(missing)}")
    node_names = list(dict.fromkeys(nodes[k] for k in KNOWLEDGE))
    mechanism = "fx"
    try:
        extractor = _fx_extractor(model, node_names)
    except ValueError as exc:
        if "is not present in model" in str(exc):
            graph = _graph_nodes(model)
            absent = [n for n in node_names if not _present(n, graph)]
            raise TapError(
                f"tap node(s) {', '.join(absent or node_names)} not in {type(model).__name__}'s graph; "
                f"{_available_nodes(graph)}"
            ) from None
        extractor, mechanism = _HookExtractor(model, node_names), "hooks"
    except Exception:
        extractor, mechanism = _HookExtractor(model, node_names), "hooks"
    nodes = {k: nodes[k] for k in KNOWLEDGE}
    return TappedModel(model, nodes, extractor, feat_transform, mechanism, tuple(input_size) if input_size else None)


@torch.no_grad()
def knowledge_shapes(tapped: TappedModel, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes {feat: (C, H, W), emb: (D,), logit: (K,)} for inputs of ``input_shape``
    (no batch dimension), from one eval-mode forward of a zero batch of 2; the mode is restored."""
    was_training = tapped.training or tapped.model.training
    param = next(tapped.model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    tapped.eval()
    try:
        out = tapped(torch.zeros((2, *input_shape), device=device, dtype=dtype))
    finally:
        tapped.train(was_training)
    return {k: tuple(v.shape[1:]) for k, v in out.items()}
