"""``usam bench-training``: how stable the head's training recipe is, on real-data bags.

The digit-bag proxy (:mod:`training.proxy`) trains the teacher and the distilled student once per
seed, with the paper's top-k pooling from the first epoch and with usam's pooling warm-up, and
prints instance mAP (mean, std, worst, worst below mean) and training seconds per recipe.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.proxy import ProxyRun, digit_proxy, run_proxy

RECIPES: dict[str, dict[str, Any]] = {
    "top-k pooling from the start (before)": {"pool_warmup": 0.0},
    "pooling warm-up (usam default)": {},
}


def summary(values: list[float]) -> str:
    array = np.asarray(values)
    return (
        f"{array.mean():.3f} ± {array.std():.3f}, worst {array.min():.3f} "
        f"({array.mean() - array.min():.3f} below the mean)"
    )


def run_training_bench(*, seeds: int = 8, data_seed: int = 0, epochs: int | None = None) -> str:
    """The table, one block per recipe; each recipe trains ``seeds`` teacher-student pairs."""
    proxy = digit_proxy(data_seed=data_seed)
    extra = {} if epochs is None else {"epochs": epochs}
    lines = [
        f"digit-bag proxy: classes {list(proxy.digits)}, {len(proxy.train.bags)} training bags, "
        f"{len(proxy.test.bags)} test bags of {proxy.train.bags.shape[1]} points; "
        f"instance mAP over training seeds 0..{seeds - 1}"
    ]
    results: dict[str, list[ProxyRun]] = {}
    for name, recipe in RECIPES.items():
        runs = run_proxy(range(seeds), proxy, **recipe, **extra)
        results[name] = runs
        seconds = [run.seconds for run in runs]
        lines += [
            name,
            f"  teacher {summary([run.teacher for run in runs])}",
            f"  student {summary([run.student for run in runs])}",
            f"  per seed (student) {' '.join(f'{run.student:.3f}' for run in runs)}",
            f"  training {sum(seconds):.1f} s in all, {np.mean(seconds):.1f} s per seed",
        ]
    before, after = (sum(run.seconds for run in runs) for runs in results.values())
    lines.append(f"training time, warm-up against before: {after / before:.2f}x")
    return "\n".join(lines)
