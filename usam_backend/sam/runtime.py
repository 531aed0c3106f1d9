"""SAM's image encoder in the fastest runtime that reproduces it.

On CPU the encoder is exported once to ONNX (``torch.onnx.export``, opset 17, fixed 1x3x1024x1024
input), cached under ``USAM_CACHE_DIR/runtime/`` by a fingerprint of the encoder's weights, and run
in ONNX Runtime (or OpenVINO, which reads the same file). The first image an exported file encodes
is also encoded in eager PyTorch; the largest absolute difference of the two embeddings is logged
and kept beside the file, and a file that does not reproduce PyTorch is not used. Any failure —
the package missing, the export, the session, the check — falls back to PyTorch with one log line.
On CUDA the encoder always runs in PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usam_backend.core.fileio import atomic_path

log = logging.getLogger(__name__)

OPSET = 17
TOLERANCE = 1e-3
"""Largest absolute difference to eager PyTorch an exported encoder may have on its first image
(float32 runtimes reassociate sums; measured differences are around 1e-5)."""
EXPORTED = ("onnxruntime", "openvino")

Encode = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RuntimeInfo:
    """What runs the encoder and what it cost to set up.

    Attributes:
        name: ``torch``, ``onnxruntime`` or ``openvino``.
        reason: why this runtime (the setting, or why another one failed).
        path: the exported model file (None for torch).
        export_seconds: time of the export in this process (0 when the file was cached).
        file_bytes: size of the exported model on disk.
        max_abs_diff: largest absolute difference to eager PyTorch on the file's first image.
    """

    name: str
    reason: str
    path: Path | None = None
    export_seconds: float = 0.0
    file_bytes: int = 0
    max_abs_diff: float | None = None


def choose_runtime(setting: str, device: torch.device, sam_type: str) -> tuple[str, str]:
    """The runtime to use for ``USAM_RUNTIME=setting`` and why.

    ``auto`` is ONNX Runtime on CPU and PyTorch on CUDA; the ``tiny`` test model stays in PyTorch
    under ``auto`` (its encoder takes milliseconds, less than loading an exported file). On CUDA
    every setting runs PyTorch."""
    if device.type != "cpu":
        if setting in EXPORTED:
            return "torch", f"USAM_RUNTIME={setting} applies on CPU; on {device.type} the encoder runs in PyTorch"
        return "torch", f"the encoder runs in PyTorch on {device.type}"
    if setting == "auto":
        if sam_type == "tiny":
            return "torch", "USAM_RUNTIME=auto keeps the tiny test model in PyTorch"
        return "onnxruntime", "USAM_RUNTIME=auto on CPU"
    return setting, f"USAM_RUNTIME={setting}"


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """A short digest of the encoder's weights: every tensor's name, shape and a strided sample of
    its values (random weights differ between processes, checkpoints between files)."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class EncoderRuntime:
    """Runs ``model.image_encoder`` on preprocessed (1, 3, S, S) pixels in the chosen runtime.

    Set up lazily on the first image: :meth:`__call__` exports (or loads) the model then, checks
    it against PyTorch when the file is new, and falls back to PyTorch on any failure."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        setting: str,
        device: torch.device,
        sam_type: str,
        cache_dir: Path,
        fingerprint: str = "",
        *,
        keep: bool = True,
    ):
        """
        Args:
            encoder: SAM's ``image_encoder``, in eval mode.
            setting: ``USAM_RUNTIME``.
            fingerprint: the weights' name (``LoadedSam.fingerprint``), kept in the file name.
            keep: cache the exported file; False for weights no later process has (unseeded random
                weights of a benchmark): exported to a temporary folder, removed once loaded.
        """
        self.encoder = encoder
        self.keep = keep
        self.fingerprint = fingerprint or sam_type
        self.device = device
        self.cache_dir = cache_dir
        self.wanted, reason = choose_runtime(setting, device, sam_type)
        self.info = RuntimeInfo("torch", reason) if self.wanted == "torch" else None
        self._run: Encode | None = self.encoder if self.wanted == "torch" else None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The runtime that encodes (the one wanted until the first image is encoded)."""
        return self.info.name if self.info is not None else self.wanted

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._run is None:
            with self._lock:
                if self._run is None:
                    return self._start(pixels)
        return self._run(pixels)

    def _start(self, pixels: torch.Tensor) -> torch.Tensor:
        """Set up the runtime on its first image; returns that image's embedding."""
        started = time.perf_counter()
        scratch = None if self.keep else tempfile.TemporaryDirectory(prefix="usam-encoder-")
        try:
            path, exported = self._exported_file(pixels, Path(scratch.name) if scratch else self.cache_dir)
            run = _session(self.wanted, path, torch.get_num_threads())
            size = path.stat().st_size
            features = run(pixels)
            checked = _read_check(path, self.wanted)
            if checked is None:
                reference = self.encoder(pixels)
                checked = float((features - reference).abs().max())
                if not checked <= TOLERANCE:
                    raise RuntimeError(f"its embedding differs from PyTorch's by {checked:.1e} (> {TOLERANCE:.0e})")
                _write_check(path, self.wanted, checked)
        except Exception as exc:  # any failure of an optional runtime: PyTorch encodes
            log.warning(
                "image encoder: %s failed (%s: %s); the encoder runs in PyTorch",
                self.wanted, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
            )  # fmt: skip
            self.info = RuntimeInfo("torch", f"{self.wanted} failed: {type(exc).__name__}")
            self._run = self.encoder
            return self.encoder(pixels)
        finally:
            if scratch is not None:
                scratch.cleanup()
        kept = path if scratch is None else None
        self.info = RuntimeInfo(self.wanted, f"{self.wanted} on CPU", kept, exported, size, checked)
        log.info(
            "image encoder: %s, %s (%.1f MB%s), max abs difference to PyTorch %.1e, ready in %.1f s",
            self.wanted, kept or "not cached (unseeded random weights)",
            self.info.file_bytes / 1e6, f", exported in {exported:.1f} s" if exported else "",
            checked, time.perf_counter() - started,
        )  # fmt: skip
        self._run = run
        return features

    def _exported_file(self, pixels: torch.Tensor, cache_dir: Path) -> tuple[Path, float]:
        """The cached ONNX file of this encoder, exported now if missing; and the export's seconds."""
        folder = cache_dir / "runtime"
        side = int(pixels.shape[-1])
        path = folder / f"{self.fingerprint}-encoder-{encoder_fingerprint(self.encoder)}-{side}-opset{OPSET}.onnx"
        if path.is_file():
            return path, 0.0
        started = time.perf_counter()
        export_onnx(self.encoder, pixels, path)
        return path, time.perf_counter() - started


