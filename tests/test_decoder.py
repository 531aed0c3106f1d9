"""The token-only decoder must reproduce SAM's own decoder (same weights, reassociated arithmetic)."""

import numpy as np
import pytest
import torch

from usam_backend.sam.decoder import PointDecoder, low_res_logits, reference_decode
from usam_backend.sam.models import build_architecture, build_tiny_sam


@pytest.fixture(scope="module", params=["tiny", "vit_t"])
def sam(request):
    return build_tiny_sam() if request.param == "tiny" else build_architecture("vit_t")


def test_fast_decoder_matches_sam(sam):
    generator = torch.Generator().manual_seed(3)
    width = sam.prompt_encoder.embed_dim
    embedding = torch.randn(1, width, 64, 64, generator=generator)
    points = torch.rand(6, 1, 2, generator=generator) * 1024
    labels = torch.ones(6, 1)
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        pe = sam.prompt_encoder.get_dense_pe()
        tokens, iou, masks = reference_decode(sam.mask_decoder, embedding, pe, sparse, dense)
        no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        decoder = PointDecoder(sam.mask_decoder, embedding, pe, no_mask)
        smaller = decoder.decode(sparse[:2])  # the first block's buffers are made for 2, then grown
        decoded = decoder.decode(sparse)
        again = decoder.decode(sparse[3:5])
        fast_masks = low_res_logits(sam.mask_decoder, decoded, torch.tensor([0, 2, 5]), (64, 64))
    with torch.no_grad():
        outside = decoder.decode(sparse[:2])  # out of inference mode, after batches in it
    torch.testing.assert_close(outside.tokens, tokens[:2], atol=2e-5, rtol=1e-4)
    assert decoded.tokens.shape == (6, 4 * width)
    torch.testing.assert_close(decoded.tokens, tokens, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(decoded.iou_predictions, iou, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(smaller.tokens, tokens[:2], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(again.tokens, tokens[3:5], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(smaller.image_tokens, decoded.image_tokens[:2])  # not overwritten by later batches
    torch.testing.assert_close(fast_masks, masks[[0, 2, 5]], atol=1e-4, rtol=1e-4)
    agree = np.mean(((fast_masks > 0) == (masks[[0, 2, 5]] > 0)).numpy())
    assert agree > 0.9999
