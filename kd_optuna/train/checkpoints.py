"""Checkpoints: our own format, plain state dicts and RepDistiller / mdistiller teachers.

``save_checkpoint`` writes ``{"format", "state_dict", "meta"}`` where meta holds model_name,
num_classes, dataset, accuracy, sha256 (of the weights, see ``weights_sha256``) and the package
version. ``load_state`` reads, always with ``torch.load(..., weights_only=True)``, any of

- our checkpoint (the hash is verified; model name and class count are checked against meta),
- a plain state dict ``{name: tensor}``,
- the ``ckpt_epoch_240.pth`` layout of RepDistiller and mdistiller, ``{"model": state_dict, ...}``
  (our zoo uses their parameter names, so no conversion is needed),

and, in every case, the weights are checked against ``build_model(model_name, num_classes)``, as
saved and then without each prefix a wrapper leaves on every key (``module.``: DataParallel and
DistributedDataParallel; ``model.``: a LightningModule or another module holding the model as
``self.model``; ``_orig_mod.``: ``torch.compile``), so a model whose own keys start so loads as
saved; a mismatch names both architectures. BatchNorm's
``num_batches_tracked`` counters, absent from checkpoints of PyTorch before 0.4.1, are filled with
0, as ``load_state_dict`` does for them.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from kd_optuna import __version__
from kd_optuna.errors import KdOptunaError
from kd_optuna.files import atomic_save
from kd_optuna.models import MODEL_NAMES, build_model, build_model_skeleton

FORMAT = "kd-optuna-checkpoint/1"


class CheckpointError(KdOptunaError):
    """A checkpoint that cannot be read, is corrupt, or holds another architecture or class count."""


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, each key's dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_name: str,
    num_classes: int,
    dataset: str,
    accuracy: float,
    extra: dict | None = None,
) -> Path:
    """Write ``model``'s state dict and metadata to ``path`` (atomically; ``~`` is the home
    folder, as for ``read_checkpoint``); return the path."""
    path = Path(path).expanduser()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    meta = {
        "model_name": model_name,
        "num_classes": int(num_classes),
        "dataset": dataset,
        "accuracy": float(accuracy),
        "sha256": weights_sha256(state),
        "version": __version__,
        **(extra or {}),
    }
    return atomic_save({"format": FORMAT, "state_dict": state, "meta": meta}, path)


def check_writable(path: str | os.PathLike) -> None:
    """CheckpointError unless ``save_checkpoint`` can write ``path``: its folder is made and a
    file of a unique name beside it is created and removed. For a caller to learn before
    training, not after."""
    import tempfile

    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=".probe"):
            pass
    except OSError as exc:
        reason = f"{type(exc).__name__}: {exc.strerror or exc}"
        raise CheckpointError(f"cannot write the checkpoint {path} ({reason}); choose another path") from None


#: What ``torch.load(weights_only=True)`` raises for a file that is not a readable checkpoint of
#: weights (truncated, empty, another format, pickled objects): :func:`unreadable_reason` says which.
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError,
               IndexError, KeyError, TypeError)

_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_RESAVE = "where the model is defined, save only its weights: torch.save(model.state_dict(), path)"


def unreadable_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in words that end with the fix.

    torch's own message advises loading with weights_only=False, which runs whatever code the
    file holds; that advice is never repeated: only the name of a refused global is kept."""
    text = str(exc)
    found = _GLOBAL.search(text)
    if found:
        return (
            f"holds Python objects besides tensors ({found.group(1)}), which kd-optuna never loads; {_RESAVE}"
        )
    if isinstance(exc, OSError) and not isinstance(exc, EOFError):
        return f"cannot be read ({type(exc).__name__}: {exc.strerror or 'I/O error'}); check the file's permissions"
    if isinstance(exc, EOFError) or "central directory" in text or "zip archive" in text:
        return "is empty or truncated (an interrupted copy or download?); copy the checkpoint again"
    return f"is not a PyTorch checkpoint of weights ({type(exc).__name__}); check the path, or {_RESAVE}"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, our meta or None) from any supported layout, weights_only, hash verified;
    ``~`` in ``path`` is the home folder."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"checkpoint {path} {unreadable_reason(exc)}") from None
    meta = None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        state, meta = payload["state_dict"], payload["meta"]
        if weights_sha256(state) != meta.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is corrupt: its weights do not match the sha256 in its metadata")
    elif isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        state = payload["model"]
    elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        state = payload["state_dict"]
    else:
        state = payload
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict (expected {{name: tensor}}, {{'model': ...}} or our format)"
        )
    return state, meta