def export_onnx(encoder: torch.nn.Module, pixels: torch.Tensor, path: Path) -> None:
    """Export ``encoder`` for inputs shaped like ``pixels`` to ``path`` (written atomically)."""
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic
        torch.onnx.export(
            encoder,
            (pixels.clone(),),
            str(tmp),
            input_names=["pixels"],
            output_names=["embedding"],
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


def _session(name: str, path: Path, threads: int) -> Encode:
    if name == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads leave the CPU to torch
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run_ort(pixels: torch.Tensor) -> torch.Tensor:
            (out,) = session.run(None, {"pixels": _numpy(pixels)})
            return torch.from_numpy(out)

        return run_ort
    if name == "openvino":
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}  # not bf16: match PyTorch
        compiled = core.compile_model(str(path), "CPU", config)
        lock = threading.Lock()  # one infer request, used by one thread at a time

        def run_openvino(pixels: torch.Tensor) -> torch.Tensor:
            with lock:
                out = compiled([_numpy(pixels)])[0]
            return torch.from_numpy(np.array(out, dtype=np.float32))

        return run_openvino
    raise ValueError(f"unknown runtime {name!r}")


def _numpy(pixels: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(pixels.detach().float().cpu().numpy())


def _check_path(path: Path, runtime: str) -> Path:
    return path.with_suffix(f".{runtime}.json")


def _read_check(path: Path, runtime: str) -> float | None:
    """The recorded difference to PyTorch of ``runtime`` running ``path``, if it was checked."""
    try:
        found: Any = json.loads(_check_path(path, runtime).read_text())
        return float(found["max_abs_diff"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_check(path: Path, runtime: str, max_abs_diff: float) -> None:
    with atomic_path(_check_path(path, runtime)) as tmp:
        tmp.write_text(json.dumps({"max_abs_diff": max_abs_diff, "torch": torch.__version__}))
