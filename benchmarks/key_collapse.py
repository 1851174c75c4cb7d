"""How much of the search space the canonical key collapses, and whether it is sound and complete.

    python benchmarks/key_collapse.py [--samples 200000] [--bases 60] [--seed 0]

Three measurements, "before" being the rank-only key (transforms that cannot act at the
knowledge's rank removed, as the key was until issue 15) and "after" ``DistillerSpec.key``:

1. The whole space, enumerated exactly: params sets, distinct keys before and after.
2. Random specs drawn uniformly (with replacement) from the whole space: the fraction of
   distinct keys among them, before and after.
3. Neighbours: for random base specs, every spec one gene away. Each pair's loss is computed
   as written (``DistillerLoss(literal=True)``) on three input sets (odd sizes, N = 1, 3, 4,
   labels, the random ops seeded alike). Soundness: pairs with one key and different values
   (must be 0). Completeness: of the pairs with equal values on all inputs (both refused
   left out), the share that has one key, before and after; the pairs left, grouped by the
   gene that differs. Equal values on three inputs do not prove equal losses: the pairs left
   are candidates, read by hand.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import random
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from kd_optuna import space  # noqa: E402
from kd_optuna.space import (  # noqa: E402
    GENES,
    KNOWLEDGE_RANK,
    DistillerSpec,
    _reduce_chain,
    _reduce_tail,
    _scale_form,
    _fraction,
)

INPUTS = (
    ({"logit": (10,), "emb": (6,), "feat": (3, 4, 5)}, 4),
    ({"logit": (3,), "emb": (5,), "feat": (2, 3, 3)}, 1),
    ({"logit": (7,), "emb": (4,), "feat": (4, 2, 6)}, 3),
)


def old_key(spec: DistillerSpec) -> str:
    acting = spec.effective_transforms()
    padded = acting + ("no",) * (3 - len(acting))
    return (
        f"{spec.knowledge}|{'>'.join(padded)}|{spec.distance}|{spec.calibration}"
        f"|T{spec.temperature}|x{spec.magnitude:g}"
    )


def whole_space(options=None) -> tuple[int, int, int]:
    """(params sets, keys before, keys after) of a space (default: all), by enumerating chains.

    Keys after are counted without building every spec: the key is (knowledge, the chain after
    the transform identities and the distance's tail rules, distance, calibration, the
    (T, lambda) form); the calibrations other than ``sim`` follow the same rules.
    """
    options = dict(space.FULL_OPTIONS if options is None else options)
    temperatures, magnitudes = options["temperature"], options["magnitude"]
    forms = {
        (d, j): {_scale_form(d, t, _fraction(m), j) for t in temperatures for m in magnitudes}
        for d in space.DISTANCES for j in range(4)
    }
    n_tm = len(temperatures) * len(magnitudes)
    calibrations = options["calibration"]
    n_other = sum(c != "sim" for c in calibrations)
    classes = (["sim"] if "sim" in calibrations else []) + (["no"] if n_other else [])
    old_chains: set = set()
    groups: dict[tuple, int] = collections.defaultdict(int)  # -> bit mask of scale counts
    tails: dict[tuple, tuple] = {}
    slots = (options["transform1"], options["transform2"], options["transform3"])
    for knowledge in options["knowledge"]:
        for transforms in itertools.product(*slots):
            rank, acting = KNOWLEDGE_RANK[knowledge], []
            for name in transforms:
                out = space.TRANSFORM_RANKS[name].get(rank)
                if out is not None:
                    acting.append(name)
                    rank = out
            old_chains.add((knowledge, tuple(acting)))
            chain, _ = _reduce_chain(knowledge, transforms)
            names = tuple(name for name, _ in chain)
            for distance in options["distance"]:
                for calibration in classes:
                    memo = (knowledge, names, distance, calibration)
                    if memo not in tails:
                        core, _, scales, _, reduced = _reduce_tail(
                            knowledge, tuple((n, "") for n in names), distance, calibration
                        )
                        tails[memo] = (tuple(n for n, _ in core), scales, reduced)
                    core, scales, reduced = tails[memo]
                    groups[(knowledge, core, reduced, calibration)] |= 1 << scales
    after = 0
    for (_, _, distance, calibration), mask in groups.items():
        union = set().union(*(forms[(distance, j)] for j in range(4) if mask >> j & 1))
        after += len(union) * (1 if calibration == "sim" else n_other)
    before = len(old_chains) * len(options["distance"]) * len(calibrations) * n_tm
    total = 1
    for gene in GENES:
        total *= len(options[gene])
    return total, before, after


def random_spec(rng: random.Random) -> DistillerSpec:
    return DistillerSpec(*(rng.choice(space.FULL_OPTIONS[gene]) for gene in GENES))


def neighbours(spec: DistillerSpec):
    params = spec.to_params()
    for gene in GENES:
        for option in space.FULL_OPTIONS[gene]:
            if option != params[gene]:
                yield DistillerSpec.from_params({**params, gene: option})


def values(spec: DistillerSpec, seed: int) -> tuple:
    import torch

    from kd_optuna.errors import InvalidDistiller
    from kd_optuna.distill.loss import DistillerLoss

    out = []
    for shapes, n in INPUTS:
        torch.manual_seed(seed)
        try:
            loss = DistillerLoss(spec, shapes, shapes, literal=True)
        except InvalidDistiller as error:
            return (error.reason,) * len(INPUTS)
        generator = torch.Generator().manual_seed(seed)
        s = {k: torch.randn((n, *v), generator=generator) * 2 for k, v in shapes.items()}
        t = {k: torch.randn((n, *v), generator=generator) * 2 for k, v in shapes.items()}
        labels = torch.randint(0, shapes["logit"][0], (n,), generator=generator)
        torch.manual_seed(seed + 1)
        try:
            out.append(loss(s, t, labels).item())
        except InvalidDistiller as error:
            out.append(error.reason)
    return tuple(out)


def same(a: tuple, b: tuple) -> bool:
    for x, y in zip(a, b):
        if isinstance(x, str) or isinstance(y, str):
            if x != y:
                return False
        elif abs(x - y) > 1e-4 * max(abs(x), abs(y)) + 1e-7:
            return False
    return True


def differing_gene(a: DistillerSpec, b: DistillerSpec) -> str:
    return next(g for g in GENES if getattr(a, g) != getattr(b, g))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--bases", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-enumeration", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rng = random.Random(args.seed)

    if not args.skip_enumeration:
        start = time.perf_counter()
        total, before, after = whole_space()
        print(f"1. whole space ({time.perf_counter() - start:.0f} s): {total:,} params sets, "
              f"{before:,} keys before ({before / total:.4f}), {after:,} after ({after / total:.4f})")

    specs = [random_spec(rng) for _ in range(args.samples)]
    distinct_params = len(set(specs))
    before = len({old_key(s) for s in specs})
    after = len({s.key for s in specs})
    print(f"2. {args.samples:,} random specs: {distinct_params / args.samples:.4f} distinct params, "
          f"{before / args.samples:.4f} distinct keys before, {after / args.samples:.4f} after")

    pairs = equal = equal_old = equal_new = unsound = zero_pairs = refused_pairs = 0
    missed: collections.Counter = collections.Counter()
    examples: dict[str, tuple] = {}
    start = time.perf_counter()
    for b in range(args.bases):
        base = random_spec(rng)
        seed = 1000 + b
        base_values = values(base, seed)
        for other in neighbours(base):
            pairs += 1
            other_values = values(other, seed)
            one_key = other.key == base.key
            if not same(base_values, other_values):
                if one_key:
                    unsound += 1
                    print("UNSOUND", base.to_params(), other.to_params(), base_values, other_values)
                continue
            if base.refusal() is not None and other.refusal() is not None:
                refused_pairs += 1
                continue
            equal += 1
            equal_old += old_key(other) == old_key(base)
            equal_new += one_key
            if not one_key:
                if all(v == 0 for v in base_values):
                    zero_pairs += 1
                    continue
                gene = differing_gene(base, other)
                label = f"{gene} differs, {base.distance}"
                missed[label] += 1
                examples.setdefault(label, (base.key, other.key))
    elapsed = time.perf_counter() - start
    print(f"3. {args.bases} bases, {pairs:,} one-gene neighbours ({elapsed:.0f} s): "
          f"{unsound} pairs with one key and different losses; {equal:,} pairs with equal losses "
          f"on every input set, of which {equal_old:,} ({equal_old / max(equal, 1):.3f}) share a "
          f"key before and {equal_new:,} ({equal_new / max(equal, 1):.3f}) after")
    print(f"   left out: {refused_pairs:,} pairs both refused (no loss); not collapsed: "
          f"{zero_pairs:,} pairs both identically 0 on the inputs, and")
    for label, count in missed.most_common(12):
        print(f"   {count:5d}  {label}: e.g. {examples[label][0]}  ~  {examples[label][1]}")
    return 1 if unsound else 0


if __name__ == "__main__":
    sys.exit(main())
