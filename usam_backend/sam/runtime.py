"""SAM's image encoder and prompt decoder in the fastest runtime that reproduces them.

On CPU each part is exported once to ONNX (``torch.onnx.export``, opset 17), cached under
``USAM_CACHE_DIR/runtime/`` by a fingerprint of its weights, and run in ONNX Runtime (or OpenVINO,
which reads the same file). The encoder's input is fixed (1x3x1024x1024); the prompt decoder's
number of prompts and of prompt tokens are free. The first call of an exported file is also run in
eager PyTorch; the largest absolute difference of the outputs is logged and kept beside the file,
and a file that does not reproduce PyTorch is not used. Any failure — the package missing, the
export, the session, the check — falls back to PyTorch with one log line. On CUDA both parts always
run in PyTorch.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usam_backend.core.fileio import atomic_path

log = logging.getLogger(__name__)

OPSET = 17
TOLERANCE = 1e-3
"""Largest absolute difference to eager PyTorch an exported part may have on its first call, as a
share of the largest output value's magnitude when that is over 1 (mask logits): float32 runtimes
reassociate sums; measured differences are around 1e-5 for embeddings and 1e-6 for logits."""
EXPORTED = ("onnxruntime", "openvino")

Run = Callable[..., tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class ExportSpec:
    """What an exported part is called: in its file name, its ONNX inputs and outputs, and the
    axes of those left free (``{input: {axis: name}}``); the other axes keep the first call's size."""

    part: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)


ENCODER = ExportSpec("encoder", ("pixels",), ("embedding",))
"""SAM's image encoder: (1, 3, S, S) preprocessed pixels -> (1, E, h, w) embedding."""
PROMPT_DECODER = ExportSpec(
    "decoder",
    ("image_embedding", "sparse", "dense"),
    ("masks", "iou_predictions"),
    {
        "sparse": {0: "prompts", 1: "tokens"},
        "dense": {0: "dense_prompts"},
        "masks": {0: "prompts"},
        "iou_predictions": {0: "prompts"},
    },
)
"""SAM's mask decoder for B prompts (see :class:`~usam_backend.sam.decoder.PromptMaskDecoder`)."""


