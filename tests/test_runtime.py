"""SAM's image encoder and prompt decoder in ONNX Runtime and OpenVINO: exported from the real (tiny)
SAM, cached by their weights, checked against eager PyTorch, and PyTorch again whenever anything
fails."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from usam_backend.core.masks import mask_iou
from usam_backend.sam import runtime
from usam_backend.sam.decoder import PromptMaskDecoder
from usam_backend.sam.engine import SamEngine
from usam_backend.sam.models import LoadedSam, build_tiny_sam
from usam_backend.sam.runtime import choose_runtime


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One cache folder for the module: the tiny encoder is exported once (ONNX Runtime and OpenVINO
    read the same file)."""
    return tmp_path_factory.mktemp("usam-cache")


def _engine(cache_dir, name: str, seed: int = 0) -> SamEngine:
    sam = LoadedSam(build_tiny_sam(seed), "tiny", f"random (seed {seed})", torch.device("cpu"))
    return SamEngine(sam, runtime=name, cache_dir=cache_dir)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_the_exported_encoder_reproduces_pytorch_and_is_cached(exported, two_object_image, name):
    reference = _engine(None, "torch").embed(two_object_image).features
    engine = _engine(exported, name)
    features = engine.embed(two_object_image).features
    info = engine.encoder.info
    assert info is not None and info.name == name and info.file_bytes > 100_000
    assert info.max_abs_diff is not None and info.max_abs_diff < 1e-4
    assert float((features - reference).abs().max()) == pytest.approx(info.max_abs_diff, abs=1e-6)
    assert info.path is not None and info.path.parent == exported / "runtime" and info.path.is_file()

    again = _engine(exported, name)  # another process of the same weights: no export, no check
    again.embed(two_object_image[::-1].copy())
    assert again.encoder.info is not None and again.encoder.info.export_seconds == 0
    assert again.encoder.info.path == info.path and again.encoder.info.max_abs_diff == info.max_abs_diff


def test_new_code_for_the_same_weights_is_exported_anew(exported, two_object_image, monkeypatch):
    """An exported graph is the code's as much as the weights': another version of the module's
    source (an upgrade of usam or segment_anything) does not reuse a file of the old one."""
    first = _engine(exported, "onnxruntime")
    first.embed(two_object_image)
    assert first.encoder.info is not None and first.encoder.info.path is not None
    assert runtime.code_fingerprint(first.encoder.module) in first.encoder.info.path.name
    monkeypatch.setattr(runtime, "code_fingerprint", lambda module: "0ther0de")
    upgraded = _engine(exported, "onnxruntime")
    upgraded.embed(two_object_image)
    info = upgraded.encoder.info
    assert info is not None and info.export_seconds > 0 and info.path is not None and "0ther0de" in info.path.name
    assert info.path != first.encoder.info.path and info.path.is_file()
    old = first.encoder.info.path  # the same weights' file of the older code is removed, its check too
    assert not old.exists() and not list(old.parent.glob(f"{old.stem}.*.json"))
    assert list(info.path.parent.glob(f"{info.path.stem}.*.json"))


def test_other_weights_are_exported_to_their_own_file(exported, two_object_image):
    first, other = _engine(exported, "onnxruntime"), _engine(exported, "onnxruntime", seed=1)
    first.embed(two_object_image)
    other.embed(two_object_image)
    assert first.encoder.info is not None and other.encoder.info is not None
    assert other.encoder.info.export_seconds > 0 and other.encoder.info.path != first.encoder.info.path
    assert other.encoder.info.path is not None and other.encoder.info.path.is_file()


def test_final_masks_of_both_runtimes_agree(exported, two_object_image):
    boxes = np.array([[20, 30, 100, 130], [140, 30, 220, 130], [0, 0, 240, 160]], dtype=np.float32)
    masks = []
    for engine in (_engine(None, "torch"), _engine(exported, "onnxruntime")):
        batch = engine.predict_prompts(engine.embed(two_object_image), boxes=boxes, multimask=True)
        assert batch.masks is not None
        masks.append(batch.masks.reshape(-1, *two_object_image.shape[:2]))
    for a, b in zip(*masks, strict=True):
        whole = np.array([0, 0, a.shape[1], a.shape[0]])
        assert a.any() and mask_iou(a, whole, b, whole) > 0.99


