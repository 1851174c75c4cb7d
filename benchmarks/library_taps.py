"""Which library classifiers kd-optuna taps without a `nodes` table, and does each tap hold?

For every torchvision classifier (and, with timm installed and ``--timm N``, the first N timm
models of ``timm.list_models()``), build the model on the meta device (no weights), take its
tap nodes from a rule (``known_nodes``) or read off its forward (``infer_nodes``: ``read`` where
all three are module paths, ``graph`` where one is a torch.fx graph node), tap it and
check the knowledge shapes on 3 x 64 x 64 and 3 x 224 x 224 images (and at the size a timm
model declares, ``pretrained_cfg["input_size"]``): ``feat`` (C, H, W),
``emb`` (D,), ``logit`` (K,). A model left without nodes is listed (its config must name
them); a tapped model whose shapes fail the check is a fault, and the script exits 1.

    python benchmarks/library_taps.py --timm 200
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
import torchvision

from kd_optuna.models import build_model_skeleton, knowledge_shapes, tap_model
from kd_optuna.models.inferred_nodes import infer_nodes
from kd_optuna.models.tap import known_nodes

CLASSES = 7


def check(name: str) -> tuple[str, str]:
    """(``rule``, ``read``, ``graph``, ``none``, ``unbuilt`` or ``FAULT``, detail) for model ``name``."""
    try:
        model = build_model_skeleton(name, CLASSES)
    except Exception as exc:
        return "unbuilt", f"{type(exc).__name__}"
    nodes, how = known_nodes(model), "rule"
    if nodes is None:
        nodes = infer_nodes(model)
        modules = dict(model.named_modules())
        how = "read" if nodes is not None and all(n in modules for n in nodes.values()) else "graph"
    if nodes is None:
        return "none", ""
    try:
        tapped = tap_model(model, nodes=nodes)
    except Exception as exc:
        return "FAULT", f"{nodes} ({how}) cannot be tapped: {type(exc).__name__}: {str(exc)[:160]}"
    sizes = []
    declared = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")  # timm: the size it was built for
    for side in dict.fromkeys((64, 224, *(declared[-1:] if declared else ()))):
        try:
            shapes = knowledge_shapes(tapped, (3, side, side))
        except Exception:
            continue  # a model with a fixed input size, or an op without a meta kernel
        sizes.append(side)
        if len(shapes["feat"]) != 3 or len(shapes["emb"]) != 1 or shapes["logit"] != (CLASSES,):
            return "FAULT", f"{nodes} gives {shapes} at {side} px"
    return how, f"{nodes} (checked at {', '.join(map(str, sizes)) or 'no size'} px)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm", type=int, default=0, help="also the first N timm models")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    names = torchvision.models.list_models(module=torchvision.models)
    if args.timm:
        import timm

        names += [f"timm:{n}" for n in timm.list_models()[:args.timm]]
    tally: dict[str, list[str]] = {}
    for name in names:
        how, detail = check(name)
        tally.setdefault(how, []).append(name)
        print(f"{how:8s} {name:32s} {detail}", flush=True)
    print()
    for how in ("rule", "read", "graph", "none", "unbuilt", "FAULT"):
        print(f"{how:8s} {len(tally.get(how, [])):4d} of {len(names)}")
    print("left without nodes:", ", ".join(tally.get("none", [])) or "none")
    return 1 if tally.get("FAULT") else 0


if __name__ == "__main__":
    sys.exit(main())
