"""How stable is the learner? Teacher and student over several seeds on synthetic clustered bags.

Run ``python -m training.study --seeds 8`` for the table in the README. One synthetic world
(class, part and background clusters; a shifted target domain) and one data set are drawn; only
the training seed changes, so the spread is the learner's own instability. Heads train on
single-label source bags and are scored by instance-level mAP on multi-object target bags.

``--feedback`` adds what annotators give: a few annotated target-domain images whose points are
labelled (class, or -1 for background), and compares ways of modelling background with them.
Besides mAP it reports the background false-positive rate: the share of background points whose
best class probability passes the inference threshold (0.5), i.e. what becomes a wrong region.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.metrics import instance_map
from training.synthetic import make_world, source_bags, target_bags
from training.train import train_heads

STUDY_WORLD: dict[str, Any] = {"separation": 0.3, "shift": 0.3, "distortion": 0.3}
"""A synthetic world hard enough that MIL is imperfect and seed-dependent."""

RECIPES: dict[str, dict[str, Any]] = {
    "usam defaults": {},
    "no weight decay": {"weight_decay": 0.0},
    "wider, dropout 0.1": {"hidden": (512, 256, 128), "dropout": 0.1},
}


@dataclass
class SeedScores:
    teacher: list[float] = field(default_factory=list)
    student: list[float] = field(default_factory=list)

    @staticmethod
    def summary(values: list[float]) -> str:
        return f"{np.mean(values):.3f} ± {np.std(values):.3f} (min {np.min(values):.2f}, max {np.max(values):.2f})"


def chance_map(labels: np.ndarray, classes: int) -> float:
    """Instance mAP of a random ranking: the mean share of each class among all instances."""
    return float(np.mean([(labels == c).mean() for c in range(classes) if (labels == c).any()]))


def run_study(
    seeds: Sequence[int],
    *,
    world: dict[str, Any] | None = None,
    data_seed: int = 0,
    per_class: int = 40,
    classes: int = 5,
    **options: Any,
) -> tuple[SeedScores, float]:
    """Teacher and student instance mAP for each training seed, and the test set's chance level."""
    synthetic = make_world(classes=classes, seed=1000 + data_seed, **(world or STUDY_WORLD))
    train = source_bags(synthetic, per_class=per_class, seed=2000 + data_seed)
    test = target_bags(synthetic, seed=3000 + data_seed)
    names = [f"class_{c}" for c in range(classes)]
    flat = test.bags.reshape(-1, test.bags.shape[-1])
    labels = test.labels.reshape(-1)
    scores = SeedScores()
    for seed in seeds:
        heads = train_heads(train.bags, train.targets, names, seed=seed, **options)
        scores.teacher.append(instance_map(heads.teacher.predict_proba(flat), labels))
        if heads.student is not None:
            scores.student.append(instance_map(heads.student.predict_proba(flat), labels))
    return scores, chance_map(labels, classes)


FEEDBACK_WORLD: dict[str, Any] = {"separation": 0.3, "shift": 1.0, "distortion": 0.6}
"""A larger domain shift between class images and the project's images, as between generated
class images and real photos: where in-domain feedback matters."""

FEEDBACK_RECIPES: dict[str, dict[str, Any]] = {
    "class images only (MIL)": {"feedback": False},
    "feedback, background output from instances (default)": {},
    "feedback, background also in every bag's MIL target": {"bag_background": True},
    "feedback, objects only (background points dropped)": {"drop_background": True},
    "feedback, unbalanced instance loss": {"balance_instances": False},
}


@dataclass
class FeedbackScores:
    map: list[float] = field(default_factory=list)
    background_fp: list[float] = field(default_factory=list)


def run_feedback_study(
    seeds: Sequence[int],
    *,
    annotated: int = 5,
    world: dict[str, Any] | None = None,
    data_seed: int = 0,
    per_class: int = 40,
    classes: int = 5,
    feedback: bool = True,
    drop_background: bool = False,
    threshold: float = 0.5,
    **options: Any,
) -> tuple[FeedbackScores, float]:
    """Student instance mAP and background false-positive rate on held-out target images, for
    heads trained on class-image bags plus the points of ``annotated`` labelled target images."""
    synthetic = make_world(classes=classes, seed=1000 + data_seed, **(world or FEEDBACK_WORLD))
    train = source_bags(synthetic, per_class=per_class, seed=2000 + data_seed)
    labelled = target_bags(synthetic, images=annotated, seed=4000 + data_seed)
    test = target_bags(synthetic, seed=3000 + data_seed)
    names = [f"class_{c}" for c in range(classes)]
    flat = test.bags.reshape(-1, test.bags.shape[-1])
    labels = test.labels.reshape(-1)
    inst_x: np.ndarray = labelled.bags.reshape(-1, labelled.bags.shape[-1])
    inst_y: np.ndarray = labelled.labels.reshape(-1)
    if drop_background:
        inst_x, inst_y = inst_x[inst_y >= 0], inst_y[inst_y >= 0]
    extra: dict[str, Any] = {"instances": inst_x, "instance_targets": inst_y} if feedback else {}
    scores = FeedbackScores()
    for seed in seeds:
        head = train_heads(train.bags, train.targets, names, seed=seed, **extra, **options).final
        probs = head.predict_proba(flat)
        scores.map.append(instance_map(probs, labels))
        scores.background_fp.append(float((probs[labels < 0].max(axis=1) >= threshold).mean()))
    return scores, chance_map(labels, classes)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--separation", type=float, default=STUDY_WORLD["separation"])
    parser.add_argument("--data-seed", type=int, default=0, help="which synthetic world and data set")
    parser.add_argument("--feedback", action="store_true", help="compare ways of learning from annotated images")
    parser.add_argument("--annotated", type=int, default=5, help="annotated target images (with --feedback)")
    args = parser.parse_args(argv)
    world = {**STUDY_WORLD, "separation": args.separation}
    if args.feedback:
        world = {**FEEDBACK_WORLD, "separation": args.separation}
        print(f"student on held-out target images, {args.annotated} annotated, seeds 0..{args.seeds - 1}, {world}")
        for name, recipe in FEEDBACK_RECIPES.items():
            start = time.perf_counter()
            fb, chance = run_feedback_study(
                range(args.seeds), annotated=args.annotated, world=world, data_seed=args.data_seed, **recipe
            )
            print(f"{name}: mAP {SeedScores.summary(fb.map)}")
            print(f"    background false positives {SeedScores.summary(fb.background_fp)}")
            print(f"    chance mAP {chance:.3f}, {time.perf_counter() - start:.0f} s")
        return
    print(f"instance mAP on shifted multi-object bags, training seeds 0..{args.seeds - 1}, world {world}")
    for name, recipe in RECIPES.items():
        start = time.perf_counter()
        scores, chance = run_study(range(args.seeds), world=world, data_seed=args.data_seed, **recipe)
        print(f"{name}: teacher {SeedScores.summary(scores.teacher)}")
        print(f"{' ' * len(name)}  student {SeedScores.summary(scores.student)}")
        print(f"{' ' * len(name)}  chance {chance:.3f}, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
