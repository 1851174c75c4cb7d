"""Published distillers that the search space can express, written as specs.

Plain data, no torch: the sampler seeds its initial population with these, in this order,
before it draws random specs. Where a method needs something the space lacks (its own
weight, a plain channel mean), the docstring of the entry says how the spec differs.

Reference methods that are not specs (PKT, RKD, CRD, DML) live in ``kd_optuna.distill.baselines``.
"""

from __future__ import annotations

from kd_optuna.space import DistillerSpec


def _spec(knowledge, t1, t2, t3, distance, calibration, temperature, magnitude):
    return DistillerSpec(knowledge, t1, t2, t3, distance, calibration, temperature, magnitude)


#: name -> (spec, description). Order matters: it is the order of the initial population.
CLASSICS: dict[str, tuple[DistillerSpec, str]] = {
    "kd": (
        _spec("logit", "no", "no", "no", "kl", "no", 4, 1),
        "Vanilla KD, Hinton, Vinyals & Dean 2015, 'Distilling the knowledge in a neural "
        "network': T^2 * KL(softmax(t/T) || softmax(s/T)) summed over classes, batch mean, T=4.",
    ),
    "kd_ls": (
        _spec("logit", "zscore", "no", "no", "kl", "no", 4, 10),
        "KD with logit standardization, Sun et al. CVPR 2024: KD on z-scored logits, "
        "lambda * T^2 * KL(softmax(Z(t)/T) || softmax(Z(s)/T)), Z(z) = (z - mean_k z) / "
        "(std_k z + 1e-7) per sample. The paper's defaults (CIFAR-100, its code's "
        "--logit-stand --base-temp 2 --kd-weight 9): base temperature 2 (3 for some pairs, 4 "
        "for resnet110->resnet20), KD weight 9 beside a CE weight of 0.1. The space has no T=2 "
        "nor weight 9: T=4 (the paper's largest, and KD's) and weight 10, next to CE weight 1.",
    ),
    "fitnets": (
        _spec("feat", "no", "no", "no", "l2", "no", 1, 100),
        "FitNets, Romero et al. 2015: hint loss, mean squared error between the teacher's "
        "feature map and the student's after a trainable 1x1-conv + BN regressor (the adapter, "
        "present when the channel counts differ), weight 100 as in CRD's benchmark.",
    ),
    "at": (
        _spec("feat", "satt", "norm_HW", "no", "l2", "no", 1, 100),
        "Attention transfer, Zagoruyko & Komodakis 2017, in the space's terms: the spatial "
        "attention map L2-normalised over HxW, compared with L2. AT's own map is mean_c F^2; "
        "the space's spatial attention is FGD's H*W*softmax(mean_c|F|/0.5).",
    ),
    "sp": (
        _spec("feat", "mm", "norm_C", "no", "l2", "no", 1, 100),
        "Similarity-preserving KD, Tung & Mori 2019: the N x N Gram matrix of flattened "
        "features, each row L2-normalised, compared with mean squared error (SP's weight 3000 "
        "is outside the space; 100 is its largest option).",
    ),
    "cwd": (
        _spec("feat", "channel", "no", "no", "kl", "no", 4, 1),
        "Channel-wise distillation, Shu et al. 2021: each channel's spatial map as a "
        "distribution softmax(x/T) over HxW, KL summed over positions, mean over channels, "
        "times T^2.",
    ),
    "ickd": (
        _spec("feat", "bmm", "norm_HW", "no", "l2", "no", 1, 100),
        "Inter-channel correlation, Liu et al. 2021 (ICKD-C, seed Eq. 6): the C x C channel "
        "Gram matrix, rows L2-normalised, compared with mean squared error.",
    ),
    "dist_intra": (
        _spec("logit", "softmax_C", "no", "no", "pear", "no", 1, 1),
        "DIST's intra-instance relation, Huang et al. 2022: 1 - Pearson correlation of the "
        "class probabilities per sample, at T=1 (DIST's inter-class term is not in the space).",
    ),
    "hard": (
        _spec("logit", "no", "no", "no", "hard", "no", 1, 1),
        "Hard-label distillation, as in DeiT (Touvron et al. 2021): cross-entropy of the "
        "student against the teacher's argmax.",
    ),
    "emb_cos": (
        _spec("emb", "no", "no", "no", "cos", "no", 1, 10),
        "Embedding hint: FitNets' hint (Romero et al. 2015) moved to the pooled embedding, "
        "with a cosine distance, 1 - cos(linear adapter(student emb), teacher emb).",
    ),
}


def classic_specs() -> list[DistillerSpec]:
    """The classic specs in population order."""
    return [spec for spec, _ in CLASSICS.values()]
