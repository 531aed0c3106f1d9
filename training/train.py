"""Training the head: a MIL teacher, then a student distilled with the teacher's uncertainty."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from training.head import Head, HeadConfig, HeadNet
from training.losses import bad_points, mil_loss, pooled_k, top_k, uncertainty_loss
from usam_backend.core.errors import DataError


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
        background: add a "none of the classes" output. ``None`` (default): only when something
            teaches it: negative bags (all-zero targets) or background instances (``-1``). Without
            them every bag holds background, so the output learns nothing and, measured on
            synthetic bags, makes the student worse.
        bag_background: with a background output, whether the MIL loss covers it too (a positive
            bag's target then includes background, a negative bag's is background alone).
            ``None`` (default): only when there are negative bags (MIL needs them to learn one
            class against "anything else"). Otherwise the MIL loss covers the class outputs and
            the background output learns from background instances alone, which measured better
            (``python -m training.study --feedback``).
        instance_weight: weight of the instance cross-entropy (annotated points) against MIL.
        balance_instances: weight instance classes (background included) inversely to their
            frequency, so the many background points do not drown a rare class.
        pool_warmup: share of the epochs over which MIL pooling narrows from the mean of all d
            points to the top k (:func:`training.losses.pooled_k`), for teacher and student.
            With top-k from the first step only the points a fresh network happens to rank
            highest are taught; a class whose own points start low is never taught on them,
            and becomes the "none of the others" class: on real-data bags (``usam
            bench-training``) one class stayed near chance in 3 of 8 seeds. 0 is the paper's
            recipe.
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
    bag_background: bool | None = None
    instance_weight: float = 1.0
    balance_instances: bool = True
    pool_warmup: float = 0.25
    progress: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.pool_warmup <= 1.0:
            raise ValueError(f"pool_warmup is a share of the epochs, 0..1, got {self.pool_warmup}")

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
    instances: np.ndarray | None = None,
    instance_targets: np.ndarray | None = None,
    **options: Any,
) -> Head:
    """Train a head on bags of point embeddings with image-level labels, plus labelled points.

    Args:
        bags: (N, d, D) float32, the d grid-point embeddings of each of N images.
        targets: (N, C) multi-hot image labels, column order as ``class_names``. An all-zero row
            is a negative image (none of the classes).
        class_names: the C class names.
        distill: train a student with uncertainty distillation from the MIL teacher.
        seed: makes the result reproducible on CPU.
        instances: (M, D) float32 embeddings of individually labelled points (annotators'
            feedback), trained with a cross-entropy next to the MIL loss, teacher and student alike.
        instance_targets: (M,) int class index per instance, ``-1`` for background.
        **options: any :class:`TrainOptions` field.

    Returns:
        The student head (or the teacher with ``distill=False``).
    """
    return train_heads(
        bags, targets, class_names, distill=distill, seed=seed, instances=instances,
        instance_targets=instance_targets, **options,
    ).final  # fmt: skip


@dataclass
class _Data:
    x: Tensor  # N, d, D bags
    y: Tensor  # N, K bag targets over all outputs (background column included)
    mil_outputs: int  # how many leading outputs the MIL loss covers
    inst_x: Tensor  # M, D
    inst_y: Tensor  # M, output index (background = C)
    inst_weight: Tensor  # K, cross-entropy weight per output


def train_heads(
    bags: np.ndarray,
    targets: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    *,
    distill: bool = True,
    seed: int = 0,
    instances: np.ndarray | None = None,
    instance_targets: np.ndarray | None = None,
    **options: Any,
) -> TrainedHeads:
    """:func:`train_head`, returning the teacher as well as the student."""
    opts = TrainOptions.from_kwargs(options)
    data, background = _check_inputs(bags, targets, class_names, instances, instance_targets, opts)
    x = data.x
    config = HeadConfig(x.shape[2], len(class_names), opts.hidden, opts.dropout, background)
    k = top_k(x.shape[1], opts.a)
    mean, std = _standardisation(x, data.inst_x)
    mil_outputs = data.mil_outputs

    warmup_epochs = opts.pool_warmup * opts.epochs

    def mil(logits: Tensor, yb: Tensor, epoch: int) -> Tensor:
        positive = yb[:, :mil_outputs].sum(dim=1) > 0
        if not positive.any():
            return logits.sum() * 0.0
        return mil_loss(
            logits[positive][..., :mil_outputs],
            yb[positive][:, :mil_outputs],
            pooled_k(x.shape[1], k, epoch, warmup_epochs),
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = _new_net(config, mean, std)
        teacher_loss = _fit(teacher, data, opts, lambda logits, yb, _i, epoch: mil(logits, yb, epoch), "teacher")
        student, student_loss, bad_fraction = None, None, None
        if distill:
            with torch.inference_mode():
                teacher.eval()
                bad = bad_points(teacher(x), data.y, opts.tau)
            bad_fraction = float(bad.float().mean())
            student = _new_net(config, mean, std)

            def distilled(logits: Tensor, yb: Tensor, index: Tensor, epoch: int) -> Tensor:
                mil_term = mil(logits, yb, epoch)
                return opts.lambda_mil * mil_term + opts.lambda_unc * uncertainty_loss(logits, bad[index])

            student_loss = _fit(student, data, opts, distilled, "student")
    options_record = {**dataclasses.asdict(opts), "hidden": list(opts.hidden), "k": k, "seed": seed}
    options_record.update(background=background, bag_background=mil_outputs == config.outputs and background)
    options_record.pop("progress")
    base_info = {
        "training": {
            "options": options_record,
            "bags": int(x.shape[0]),
            "points": int(x.shape[1]),
            "instances": _instance_counts(data.inst_y, class_names),
        }
    }
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


def _instance_counts(inst_y: Tensor, class_names: list[str] | tuple[str, ...]) -> dict[str, int]:
    counts = torch.bincount(inst_y, minlength=len(class_names) + 1).tolist() if len(inst_y) else []
    names = [*class_names, "_background"]
    return {name: int(n) for name, n in zip(names, counts, strict=False) if n}


def _check_inputs(
    bags: np.ndarray,
    targets: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    instances: np.ndarray | None,
    instance_targets: np.ndarray | None,
    opts: TrainOptions,
) -> tuple[_Data, bool]:
    bags = np.asarray(bags)
    targets = np.asarray(targets)
    classes = len(class_names)
    if bags.ndim != 3 or bags.shape[0] == 0 or bags.shape[1] == 0:
        raise DataError(f"bags must have shape (N, d, D) with N, d > 0, got {bags.shape}")
    if targets.shape != (bags.shape[0], classes):
        raise DataError(
            f"targets must have shape (N, C) = ({bags.shape[0]}, {classes}) "
            f"for {classes} class names, got {targets.shape}"
        )
    if classes == 0 or len(set(class_names)) != classes:
        raise DataError(f"class names must be non-empty and unique, got {list(class_names)}")
    if not np.isfinite(bags).all():
        raise DataError("bags contain NaN or infinite values")
    if (targets < 0).any():
        raise DataError("targets must be non-negative (multi-hot)")
    inst_x, inst_y = _check_instances(instances, instance_targets, bags.shape[2], classes)
    empty = targets.sum(axis=1) <= 0
    background_instances = bool((inst_y < 0).any())
    background = opts.background if opts.background is not None else bool(empty.any() or background_instances)
    if empty.any() and not background:
        raise DataError(f"{int(empty.sum())} bag(s) have no label; negative bags need the background output")
    if background_instances and not background:
        raise DataError("background instances (-1) need the background output (background=True)")
    positives = (targets.sum(axis=0) > 0) | np.isin(np.arange(classes), inst_y)
    if not positives.all():
        missing = [name for name, ok in zip(class_names, positives, strict=True) if not ok]
        raise DataError(f"no bag or instance is labelled with class(es) {missing}: each class needs images")
    if classes == 1 and not (background and (empty.any() or background_instances)):
        raise DataError(
            "one class alone cannot be learned by MIL: add images of other classes, or negative "
            "images (all-zero targets)"
        )
    bag_background = opts.bag_background if opts.bag_background is not None else bool(empty.any())
    bag_background = bag_background and background
    x = torch.as_tensor(bags, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.float32)
    if background:
        y = torch.cat([y, torch.ones(len(y), 1)], dim=1)  # any bag may show background
    outputs = classes + int(background)
    inst_index = torch.as_tensor(np.where(inst_y < 0, classes, inst_y), dtype=torch.long)
    weight = torch.ones(outputs)
    if opts.balance_instances and len(inst_index):
        counts = torch.bincount(inst_index, minlength=outputs).float()
        present = counts > 0
        weight[present] = counts[present].sum() / (present.sum() * counts[present])
    data = _Data(x, y, outputs if bag_background else classes, torch.as_tensor(inst_x), inst_index, weight)
    return data, background


def _check_instances(
    instances: np.ndarray | None, instance_targets: np.ndarray | None, dim: int, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    if instances is None and instance_targets is None:
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    if instances is None or instance_targets is None:
        raise DataError("instances and instance_targets go together")
    x = np.asarray(instances, dtype=np.float32)
    y = np.asarray(instance_targets)
    if x.ndim != 2 or x.shape[1] != dim:
        raise DataError(f"instances must have shape (M, {dim}) like the bags' points, got {x.shape}")
    if y.shape != (len(x),) or (len(y) and not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"instance_targets must be {len(x)} integers, got shape {y.shape} of {y.dtype}")
    if len(y) and (y.min() < -1 or y.max() >= classes):
        raise DataError(f"instance_targets must lie in -1 (background) .. {classes - 1}")
    if not np.isfinite(x).all():
        raise DataError("instances contain NaN or infinite values")
    return x, y.astype(np.int64)


def _standardisation(x: Tensor, inst_x: Tensor) -> tuple[Tensor, Tensor]:
    flat = torch.cat([x.reshape(-1, x.shape[-1]), inst_x])
    return flat.mean(dim=0), flat.std(dim=0).clamp_min(1e-6)


def _new_net(config: HeadConfig, mean: Tensor, std: Tensor) -> HeadNet:
    net = HeadNet(config)
    net.mean.copy_(mean)
    net.std.copy_(std)
    return net


LossFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def _fit(net: HeadNet, data: _Data, opts: TrainOptions, loss_fn: LossFn, role: str) -> float:
    """Adam(W) over shuffled mini-batches of bags (each step also takes its share of the labelled
    instances, so one epoch sees every bag and every instance once); returns the mean loss of the
    last epoch."""
    x, y = data.x, data.y
    optimizer = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    steps_per_epoch = math.ceil(len(x) / opts.batch_size)
    inst_batch = math.ceil(len(data.inst_x) / steps_per_epoch)
    net.train()
    last = float("nan")
    epochs = tqdm(range(opts.epochs), desc=f"training {role}", unit="epoch", disable=not opts.progress)
    for epoch in epochs:
        order = torch.randperm(len(x))
        inst_order = torch.randperm(len(data.inst_x))
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * opts.batch_size : (step + 1) * opts.batch_size]
            loss = loss_fn(net(x[index]), y[index], index, epoch)
            inst = inst_order[step * inst_batch : (step + 1) * inst_batch]
            if len(inst):
                inst_loss = F.cross_entropy(net(data.inst_x[inst]), data.inst_y[inst], weight=data.inst_weight)
                loss = loss + opts.instance_weight * inst_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        last = total / len(x)
        epochs.set_postfix(loss=f"{last:.4f}")
    net.eval()
    return last