def test_a_runtime_that_fails_or_disagrees_leaves_the_encoder_in_pytorch(tmp_path, two_object_image, caplog,
                                                                        monkeypatch):  # fmt: skip
    reference = _engine(None, "torch").embed(two_object_image).features
    engine = _engine(tmp_path, "onnxruntime")
    bad = tmp_path / "runtime"
    bad.mkdir()
    monkeypatch.setattr(runtime, "export_onnx", lambda module, inputs, path, spec: path.write_bytes(b"not a model"))
    with caplog.at_level(logging.WARNING, logger="usam_backend.sam.runtime"):
        features = engine.embed(two_object_image).features
    assert torch.equal(features, reference) and engine.encoder.name == "torch"
    (line,) = [r.getMessage() for r in caplog.records]
    assert "onnxruntime failed" in line and "runs in PyTorch" in line

    monkeypatch.undo()
    monkeypatch.setattr(runtime, "TOLERANCE", 0.0)  # nothing reproduces PyTorch to 0: refused
    caplog.clear()
    strict = _engine(tmp_path / "strict", "onnxruntime")
    with caplog.at_level(logging.WARNING, logger="usam_backend.sam.runtime"):
        assert torch.equal(strict.embed(two_object_image).features, reference)
    assert strict.encoder.name == "torch" and "differs from PyTorch's" in caplog.records[0].getMessage()


def test_auto_is_onnxruntime_on_cpu_and_the_gpu_stays_in_pytorch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_runtime("auto", cpu, "vit_t")[0] == "onnxruntime"
    assert choose_runtime("auto", cpu, "tiny")[0] == "torch"
    assert choose_runtime("openvino", cpu, "vit_h")[0] == "openvino"
    for setting in ("auto", "torch", "onnxruntime", "openvino"):
        assert choose_runtime(setting, cuda, "vit_h")[0] == "torch"
    assert "applies on CPU" in choose_runtime("onnxruntime", cuda, "vit_h")[1]


def test_unseeded_random_weights_leave_no_file_in_the_cache(tmp_path, two_object_image):
    """A benchmark's random vit_t differs in every process: its export is used once and removed."""
    sam = LoadedSam(build_tiny_sam(2), "tiny", "random (no checkpoint on disk)", torch.device("cpu"))
    engine = SamEngine(sam, runtime="onnxruntime", cache_dir=tmp_path)
    engine.embed(two_object_image)
    info = engine.encoder.info
    assert info is not None and info.name == "onnxruntime" and info.path is None and info.file_bytes > 100_000
    assert info.max_abs_diff is not None and info.max_abs_diff < 1e-4 and not list(tmp_path.rglob("*"))


def _prompts(image: np.ndarray) -> list[dict]:
    """Prompt batches of every kind the engine's callers send: different numbers of prompts and of
    prompt tokens (points, boxes, both, negative points, an earlier pass's logits)."""
    rng = np.random.default_rng(0)
    height, width = image.shape[:2]

    def points(b: int, n: int) -> np.ndarray:
        return (rng.uniform(0, 1, (b, n, 2)) * (width, height)).astype(np.float32)

    boxes = np.array([[20, 30, 100, 130], [140, 30, 220, 130], [0, 0, 240, 160]], dtype=np.float32)
    return [
        {"boxes": boxes[:1]},
        {"boxes": boxes},
        {"points": points(1, 1), "labels": np.ones((1, 1), dtype=int)},
        {"points": points(4, 3), "labels": np.array([[1, 0, 0]] * 4)},
        {"points": points(3, 2), "labels": np.ones((3, 2), dtype=int), "boxes": boxes},
        {"boxes": boxes[:2], "mask_input": rng.normal(0, 4, (2, 1, 256, 256)).astype(np.float32)},
    ]


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_the_exported_prompt_decoder_reproduces_sams_decoder_for_any_batch_of_prompts(exported, two_object_image,
                                                                                      name):  # fmt: skip
    reference, engine = _engine(None, "torch"), _engine(exported, name)
    embedding = reference.embed(two_object_image)
    for prompts in _prompts(two_object_image):
        for multimask in (True, False):
            want = reference.predict_prompts(embedding, multimask=multimask, **prompts)
            got = engine.predict_prompts(embedding, multimask=multimask, **prompts)
            info = engine.prompt_decoder.info
            assert info is not None and info.name == name, info
            assert got.low_res_logits.shape == want.low_res_logits.shape
            assert float((got.low_res_logits - want.low_res_logits).abs().max()) < 1e-4
            assert np.abs(got.iou_predictions - want.iou_predictions).max() < 1e-5
            assert got.masks is not None and want.masks is not None
            assert (got.masks != want.masks).mean() < 1e-4  # only pixels at the threshold may differ
    assert info.path is not None and "-decoder-" in info.path.name and info.path.is_file()
    assert info.max_abs_diff is not None and info.max_abs_diff < 1e-4
    assert not engine.model.mask_decoder.training  # the export leaves SAM's decoder in eval mode
    assert engine.encoder.info is None  # the encoder was never called: each part starts on its own first use