#: Prefixes that wrappers put before every key of a model's state dict (module docstring).
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def _unwrappings(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``state``, then ``state`` without each further wrapper prefix shared by all its keys
    (``module.model.`` gives three): the readings of a checkpoint, the model's own keys first."""
    readings = [state]
    while True:
        shared = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in readings[-1])), None)
        if shared is None:
            return readings
        readings.append({k[len(shared):]: v for k, v in readings[-1].items()})


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _class_count(expected: dict, state: dict) -> int | None:
    """The checkpoint's class count: dim 0 of the tensors whose shape differs from the
    expected model's in dim 0 only (the classifier), if that is all that differs."""
    differing = [k for k in expected if tuple(state[k].shape) != expected[k]]
    counts = {state[k].shape[0] for k in differing if state[k].shape[1:] == expected[k][1:]}
    if differing and len(counts) == 1 and all(state[k].shape[1:] == expected[k][1:] for k in differing):
        return counts.pop()
    return None


def describe_architecture(state: dict[str, torch.Tensor], asked: str | None = None) -> str:
    """'<name> with <K> classes' for the first of ``asked`` (the model a caller wanted: any
    torchvision or timm name too) and the zoo's models whose parameter names and shapes (apart
    from the class count) match ``state``; else 'an unknown architecture'."""
    for name in dict.fromkeys([asked, *MODEL_NAMES] if asked else MODEL_NAMES):
        try:
            expected = _shapes(build_model_skeleton(name, 1))
        except KdOptunaError:
            continue
        if set(expected) != set(state):
            continue
        classes = _class_count(expected, state)
        if classes is not None:
            return f"{name} with {classes} classes"
    return f"an unknown architecture ({len(state)} tensors, first {next(iter(state))!r})"


def load_state(path: str | os.PathLike, model_name: str, num_classes: int) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, checked to fit ``build_model(model_name, num_classes)``."""
    state, meta = read_checkpoint(path)
    return _checked(path, state, meta, model_name, num_classes)


def _checked(path, state: dict, meta: dict | None, model_name: str, num_classes: int) -> dict[str, torch.Tensor]:
    wanted = f"{model_name} with {num_classes} classes"
    if meta is not None and (meta.get("model_name"), meta.get("num_classes")) != (model_name, num_classes):
        held = f"{meta.get('model_name')} with {meta.get('num_classes')} classes"
        raise CheckpointError(f"checkpoint {path} holds {held}, but {wanted} was asked for")
    expected = _shapes(build_model_skeleton(model_name, num_classes))
    readings = _unwrappings(state)
    for reading in readings:
        untracked = [k for k in expected if k.endswith(".num_batches_tracked") and k not in reading]
        filled = {**reading, **{k: torch.tensor(0, dtype=torch.long) for k in untracked}}
        if set(expected) == set(filled) and all(tuple(filled[k].shape) == expected[k] for k in expected):
            return filled
    held = describe_architecture(readings[-1], model_name)
    raise CheckpointError(f"checkpoint {path} holds {held}, but {wanted} was asked for")


def load_model(
    path: str | os.PathLike,
    model_name: str | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict | None]:
    """Build the model and load ``path`` into it, in eval mode. Name and class count default to
    the checkpoint's metadata (our format); returns (model, meta or None)."""
    state, meta = read_checkpoint(path)
    model_name = model_name or (meta or {}).get("model_name")
    num_classes = num_classes or (meta or {}).get("num_classes")
    if model_name is None or num_classes is None:
        raise CheckpointError(f"checkpoint {path} has no metadata: give the model name and number of classes")
    model = build_model(model_name, num_classes)
    model.load_state_dict(_checked(path, state, meta, model_name, num_classes))
    return model.to(device).eval(), meta
