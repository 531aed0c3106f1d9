"""Training the head: a MIL teacher, then a student distilled with the teacher's uncertainty."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from training.head import Head, HeadConfig, HeadNet
from training.losses import bad_points, mil_loss, top_k, uncertainty_loss
from usam_backend.errors import DataError


@dataclass(frozen=True)
class TrainOptions:
    """Training hyper-parameters; every one can be passed to :func:`train_head` by name.

    Attributes:
        epochs: passes over the bags, for the teacher and again for the student.
        batch_size: bags per step (paper: 64).
        lr: Adam learning rate (paper: 1e-3).
        weight_decay: AdamW weight decay.
        a: top-k pooling ratio: a class score averages the ``ceil(d / a)`` highest point logits.
        tau: entropy threshold for "bad" teacher points, as a fraction of the maximum, log K.
        lambda_mil, lambda_unc: weights of the MIL and uncertainty losses for the student
            (paper: 1.0 and 0.15).
        hidden, dropout: network shape (see :class:`HeadConfig`).
        background: add a "none of the classes" output. ``None`` (default): only when some bags
            are negative (all-zero targets). Without negative bags every bag holds background, so
            the output learns nothing and, measured on synthetic bags, makes the student worse.
        progress: show progress bars.
    """

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    a: float = 8.0
    tau: float = 0.5
    lambda_mil: float = 1.0
    lambda_unc: float = 0.15
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.0
    background: bool | None = None
    progress: bool = False

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> TrainOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown training option(s) {unknown}; valid: {sorted(names)}")
        if "hidden" in options:
            options = {**options, "hidden": tuple(options["hidden"])}
        return cls(**options)


@dataclass
class TrainedHeads:
    """The teacher (MIL only) and, when distilled, the student."""

    teacher: Head
    student: Head | None

    @property
    def final(self) -> Head:
        return self.student if self.student is not None else self.teacher


def train_head(
    bags: np.ndarray,
    targets: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    *,
    distill: bool = True,
    seed: int = 0,
    **options: Any,
) -> Head:
    """Train a head on bags of point embeddings with image-level labels.

    Args:
        bags: (N, d, D) float32, the d grid-point embeddings of each of N images.
        targets: (N, C) multi-hot image labels, column order as ``class_names``. With the default
            background output, an all-zero row is a negative image (none of the classes).
        class_names: the C class names.
        distill: train a student with uncertainty distillation from the MIL teacher.
        seed: makes the result reproducible on CPU.
        **options: any :class:`TrainOptions` field.

    Returns:
        The student head (or the teacher with ``distill=False``).
    """
    return train_heads(bags, targets, class_names, distill=distill, seed=seed, **options).final


def train_heads(
    bags: np.ndarray,
    targets: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    *,
    distill: bool = True,
    seed: int = 0,
    **options: Any,
) -> TrainedHeads:
    """:func:`train_head`, returning the teacher as well as the student."""
    opts = TrainOptions.from_kwargs(options)
    background = opts.background if opts.background is not None else bool((np.asarray(targets).sum(axis=1) <= 0).any())
    x, y = _check_inputs(bags, targets, class_names, background)
    config = HeadConfig(x.shape[2], len(class_names), opts.hidden, opts.dropout, background)
    k = top_k(x.shape[1], opts.a)
    mean, std = _standardisation(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = _new_net(config, mean, std)
        teacher_loss = _fit(teacher, x, y, opts, lambda logits, yb, _i: mil_loss(logits, yb, k), "teacher")
        student, student_loss, bad_fraction = None, None, None
        if distill:
            with torch.inference_mode():
                teacher.eval()
                bad = bad_points(teacher(x), y, opts.tau)
            bad_fraction = float(bad.float().mean())
            student = _new_net(config, mean, std)

            def distilled(logits: Tensor, yb: Tensor, index: Tensor) -> Tensor:
                return opts.lambda_mil * mil_loss(logits, yb, k) + opts.lambda_unc * uncertainty_loss(
                    logits, bad[index]
                )

            student_loss = _fit(student, x, y, opts, distilled, "student")
    options_record = {**dataclasses.asdict(opts), "hidden": list(opts.hidden), "k": k, "seed": seed}
    options_record["background"] = background
    options_record.pop("progress")
    base_info = {"training": {"options": options_record, "bags": int(x.shape[0]), "points": int(x.shape[1])}}
    teacher_head = Head(teacher, config, tuple(class_names), _info(base_info, "teacher", teacher_loss))
    student_head = None
    if student is not None:
        info = _info(base_info, "student", student_loss)
        info["training"]["teacher_loss"] = teacher_loss
        info["training"]["bad_point_fraction"] = bad_fraction
        student_head = Head(student, config, tuple(class_names), info)
    return TrainedHeads(teacher_head, student_head)


def _info(base: dict[str, Any], role: str, loss: float | None) -> dict[str, Any]:
    training = {**base["training"], "role": role, "final_loss": loss}
    return {"training": training}


def _check_inputs(
    bags: np.ndarray, targets: np.ndarray, class_names: list[str] | tuple[str, ...], background: bool
) -> tuple[Tensor, Tensor]:
    bags = np.asarray(bags)
    targets = np.asarray(targets)
    if bags.ndim != 3 or bags.shape[0] == 0 or bags.shape[1] == 0:
        raise DataError(f"bags must have shape (N, d, D) with N, d > 0, got {bags.shape}")
    if targets.shape != (bags.shape[0], len(class_names)):
        raise DataError(
            f"targets must have shape (N, C) = ({bags.shape[0]}, {len(class_names)}) "
            f"for {len(class_names)} class names, got {targets.shape}"
        )
    if len(class_names) == 0 or len(set(class_names)) != len(class_names):
        raise DataError(f"class names must be non-empty and unique, got {list(class_names)}")
    if not np.isfinite(bags).all():
        raise DataError("bags contain NaN or infinite values")
    if (targets < 0).any():
        raise DataError("targets must be non-negative (multi-hot)")
    empty = targets.sum(axis=1) <= 0
    if empty.any() and not background:
        raise DataError(f"{int(empty.sum())} bag(s) have no label; negative bags need the background output")
    positives = targets.sum(axis=0) > 0
    if not positives.all():
        missing = [name for name, ok in zip(class_names, positives, strict=True) if not ok]
        raise DataError(f"no bag is labelled with class(es) {missing}: each class needs images")
    if len(class_names) == 1 and not (background and empty.any()):
        raise DataError(
            "one class alone cannot be learned by MIL: add images of other classes, or negative "
            "images (all-zero targets)"
        )
    x = torch.as_tensor(bags, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.float32)
    if background:
        y = torch.cat([y, torch.ones(len(y), 1)], dim=1)
    return x, y


def _standardisation(x: Tensor) -> tuple[Tensor, Tensor]:
    flat = x.reshape(-1, x.shape[-1])
    return flat.mean(dim=0), flat.std(dim=0).clamp_min(1e-6)


def _new_net(config: HeadConfig, mean: Tensor, std: Tensor) -> HeadNet:
    net = HeadNet(config)
    net.mean.copy_(mean)
    net.std.copy_(std)
    return net


LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _fit(net: HeadNet, x: Tensor, y: Tensor, opts: TrainOptions, loss_fn: LossFn, role: str) -> float:
    """Adam(W) over shuffled mini-batches of bags; returns the mean loss of the last epoch."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    steps_per_epoch = math.ceil(len(x) / opts.batch_size)
    net.train()
    last = float("nan")
    epochs = tqdm(range(opts.epochs), desc=f"training {role}", unit="epoch", disable=not opts.progress)
    for _ in epochs:
        order = torch.randperm(len(x))
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * opts.batch_size : (step + 1) * opts.batch_size]
            loss = loss_fn(net(x[index]), y[index], index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        last = total / len(x)
        epochs.set_postfix(loss=f"{last:.4f}")
    net.eval()
    return last
