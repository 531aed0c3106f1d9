"""The classifier head: a 4-layer MLP over SAM point embeddings, and its self-describing artifact."""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor, nn

from usam_backend.core.errors import HeadError
from usam_backend.core.fileio import atomic_path

FORMAT = "usam-head/1"


@dataclass(frozen=True)
class HeadConfig:
    """Everything that shapes the network (stored in the artifact, rebuilt on load).

    Attributes:
        input_dim: length D of a point embedding (4 x SAM's transformer width).
        num_classes: C user classes.
        hidden: widths of the three hidden layers (4 linear layers in all).
        dropout: dropout after each hidden layer while training.
        background: whether the network has a (C+1)-th "none of these classes" output.
    """

    input_dim: int
    num_classes: int
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.0
    background: bool = False

    @property
    def outputs(self) -> int:
        return self.num_classes + int(self.background)


class HeadNet(nn.Module):
    """Standardise the embedding, then Linear-ReLU-Dropout x3 and a final Linear to logits."""

    mean: Tensor
    std: Tensor

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.register_buffer("mean", torch.zeros(config.input_dim))
        self.register_buffer("std", torch.ones(config.input_dim))
        layers: list[nn.Module] = []
        width = config.input_dim
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = hidden
        layers.append(nn.Linear(width, config.outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) embeddings -> (..., C [+1]) logits."""
        return self.layers((x - self.mean) / self.std)


@dataclass
class Head:
    """A trained head with its class names and the facts needed to use it safely.

    ``info`` carries metadata: ``sam_type`` and ``points`` of the embeddings it was trained on,
    data ``provenance``, training ``metrics``, the training ``options``.
    """

    net: HeadNet
    config: HeadConfig
    class_names: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.class_names) != self.config.num_classes:
            raise HeadError(f"{len(self.class_names)} class names for {self.config.num_classes} classes")
        self.net.eval()

    @property
    def sam_type(self) -> str | None:
        value = self.info.get("sam_type")
        return None if value is None else str(value)

    @property
    def temperature(self) -> float:
        """Logits are divided by this (fitted on annotated points, :mod:`training.calibration`)."""
        return float((self.info.get("calibration") or {}).get("temperature", 1.0))

    @property
    def version(self) -> str:
        """Short content hash of the weights and class names: changes whenever the head does."""
        digest = hashlib.sha256("\x1f".join(self.class_names).encode())
        if self.info.get("calibration"):
            digest.update(repr(self.temperature).encode())
        for name, tensor in sorted(self.net.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:12]

    def to(self, device: torch.device | str) -> Head:
        self.net.to(device)
        return self

    @overload
    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...
    @overload
    def predict_proba(self, x: Tensor) -> Tensor: ...

    def predict_proba(self, x: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Class probabilities (n, C) for point embeddings (n, D).

        With a background output, the softmax runs over C+1 outputs and the background column is
        dropped, so a row sums to the probability that the point shows one of the classes. A
        calibrated head divides its logits by its :attr:`temperature` first.
        Returns a NumPy array for NumPy input, a tensor (on the head's device) for tensor input.
        """
        as_numpy = isinstance(x, np.ndarray)
        tensor = torch.as_tensor(x, dtype=torch.float32, device=self._device())
        if tensor.ndim != 2 or tensor.shape[1] != self.config.input_dim:
            raise HeadError(f"expected embeddings of shape (n, {self.config.input_dim}), got {tuple(tensor.shape)}")
        with torch.inference_mode():
            probs = (self.net(tensor) / self.temperature).softmax(dim=-1)[:, : self.config.num_classes]
        return probs.cpu().numpy() if as_numpy else probs

    def check_compatible(self, sam_type: str, embedding_dim: int) -> None:
        """Raise HeadError unless this head was trained on embeddings of ``sam_type``."""
        trained_on = self.sam_type
        if embedding_dim != self.config.input_dim or (trained_on is not None and trained_on != sam_type):
            raise HeadError(
                f"this head was trained on {trained_on or 'unknown'} embeddings ({self.config.input_dim}-d) "
                f"but the SAM model in use is {sam_type} ({embedding_dim}-d). Set USAM_SAM_TYPE={trained_on} "
                "or retrain the head on this SAM type."
            )

    def save(self, path: str | Path) -> Path:
        """Write the artifact atomically: weights, config, class names and metadata."""
        path = Path(path)
        payload = {
            "format": FORMAT,
            "config": {**asdict(self.config), "hidden": list(self.config.hidden)},
            "class_names": list(self.class_names),
            "info": self.info,
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)  # serialise first: a failure leaves no file behind
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path, *, sam_type: str | None = None, embedding_dim: int | None = None) -> Head:
        """Load an artifact safely (``weights_only``); with ``sam_type``, check it fits that SAM."""
        path = Path(path)
        if not path.is_file():
            raise HeadError(f"no head artifact at {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or payload.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} artifact")
            raw = payload["config"]
            config = HeadConfig(**{**raw, "hidden": tuple(raw["hidden"])})
            net = HeadNet(config)
            net.load_state_dict(payload["state_dict"])
            head = cls(net, config, tuple(payload["class_names"]), dict(payload.get("info") or {}))
        except HeadError:
            raise
        except Exception as exc:
            raise HeadError(f"{path} is not a readable usam head ({exc})") from None
        if sam_type is not None:
            head.check_compatible(sam_type, embedding_dim if embedding_dim is not None else config.input_dim)
        return head

    def _device(self) -> torch.device:
        return self.net.mean.device