def test_the_prompt_decoder_module_is_sams_decoder():
    """What is exported computes what SAM's own decoder does, in PyTorch, for one or B dense prompts."""
    sam = build_tiny_sam(0)
    decoder, prompt_encoder = sam.mask_decoder, sam.prompt_encoder
    torch.manual_seed(0)
    features = torch.randn(1, prompt_encoder.embed_dim, *prompt_encoder.image_embedding_size)
    pe = prompt_encoder.get_dense_pe()
    module = PromptMaskDecoder(decoder, pe)
    boxes = torch.tensor([[10.0, 20, 300, 400], [500, 500, 900, 1000], [0, 0, 1024, 1024]])
    masks = torch.randn(3, 1, *(4 * n for n in prompt_encoder.image_embedding_size))
    with torch.inference_mode():
        for mask_input in (None, masks):
            sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=mask_input)
            want = decoder.predict_masks(features, pe, sparse, dense)
            for shared in (dense, dense[:1]) if mask_input is None else (dense,):
                got = module(features, sparse, shared)
                for a, b in zip(got, want, strict=True):
                    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_a_prompt_decoder_that_fails_to_export_leaves_it_in_pytorch(tmp_path, two_object_image, caplog,
                                                                     monkeypatch):  # fmt: skip
    reference = _engine(None, "torch")
    embedding = reference.embed(two_object_image)
    boxes = np.array([[20, 30, 100, 130]], dtype=np.float32)
    engine = _engine(tmp_path, "onnxruntime")

    def refuse(module, inputs, path, spec):
        raise RuntimeError(f"no export of the {spec.part}")

    monkeypatch.setattr(runtime, "export_onnx", refuse)
    with caplog.at_level(logging.WARNING, logger="usam_backend.sam.runtime"):
        got = engine.predict_prompts(embedding, boxes=boxes)
    want = reference.predict_prompts(embedding, boxes=boxes)
    assert torch.equal(got.low_res_logits, want.low_res_logits) and engine.prompt_decoder.name == "torch"
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("SAM's decoder: onnxruntime failed") and "no export of the decoder" in line
    assert "the decoder runs in PyTorch" in line
    empty = engine.predict_prompts(embedding, boxes=np.zeros((0, 4), dtype=np.float32))
    assert empty.low_res_logits.shape[0] == 0 and empty.masks is not None and empty.masks.shape[0] == 0


def test_a_runtime_that_fails_after_its_first_call_hands_the_part_to_pytorch(exported, two_object_image, caplog):
    """A later batch the exported graph cannot run (an allocation, a shape) is answered by PyTorch,
    and PyTorch runs the part from then on."""
    reference = _engine(None, "torch")
    embedding = reference.embed(two_object_image)
    boxes = np.array([[20, 30, 100, 130], [140, 30, 220, 130]], dtype=np.float32)
    engine = _engine(exported, "onnxruntime")
    engine.predict_prompts(embedding, boxes=boxes[:1])
    assert engine.prompt_decoder.name == "onnxruntime"

    def out_of_memory(*inputs):
        raise MemoryError("the runtime could not allocate")

    engine.prompt_decoder._run = out_of_memory
    with caplog.at_level(logging.WARNING, logger="usam_backend.sam.runtime"):
        got = engine.predict_prompts(embedding, boxes=boxes)
        again = engine.predict_prompts(embedding, boxes=boxes)
    want = reference.predict_prompts(embedding, boxes=boxes)
    assert torch.equal(got.low_res_logits, want.low_res_logits) and torch.equal(
        again.low_res_logits, want.low_res_logits
    )
    assert engine.prompt_decoder.name == "torch"
    (line,) = [r.getMessage() for r in caplog.records]
    assert "onnxruntime failed (MemoryError: the runtime could not allocate)" in line


def test_an_output_of_another_shape_or_too_far_off_is_refused():
    close = torch.tensor([[30.0, -12.0], [0.5, 0.0]])
    assert runtime._difference((close + 0.02,), (close,)) == pytest.approx(0.02, abs=1e-5)  # 1e-3 of 30 allowed
    with pytest.raises(RuntimeError, match="differs from PyTorch's"):
        runtime._difference((close[1:], close[1:] + 0.02), (close[1:], close[1:]))  # 1e-3 of 1 allowed
    with pytest.raises(RuntimeError, match="has shape"):
        runtime._difference((close.T.reshape(1, 4),), (close,))
