"""ReviewKD on feat + emb against a reference built from explicit sums over kernel offsets."""

from __future__ import annotations

import pytest
import torch

from kd_optuna.distill.baselines import InvalidBaseline, ReviewKD, build_baseline
from kd_optuna.distill.baselines.reviewkd import hcl_loss


def _shapes(c, hw, d):
    return {"feat": (c, hw, hw), "emb": (d,), "logit": (3,)}


def _outputs(shapes, n, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, *v, generator=g).requires_grad_(requires_grad) for k, v in shapes.items()}


# --- reference pieces, written without torch's conv / norm / pooling / interpolation ------------


def _batch_norm(x, bn):
    """Training-mode batch norm: batch statistics, biased variance over N, H, W."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _conv1x1(x, weight, bias=None):
    out = torch.einsum("oi,nihw->nohw", weight[:, :, 0, 0], x)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _conv3x3(x, weight):
    n, c, h, w = x.shape
    padded = torch.zeros(n, c, h + 2, w + 2)
    padded[:, :, 1:-1, 1:-1] = x
    out = 0
    for dy in range(3):
        for dx in range(3):
            window = padded[:, :, dy : dy + h, dx : dx + w]
            out = out + torch.einsum("oi,nihw->nohw", weight[:, :, dy, dx], window)
    return out


def _nearest(x, size):
    """Nearest resize: output row i reads input row floor(i * in / out)."""
    rows = [i * x.shape[2] // size for i in range(size)]
    cols = [j * x.shape[3] // size for j in range(size)]
    return x[:, :, rows][:, :, :, cols]


def _pool(x, size):
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(dim=(3, 5))


def _hcl(y, t):
    total_loss, total_weight, weight = ((y - t) ** 2).mean(), 1.0, 1.0
    for size in (4, 2, 1):
        if size < y.shape[2]:
            weight /= 2
            total_loss = total_loss + weight * ((_pool(y, size) - _pool(t, size)) ** 2).mean()
            total_weight += weight
    return total_loss / total_weight


def _reference(loss, student, teacher):
    a, b = loss.abf_emb, loss.abf_feat
    x2 = _batch_norm(_conv1x1(student["emb"][:, :, None, None], a.conv1[0].weight), a.conv1[1])
    y2 = _batch_norm(_conv3x3(x2, a.conv2[0].weight), a.conv2[1])
    x1 = _batch_norm(_conv1x1(student["feat"], b.conv1[0].weight), b.conv1[1])
    residual = x2.expand(-1, -1, x1.shape[2], x1.shape[3])  # a 1 x 1 map, resized nearest
    att = torch.sigmoid(_conv1x1(torch.cat([x1, residual], 1), b.att_conv[0].weight, b.att_conv[0].bias))
    fused = x1 * att[:, 0:1] + residual * att[:, 1:2]
    fused = _nearest(fused, teacher["feat"].shape[2])
    y1 = _batch_norm(_conv3x3(fused, b.conv2[0].weight), b.conv2[1])
    return loss.weight * (_hcl(y1, teacher["feat"]) + _hcl(y2, teacher["emb"][:, :, None, None]))


@pytest.mark.parametrize("student_hw, teacher_hw", [(4, 8), (8, 4), (4, 4)])
def test_reviewkd_matches_the_reference(student_hw, teacher_hw):
    torch.manual_seed(0)
    s_shapes, t_shapes = _shapes(6, student_hw, 5), _shapes(10, teacher_hw, 9)
    loss = ReviewKD(s_shapes, t_shapes)
    # move the batch norms off their identity initialisation so their affine part is tested
    with torch.no_grad():
        for module in loss.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    student, teacher = _outputs(s_shapes, 5, 1), _outputs(t_shapes, 5, 2)
    with torch.no_grad():
        expected = _reference(loss, student, teacher).item()
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-4)
    assert expected > 0


def test_hcl_by_hand():
    # 2 x 2 maps keep only the 1 x 1 pool: MSE 7.5, pooled (0 - 2.5)^2 = 6.25 at weight 1/2
    student = torch.zeros(1, 1, 2, 2)
    teacher = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert hcl_loss(student, teacher).item() == pytest.approx((7.5 + 0.5 * 6.25) / 1.5)
    # 1 x 1 maps: plain MSE
    assert hcl_loss(torch.zeros(2, 3, 1, 1), torch.ones(2, 3, 1, 1)).item() == pytest.approx(1.0)


def test_reviewkd_defaults_mid_width_and_trainable_layers():
    loss = build_baseline("reviewkd", _shapes(6, 4, 600), _shapes(10, 4, 9))
    assert loss.weight == 5.0 and loss.warmup.warmup_epochs == 20 and loss.ce_weight == 1.0
    assert loss.abf_emb.conv1[0].weight.shape == (512, 600, 1, 1)  # min(512, D_s)
    assert loss.abf_feat.conv2[0].weight.shape == (10, 512, 3, 3)
    assert loss.abf_emb.att_conv is None and loss.abf_feat.att_conv is not None
    narrow = build_baseline("reviewkd", _shapes(6, 4, 5), _shapes(10, 4, 9))
    assert narrow.abf_feat.conv1[0].weight.shape == (5, 6, 1, 1)


def test_reviewkd_gradient_reaches_the_student_and_every_layer_never_the_teacher():
    torch.manual_seed(3)
    s_shapes, t_shapes = _shapes(6, 4, 5), _shapes(10, 8, 9)
    loss_fn = ReviewKD(s_shapes, t_shapes)
    student, teacher = _outputs(s_shapes, 4, 4, True), _outputs(t_shapes, 4, 5, True)
    loss = loss_fn(student, teacher)
    loss.backward()
    assert student["feat"].grad.abs().sum() > 0 and student["emb"].grad.abs().sum() > 0
    assert student["logit"].grad is None
    assert all(t.grad is None for t in teacher.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.parameters())


def test_reviewkd_warm_up_and_batch_norm_batch_size():
    torch.manual_seed(6)
    s_shapes, t_shapes = _shapes(6, 4, 5), _shapes(10, 4, 9)
    loss = ReviewKD(s_shapes, t_shapes, warmup_epochs=5)
    student, teacher = _outputs(s_shapes, 4, 7), _outputs(t_shapes, 4, 8)
    full = loss(student, teacher).item()
    loss.set_epoch(1)
    assert loss(student, teacher).item() == pytest.approx(0.4 * full, rel=1e-5)
    loss.set_epoch(7)
    assert loss(student, teacher).item() == pytest.approx(full, rel=1e-5)
    one = {k: v[:1] for k, v in student.items()}, {k: v[:1] for k, v in teacher.items()}
    with pytest.raises(InvalidBaseline, match="batch of 2"):
        loss(*one)
    loss.eval()
    assert torch.isfinite(loss(*one))


def test_reviewkd_refuses_missing_knowledge():
    with pytest.raises(InvalidBaseline, match="tap"):
        ReviewKD({"feat": (6, 4, 4)}, _shapes(10, 4, 9))
    with pytest.raises(InvalidBaseline, match=r"\(C, H, W\)"):
        ReviewKD({"feat": (6, 16), "emb": (5,)}, _shapes(10, 4, 9))
    loss = ReviewKD(_shapes(6, 4, 5), _shapes(10, 4, 9))
    student, teacher = _outputs(_shapes(6, 4, 5), 3, 9), _outputs(_shapes(10, 4, 9), 3, 10)
    del student["emb"]
    with pytest.raises(InvalidBaseline, match="emb"):
        loss(student, teacher)