@dataclass(frozen=True)
class RuntimeInfo:
    """What runs a part (the encoder, the prompt decoder) and what it cost to set up.

    Attributes:
        name: ``torch``, ``onnxruntime`` or ``openvino``.
        reason: why this runtime (the setting, or why another one failed).
        path: the exported model file (None for torch).
        export_seconds: time of the export in this process (0 when the file was cached).
        file_bytes: size of the exported model on disk.
        max_abs_diff: largest absolute difference to eager PyTorch on the file's first call.
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
            return "torch", f"USAM_RUNTIME={setting} applies on CPU; on {device.type} SAM runs in PyTorch"
        return "torch", f"SAM runs in PyTorch on {device.type}"
    if setting == "auto":
        if sam_type == "tiny":
            return "torch", "USAM_RUNTIME=auto keeps the tiny test model in PyTorch"
        return "onnxruntime", "USAM_RUNTIME=auto on CPU"
    return setting, f"USAM_RUNTIME={setting}"


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short digest of a module's weights: every tensor's name, shape and a strided sample of
    its values (random weights differ between processes, checkpoints between files)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def code_fingerprint(module: torch.nn.Module) -> str:
    """A short digest of the source files that define the classes of ``module`` and its submodules
    (usam's, segment_anything's, torch's layers): an exported graph is the code's as much as the
    weights', and a new version of that code exports anew."""
    digest = hashlib.sha256()
    for kind in sorted({type(m) for m in module.modules()}, key=lambda k: f"{k.__module__}.{k.__qualname__}"):
        digest.update(f"{kind.__module__}.{kind.__qualname__}".encode())
        with contextlib.suppress(OSError, TypeError):  # no source file: its name stands for it
            digest.update(Path(inspect.getfile(kind)).read_bytes())
    return digest.hexdigest()[:8]


class ModuleRuntime:
    """Runs a part of SAM (``module``, in eval mode) in the chosen runtime: ``runtime(*inputs)`` is a
    tuple of output tensors.

    Set up lazily on the first call: exports (or loads) the module then, checks it against PyTorch
    when the file is new, and falls back to PyTorch on any failure."""

    def __init__(
        self,
        module: torch.nn.Module,
        spec: ExportSpec,
        setting: str,
        device: torch.device,
        sam_type: str,
        cache_dir: Path,
        fingerprint: str = "",
        *,
        keep: bool = True,
        eager: Run | None = None,
    ):
        """
        Args:
            module: what is exported; its ``forward`` takes ``spec.inputs`` and returns a tuple of
                ``spec.outputs`` (or one tensor).
            setting: ``USAM_RUNTIME``.
            fingerprint: the weights' name (``LoadedSam.fingerprint``), kept in the file name.
            keep: cache the exported file; False for weights no later process has (unseeded random
                weights of a benchmark): exported to a temporary folder, removed once loaded.
            eager: what runs in PyTorch, and what the export is checked against (default ``module``);
                the same computation as ``module`` in PyTorch's own code path.
        """
        self.module = module
        self.spec = spec
        self.keep = keep
        self.fingerprint = fingerprint or sam_type
        self.device = device
        self.cache_dir = cache_dir
        self.eager: Run = eager or _as_tuple(module)
        self.wanted, reason = choose_runtime(setting, device, sam_type)
        self.info = RuntimeInfo("torch", reason) if self.wanted == "torch" else None
        self._run: Run | None = self.eager if self.wanted == "torch" else None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The runtime that runs the part (the one wanted until its first call)."""
        return self.info.name if self.info is not None else self.wanted

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._run is None:
            with self._lock:
                if self._run is None:
                    return self._start(inputs)
        run = self._run
        if run is self.eager:
            return run(*inputs)
        try:
            return run(*inputs)
        except Exception as exc:  # e.g. a batch or an allocation the first call did not meet
            self._fall_back(exc)
            return self.eager(*inputs)

    def _fall_back(self, exc: Exception) -> None:
        """PyTorch runs the part from now on; one log line says why."""
        part = self.spec.part
        log.warning(
            "SAM's %s: %s failed (%s: %s); the %s runs in PyTorch",
            part, self.wanted, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", part,
        )  # fmt: skip
        self.info = RuntimeInfo("torch", f"{self.wanted} failed: {type(exc).__name__}")
        self._run = self.eager

    def _start(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Set up the runtime on its first call; returns that call's outputs."""
        started = time.perf_counter()
        scratch = None if self.keep else tempfile.TemporaryDirectory(prefix=f"usam-{self.spec.part}-")
        part = self.spec.part
        try:
            path, exported = self._exported_file(inputs, Path(scratch.name) if scratch else self.cache_dir)
            run = _session(self.wanted, path, self.spec, torch.get_num_threads())
            size = path.stat().st_size
            outputs = run(*inputs)
            checked = _read_check(path, self.wanted)
            if checked is None:
                checked = _difference(outputs, self.eager(*inputs))
                _write_check(path, self.wanted, checked)
                if exported and scratch is None:
                    _prune(path)
        except Exception as exc:  # any failure of an optional runtime: PyTorch runs the part
            self._fall_back(exc)
            return self.eager(*inputs)
        finally:
            if scratch is not None:
                scratch.cleanup()
        kept = path if scratch is None else None
        self.info = RuntimeInfo(self.wanted, f"{self.wanted} on CPU", kept, exported, size, checked)
        log.info(
            "SAM's %s: %s, %s (%.1f MB%s), max abs difference to PyTorch %.1e, ready in %.1f s",
            part, self.wanted, kept or "not cached (unseeded random weights)",
            self.info.file_bytes / 1e6, f", exported in {exported:.1f} s" if exported else "",
            checked, time.perf_counter() - started,
        )  # fmt: skip
        self._run = run
        return outputs

    def _exported_file(self, inputs: Sequence[torch.Tensor], cache_dir: Path) -> tuple[Path, float]:
        """The cached ONNX file of this module, exported now if missing; and the export's seconds."""
        folder = cache_dir / "runtime"
        path = folder / (
            f"{self.fingerprint}-{self.spec.part}-{module_fingerprint(self.module)}-{code_fingerprint(self.module)}"
            f"-{_fixed_shape(inputs)}-opset{OPSET}.onnx"
        )
        if path.is_file():
            return path, 0.0
        started = time.perf_counter()
        export_onnx(self.module, inputs, path, self.spec)
        return path, time.perf_counter() - started


def _difference(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """The largest absolute difference of an exported part's outputs to PyTorch's; raises when an
    output's shape differs or it is further off than TOLERANCE x max(1, its largest magnitude)."""
    worst = 0.0
    for index, (got, want) in enumerate(zip(outputs, reference, strict=True)):
        if tuple(got.shape) != tuple(want.shape):
            raise RuntimeError(f"its output {index} has shape {tuple(got.shape)}, PyTorch's {tuple(want.shape)}")
        if not want.numel():
            continue
        diff = float((got.to(want.device) - want).abs().max())
        allowed = TOLERANCE * max(1.0, float(want.abs().max()))
        if not diff <= allowed:
            raise RuntimeError(f"its output differs from PyTorch's by {diff:.1e} (> {allowed:.0e})")
        worst = max(worst, diff)
    return worst


def _prune(path: Path) -> None:
    """Remove files of the same part and weights that older code exported (another code digest)."""
    weights = path.name.rsplit("-", 3)[0]  # <sam>-<part>-<weights digest>
    for old in path.parent.glob(f"{weights}-*.onnx"):
        if old != path:
            for stale in (old, *old.parent.glob(f"{old.stem}.*.json")):
                stale.unlink(missing_ok=True)
            log.info("removed %s, exported by an earlier version of the code", old.name)


def _fixed_shape(inputs: Sequence[torch.Tensor]) -> str:
    """The input size an export is fixed to, for its file name: the first input's last two sizes
    (the encoder's 1024x1024 pixels, the decoder's 64x64 embedding)."""
    return "x".join(str(int(n)) for n in inputs[0].shape[-2:])


def _as_tuple(module: torch.nn.Module) -> Run:
    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = module(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return run


def export_onnx(module: torch.nn.Module, inputs: Sequence[torch.Tensor], path: Path, spec: ExportSpec) -> None:
    """Export ``module`` for inputs shaped like ``inputs`` to ``path`` (written atomically)."""
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic
        torch.onnx.export(
            module,
            tuple(x.clone() for x in inputs),
            str(tmp),
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes={name: dict(axes) for name, axes in spec.dynamic_axes.items()} or None,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


def _session(name: str, path: Path, spec: ExportSpec, threads: int) -> Run:
    if name == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads leave the CPU to torch
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run_ort(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outputs = session.run(None, {name: _numpy(x) for name, x in zip(spec.inputs, inputs, strict=True)})
            return tuple(torch.from_numpy(out) for out in outputs)

        return run_ort
    if name == "openvino":
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}  # not bf16: match PyTorch
        compiled = core.compile_model(str(path), "CPU", config)
        lock = threading.Lock()  # one infer request, used by one thread at a time

        def run_openvino(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with lock:
                result = compiled([_numpy(x) for x in inputs])
                outputs = [np.array(result[i], dtype=np.float32) for i in range(len(spec.outputs))]
            return tuple(torch.from_numpy(out) for out in outputs)

        return run_openvino
    raise ValueError(f"unknown runtime {name!r}")


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())


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
