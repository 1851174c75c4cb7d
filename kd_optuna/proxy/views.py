"""The proxy's data on its device: the images and labels (:class:`ProxyData`), the fixed pool of
augmented views of each KD image (:class:`ViewPool`), and the teacher's outputs for a batch of
(image, view) pairs (:data:`TeacherLookup`; :func:`live_teacher` runs the teacher,
:mod:`kd_optuna.proxy.cache` reads them from its cache)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_optuna.data import class_balanced_subset
from kd_optuna.errors import KdOptunaError
from kd_optuna.proxy.settings import ProxySettings

@dataclass(frozen=True)
class ViewPool:
    """``views`` fixed augmented copies of each of ``n`` images: crop offsets and flips.

    offsets (n, views, 2) in [0, 2 * shift], flips (n, views) bool, ``flipping`` whether any
    flip is set; view 0 is the identity.
    ``render(images (B, C, H, W), rows (B,), views (B,))`` pads by ``shift`` with zeros and
    crops each image at its offset, on the images' device, in one gather.
    """

    offsets: Tensor
    flips: Tensor
    shift: int
    flipping: bool = False

    @classmethod
    def build(cls, n: int, settings: ProxySettings, device: torch.device | str = "cpu") -> "ViewPool":
        generator = torch.Generator().manual_seed(settings.view_seed)
        shift = settings.shift if settings.augment != "none" else 0
        offsets = torch.randint(0, 2 * shift + 1, (n, settings.views, 2), generator=generator)
        flips = torch.rand(n, settings.views, generator=generator) < 0.5
        if settings.augment != "shift_flip":
            flips[:] = False
        offsets[:, 0] = shift
        flips[:, 0] = False
        return cls(offsets.to(device), flips.to(device), shift, bool(flips.any()))

    @property
    def views(self) -> int:
        return self.offsets.shape[1]

    def render(self, images: Tensor, rows: Tensor, views: Tensor) -> Tensor:
        if self.shift == 0 and not self.flipping:
            return images
        b, _, h, w = images.shape
        offsets = self.offsets[rows, views]
        s = self.shift
        padded = F.pad(images, (s, s, s, s))
        ys = offsets[:, 0, None] + torch.arange(h, device=images.device)
        xs = offsets[:, 1, None] + torch.arange(w, device=images.device)
        xs = torch.where(self.flips[rows, views][:, None], xs.flip(1), xs)
        batch = torch.arange(b, device=images.device)[:, None, None]
        return padded[batch, :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2).contiguous()

    def fingerprint(self) -> bytes:
        return self.offsets.cpu().numpy().tobytes() + self.flips.cpu().numpy().tobytes()


@dataclass
class ProxyData:
    """Proxy tensors on one device.

    train_x (N, C, H, W), train_y (N,); labelled (L,) and pool (P,) index train; val_x (M, ...),
    val_y (M,) is held out (training never sees it); views covers the P pool images.

    train_x is float32 and normalised, or, with ``pixel_stats`` (per-channel mean and std), the
    uint8 pixels of an 8-bit dataset (a quarter of the memory: 147 KiB instead of 588 KiB an
    image at 224 px), normalised batch by batch in :meth:`train_images` with the arithmetic of
    torchvision's ToTensor and Normalize (the same float32 values bit for bit). Read train
    images through :meth:`train_images` or :meth:`pool_images`; val_x is always float32.
    """

    train_x: Tensor
    train_y: Tensor
    labelled: Tensor
    pool: Tensor
    val_x: Tensor
    val_y: Tensor
    views: ViewPool
    num_classes: int
    pixel_stats: tuple[Tensor, Tensor] | None = None

    @classmethod
    def build(
        cls,
        train_x: Tensor,
        train_y: Tensor,
        val_x: Tensor,
        val_y: Tensor,
        settings: ProxySettings,
        device: torch.device | str = "cpu",
        num_classes: int | None = None,
        pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> "ProxyData":
        """``train_x`` float images, or uint8 pixels (N, C, H, W) with ``pixel_stats`` =
        (mean, std) per channel, as torchvision's Normalize takes them."""
        if (train_x.dtype == torch.uint8) != (pixel_stats is not None):
            raise KdOptunaError("ProxyData.build takes uint8 train pixels together with pixel_stats (mean, std), "
                                "float images without")
        stats = None
        if pixel_stats is not None:
            stats = tuple(torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device) for v in pixel_stats)
        labelled = class_balanced_subset(train_y, settings.labels_per_class, seed=settings.label_seed, at_most=True)
        pool = torch.arange(train_y.shape[0]) if settings.kd_source == "train" else labelled
        if settings.kd_pool_size:
            pool = pool[: settings.kd_pool_size]
        classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
        if settings.val_size and settings.val_size < val_y.shape[0]:
            keep = class_balanced_subset(val_y, max(1, settings.val_size // classes), seed=0, at_most=True)
            val_x, val_y = val_x[keep[: settings.val_size]], val_y[keep[: settings.val_size]]
        return cls(
            (train_x if stats is not None else train_x.float()).to(device), train_y.long().to(device),
            labelled.to(device), pool.to(device), val_x.float().to(device), val_y.long().to(device),
            ViewPool.build(pool.shape[0], settings, device), classes, stats,
        )

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def train_images(self, rows: Tensor) -> Tensor:
        """Normalised float32 train images at ``rows`` (B,) -> (B, C, H, W)."""
        x = self.train_x[rows]
        if self.pixel_stats is None:
            return x
        mean, std = self.pixel_stats
        return x.float().div_(255).sub_(mean).div_(std)

    def pool_images(self, positions: Tensor, views: Tensor) -> Tensor:
        """Rendered pool images at pool positions (B,) and views (B,) -> (B, C, H, W)."""
        return self.views.render(self.train_images(self.pool[positions]), positions, views)


TeacherLookup = Callable[[Tensor, Tensor], Mapping[str, Tensor]]
"""(pool positions (B,), views (B,)) -> teacher outputs {feat, emb, logit} as float32."""


def live_teacher(teacher: nn.Module, data: ProxyData) -> TeacherLookup:
    """A lookup that runs the frozen teacher (eval mode) on the rendered views every time."""

    @torch.no_grad()
    def lookup(positions: Tensor, views: Tensor) -> Mapping[str, Tensor]:
        teacher.eval()
        return {k: v.float().contiguous() for k, v in teacher(data.pool_images(positions, views)).items()}

    return lookup
