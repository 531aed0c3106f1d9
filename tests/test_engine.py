import numpy as np
import torch

from usam_backend.core.settings import Settings
from usam_backend.sam.engine import SamEngine


def test_grid_points_cover_the_image():
    points = SamEngine.grid_points((100, 200), 16)
    assert points.shape == (16, 2) and points.dtype == np.float32
    assert points[:, 0].min() == 200 / 8 and points[:, 1].max() == 100 - 100 / 8


def test_embedding_cache_skips_the_encoder(tiny_engine, two_object_image):
    image = two_object_image.copy()
    image[0, 0] ^= 1  # pixels no other test has embedded (the engine and its cache are shared)
    before = tiny_engine.encoder_calls
    first = tiny_engine.embed(image)
    second = tiny_engine.embed(image.copy())
    assert second is first and tiny_engine.encoder_calls == before + 1
    tiny_engine.embed(255 - image)
    assert tiny_engine.encoder_calls == before + 2


def test_disk_cache_survives_a_new_engine(tmp_path, two_object_image):
    settings = Settings(sam_type="tiny", device="cpu", cache_dir=tmp_path, embedding_cache_disk=True)
    first = SamEngine.from_settings(settings)
    embedding = first.embed(two_object_image)
    second = SamEngine.from_settings(settings)
    again = second.embed(two_object_image)
    assert second.encoder_calls == 0
    assert torch.equal(again.features, embedding.features) and again.input_size == embedding.input_size
    assert len(list((tmp_path / "embeddings").rglob("*.pt"))) == 1


def test_memory_cache_is_bounded(tmp_path, two_object_image):
    settings = Settings(sam_type="tiny", device="cpu", cache_dir=tmp_path, embedding_cache_size=2)
    engine = SamEngine.from_settings(settings)
    for shift in range(4):
        engine.embed(np.roll(two_object_image, shift * 10, axis=1))
    assert len(engine.cache) == 2


def test_point_embeddings_and_masks(tiny_engine, two_object_image):
    tokens = tiny_engine.point_embeddings(two_object_image, 16)
    assert tokens.shape == (16, tiny_engine.embedding_dim) and tokens.dtype == np.float32
    embedding = tiny_engine.embed(two_object_image)
    chunk = next(tiny_engine.decode(embedding, tiny_engine.grid_points(embedding.original_size, 16), chunk=4))
    logits = tiny_engine.low_res_logits(chunk, torch.tensor([1, 3]))
    assert logits.shape == (2, 3, 256, 256)
    masks = tiny_engine.upscale(logits[:, 0], embedding)
    assert masks.shape == (2, 160, 240) and masks.dtype == bool


def test_prompt_reuses_the_embedding(tiny_engine, two_object_image):
    embedding = tiny_engine.embed(two_object_image)
    calls = tiny_engine.encoder_calls
    result = tiny_engine.predict_prompt(
        embedding, points=np.array([[50, 60], [200, 60]]), labels=np.array([1, 0]), box=np.array([10, 20, 120, 140])
    )
    assert result.masks.shape == (3, 160, 240) and result.iou_predictions.shape == (3,)
    single = tiny_engine.predict_prompt(embedding, box=np.array([10, 20, 120, 140]), multimask=False)
    assert single.masks.shape == (1, 160, 240)
    assert tiny_engine.encoder_calls == calls


def test_point_masks_across_decode_chunks_are_sams(tiny_engine, two_object_image):
    embedding = tiny_engine.embed(two_object_image)
    points = tiny_engine.grid_points(embedding.original_size, 49)
    assert len(points) > 2 * tiny_engine.decode_chunk  # three chunks
    _, iou, logits = tiny_engine.reference_decode(embedding, points, 64)
    best = np.sort(iou.max(dim=1).values.numpy())
    gap = int(np.argmax(np.diff(best[10:-10]))) + 10  # a threshold far from every point's IoU
    threshold = float(best[gap : gap + 2].mean())
    rows, fast_logits, fast_iou = tiny_engine.point_masks(embedding, points, threshold)
    expected = torch.nonzero((iou > threshold).any(dim=1)).squeeze(1)
    assert torch.equal(rows, expected) and 0 < len(rows) < len(points)
    assert rows.max() >= 2 * tiny_engine.decode_chunk
    torch.testing.assert_close(fast_iou, iou[expected], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast_logits, logits[expected], atol=1e-4, rtol=1e-4)
