"""Grid-point decoding that yields SAM's mask-token embeddings without materialising masks.

SAM's ``MaskDecoder`` runs its two-way transformer, then upscales the image tokens of *every*
prompt to 256x256 masks. U-SAM classifies a point from its four mask tokens alone, so masks are
only needed for the few points the head keeps. This module runs the same transformer with the
model's own weights, reorganised for many point prompts on one image:

* In the first block every prompt sees the same image tokens (image embedding + the "no mask"
  dense embedding), so the image-side projections are computed once per image, not per prompt.
* Attention between ~7 prompt tokens and 4096 image tokens is folded: instead of projecting all
  image tokens to keys/values per prompt, the few token-side vectors are projected back into the
  model width (``W_k^T q``) and the out-projection is applied to the tokens' values before they
  are spread over the image. Same arithmetic, reassociated: results match SAM's decoder to float
  rounding (see ``tests/test_decoder.py``), at a fraction of the memory traffic.

The image tokens after the transformer are kept per chunk, so masks of selected points are
produced with SAM's own ``output_upscaling`` and hypernetwork MLPs, exactly as SAM would.

:class:`PromptMaskDecoder` is the same folded arithmetic for the few prompts of interactive tools,
refinement and video (boxes, points, an earlier mask), written without in-place updates so that
it exports to ONNX with the number of prompts free; its masks are made channels-last, SAM's
2x2-stride transposed convolutions as matrix products.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import Tensor

MULTIMASK = slice(1, None)
"""SAM's three multimask outputs are mask tokens 1..3; token 0 is the single-mask output."""


@dataclass
class DecodedPoints:
    """Transformer outputs for a batch of B point prompts on one image.

    Attributes:
        tokens: (B, 4 * E) float32, the four output mask tokens per point, flattened: the point's
            embedding for the head.
        iou_predictions: (B, 3) float32, SAM's predicted IoU of each multimask output.
        image_tokens: (B, N, E) image tokens after the transformer (N = h * w), kept for masks.
        mask_tokens: (B, 4, E) the same mask tokens, unflattened.
    """

    tokens: Tensor
    iou_predictions: Tensor
    image_tokens: Tensor
    mask_tokens: Tensor


class PointDecoder:
    """Decodes point prompts on one image embedding, sharing per-image work across batches.

    The first block's per-prompt image tokens are written into two buffers kept from batch to
    batch (one decode at a time holds them), so the allocator does not map and fault in fresh
    pages for them on every batch; only the image tokens a batch returns are new."""

    def __init__(self, decoder: MaskDecoder, image_embedding: Tensor, image_pe: Tensor, no_mask: Tensor):
        """
        Args:
            decoder: SAM's mask decoder (its ``transformer`` a ``TwoWayTransformer``).
            image_embedding: (1, E, h, w) image encoder output.
            image_pe: (1, E, h, w) dense positional encoding (``prompt_encoder.get_dense_pe()``).
            no_mask: (1, E, 1, 1) or (1, E, h, w) dense prompt embedding used when no mask is given.
        """
        self.decoder = decoder
        self.size = tuple(image_embedding.shape[-2:])
        transformer = decoder.transformer
        first = transformer.layers[0]
        if not first.skip_first_layer_pe:
            raise ValueError("expected SAM's TwoWayTransformer (first block skips the query PE)")
        keys = (image_embedding + no_mask).flatten(2).transpose(1, 2)[0].contiguous()  # N, E
        pe = image_pe.flatten(2).transpose(1, 2)[0].contiguous()  # N, E
        self.keys = keys
        keys_pe = keys + pe
        cross = first.cross_attn_token_to_image
        self.first_k = _split_heads(cross.k_proj(keys_pe), cross.num_heads)  # H, N, c
        self.first_v = _split_heads(cross.v_proj(keys), cross.num_heads)
        back = first.cross_attn_image_to_token
        self.first_q = _split_heads(back.q_proj(keys_pe), back.num_heads)
        # Later blocks add the same positional encoding to every prompt's image tokens before
        # projecting them: its projections (with the projections' biases) are made once per image,
        # so no per-prompt copy of the image tokens with PE is ever made.
        self.pe_keys = [_pe_heads(block.cross_attn_token_to_image, "k_proj", pe) for block in transformer.layers[1:]]
        self.pe_queries = [_pe_heads(block.cross_attn_image_to_token, "q_proj", pe) for block in transformer.layers[1:]]
        self.pe_final = _pe_heads(transformer.final_attn_token_to_image, "k_proj", pe)
        self._buffers = torch.empty(0)
        self._lock = threading.Lock()

    def decode(self, sparse: Tensor) -> DecodedPoints:
        """Run the transformer for B prompts.

        Args:
            sparse: (B, T, E) sparse prompt embeddings from SAM's prompt encoder.
        """
        decoder = self.decoder
        batch = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        prompt = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
        layers = decoder.transformer.layers
        with self._lock:
            queries, keys = self._first_block(layers[0], prompt)
            for block, pe_keys, pe_queries in zip(layers[1:], self.pe_keys, self.pe_queries, strict=True):
                queries, keys = _block(block, queries, keys, prompt, pe_keys, pe_queries)
        transformer = decoder.transformer
        attn = _tokens_to_image(transformer.final_attn_token_to_image, queries + prompt, keys, self.pe_final)
        queries = transformer.norm_final_attn(queries + attn)
        mask_tokens = queries[:, 1 : 1 + decoder.num_mask_tokens, :]
        iou = decoder.iou_prediction_head(queries[:, 0, :])
        return DecodedPoints(
            tokens=mask_tokens.reshape(batch, -1),
            iou_predictions=iou[:, MULTIMASK],
            image_tokens=keys,
            mask_tokens=mask_tokens,
        )

    def _first_block(self, block: TwoWayAttentionBlock, prompt: Tensor) -> tuple[Tensor, Tensor]:
        queries = block.norm1(block.self_attn(q=prompt, k=prompt, v=prompt))
        cross = block.cross_attn_token_to_image
        attn = _tokens_to_shared_image(cross, queries + prompt, self.first_k, self.first_v)
        queries = block.norm2(queries + attn)
        queries = block.norm3(queries + block.mlp(queries))
        back = block.cross_attn_image_to_token
        updated, normed = self._buffer(prompt.shape[0])
        _image_to_tokens(back, self.keys.unsqueeze(0), queries + prompt, queries, self.first_q, out=updated)
        return queries, _layer_norm(block.norm4, updated, normed)

    def _buffer(self, batch: int) -> tuple[Tensor, Tensor]:
        """Two (batch, N, E) buffers for the first block's image tokens, grown when needed (and
        made anew when decoding moves in or out of inference mode, whose tensors stay in it)."""
        inference = torch.is_inference_mode_enabled()
        if self._buffers.dim() < 2 or self._buffers.shape[1] < batch or self._buffers.is_inference() != inference:
            self._buffers = self.keys.new_empty(2, batch, *self.keys.shape)
        return self._buffers[0, :batch], self._buffers[1, :batch]


class PromptMaskDecoder(torch.nn.Module):
    """SAM's ``MaskDecoder.predict_masks`` for B prompts on one image, folded as :class:`PointDecoder`
    and written to export to ONNX with B and the number of prompt tokens free.

    ``forward(image_embedding (1, E, h, w), sparse (B, T, E), dense (1 or B, E, h, w))`` returns all
    four masks' low-res logits (B, 4, 4h, 4w) and predicted IoU (B, 4): token 0 is the single-mask
    output, tokens 1-3 the multimask outputs (:data:`MULTIMASK`). A dense embedding of batch 1 (no
    mask prompt) is shared by every prompt until the first block updates the image tokens. The
    image PE is a buffer: an export folds its projections into constants."""

    image_pe: Tensor

    def __init__(self, decoder: MaskDecoder, image_pe: Tensor):
        """
        Args:
            decoder: SAM's mask decoder (its ``transformer`` a ``TwoWayTransformer``).
            image_pe: (1, E, h, w) dense positional encoding (``prompt_encoder.get_dense_pe()``).
        """
        super().__init__()
        self.decoder = decoder
        self.register_buffer("image_pe", image_pe.detach().flatten(2).transpose(1, 2)[0].clone())  # N, E
        self.eval()  # as the decoder it shares: an export restores the mode it found, on the decoder too

    def forward(self, image_embedding: Tensor, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        decoder, transformer, pe = self.decoder, self.decoder.transformer, self.image_pe
        prompts = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        prompt = torch.cat([output_tokens.unsqueeze(0).expand(prompts, -1, -1), sparse], dim=1)
        height, width = image_embedding.shape[-2:]
        keys = (image_embedding + dense).flatten(2).transpose(1, 2)  # 1 or B, N, E
        queries = prompt
        for block in transformer.layers:
            pe_keys = _pe_heads(block.cross_attn_token_to_image, "k_proj", pe)
            pe_queries = _pe_heads(block.cross_attn_image_to_token, "q_proj", pe)
            queries, keys = _block(block, queries, keys, prompt, pe_keys, pe_queries, inplace=False)
        final = transformer.final_attn_token_to_image
        attn = _tokens_to_image(final, queries + prompt, keys, _pe_heads(final, "k_proj", pe))
        queries = transformer.norm_final_attn(queries + attn)
        mask_tokens = queries[:, 1 : 1 + decoder.num_mask_tokens, :]
        masks = _channels_last_masks(decoder, keys, mask_tokens, (int(height), int(width)))
        return masks, decoder.iou_prediction_head(queries[:, 0, :])


def _channels_last_masks(
    decoder: MaskDecoder, image_tokens: Tensor, mask_tokens: Tensor, size: tuple[int, int]
) -> Tensor:
    """SAM's masks from (B, N, E) image tokens and (B, K, E) mask tokens: (B, K, 4h, 4w) logits.

    ``output_upscaling``'s two transposed convolutions have a 2x2 kernel and stride 2, so each is a
    matrix product per pixel into its 2x2 block of outputs; LayerNorm2d is a LayerNorm over the
    channels, last. Only the (B, K, 4h, 4w) result is laid out as an image."""
    first, norm, act_first, second, act_second = decoder.output_upscaling
    b, n, width = image_tokens.shape
    mid, out = first.out_channels, second.out_channels
    w_first = first.weight.permute(0, 2, 3, 1).reshape(width, 4 * mid)  # (in, ky, kx, out)
    y = torch.matmul(image_tokens, w_first).view(b, n, 4, mid) + first.bias
    y = act_first(torch.nn.functional.layer_norm(y, (mid,), norm.weight, norm.bias, norm.eps))
    w_second = second.weight.permute(0, 2, 3, 1).reshape(mid, 4 * out)
    z = act_second(torch.matmul(y, w_second).view(b, n * 16, out) + second.bias)
    hyper = _hypernetwork(decoder, mask_tokens)
    k = hyper.shape[1]
    height, width_grid = size
    masks = torch.matmul(z, hyper.transpose(1, 2))  # B, N * (ky kx ky' kx'), K
    # pixel (4y + 2ky + ky', 4x + 2kx + kx') of the grid cell (y, x)
    masks = masks.view(b, height, width_grid, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(b, k, 4 * height, 4 * width_grid)


def low_res_logits(decoder: MaskDecoder, decoded: DecodedPoints, index: Tensor, size: tuple[int, int]) -> Tensor:
    """SAM's low-resolution mask logits for the selected points.

    Args:
        index: (k,) long or bool index into the batch.
        size: (h, w) of the image embedding.

    Returns:
        (k, 3, 4h, 4w) float32 logits of the three multimask outputs (256x256 for SAM).
    """
    image_tokens = decoded.image_tokens[index]
    mask_tokens = decoded.mask_tokens[index]
    k, _, width = image_tokens.shape
    grid = image_tokens.transpose(1, 2).reshape(k, width, *size)
    upscaled = decoder.output_upscaling(grid)  # k, E/8, 4h, 4w
    hyper = _hypernetwork(decoder, mask_tokens)  # k, 4, E/8
    _, channels, height, width_up = upscaled.shape
    masks = (hyper @ upscaled.view(k, channels, height * width_up)).view(k, hyper.shape[1], height, width_up)
    return masks[:, MULTIMASK]


def reference_decode(
    decoder: MaskDecoder, image_embedding: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """SAM's own decoder forward, with the mask tokens captured by a hook on its transformer.

    Returns:
        tokens (B, 4 * E), iou_predictions (B, 3), low_res_logits (B, 3, 4h, 4w).
    """
    captured: dict[str, Tensor] = {}

    def keep(_module: object, _inputs: object, outputs: tuple[Tensor, Tensor]) -> None:
        captured["hs"] = outputs[0]

    hook = decoder.transformer.register_forward_hook(keep)
    try:
        masks, iou = decoder(image_embedding, image_pe, sparse, dense, multimask_output=True)
    finally:
        hook.remove()
    mask_tokens = captured["hs"][:, 1 : 1 + decoder.num_mask_tokens, :]
    return mask_tokens.reshape(sparse.shape[0], -1), iou, masks


def _hypernetwork(decoder: MaskDecoder, mask_tokens: Tensor) -> Tensor:
    """Each of the (B, K, E) mask tokens through its hypernetwork MLP: (B, K, E/8) mask weights."""
    return torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)


def _block(
    block: TwoWayAttentionBlock, queries: Tensor, keys: Tensor, prompt: Tensor, pe_keys: Tensor, pe_queries: Tensor,
    *, inplace: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One two-way block with per-prompt image tokens, as ``TwoWayAttentionBlock.forward``.

    ``pe_keys``, ``pe_queries``: (H, N, c) the block's projections of the image PE (see
    :func:`_pe_heads`). ``keys`` is updated in place unless not ``inplace`` (then it may also be
    one (1, N, E) image shared by every prompt)."""
    if block.skip_first_layer_pe:
        queries = block.norm1(block.self_attn(q=queries, k=queries, v=queries))
    else:
        q = queries + prompt
        queries = block.norm1(queries + block.self_attn(q=q, k=q, v=queries))
    attn = _tokens_to_image(block.cross_attn_token_to_image, queries + prompt, keys, pe_keys)
    queries = block.norm2(queries + attn)
    queries = block.norm3(queries + block.mlp(queries))
    back = block.cross_attn_image_to_token
    keys = _image_to_tokens(back, keys, queries + prompt, queries, pe_queries, per_prompt=True, inplace=inplace)
    return queries, block.norm4(keys)


def _layer_norm(norm: torch.nn.LayerNorm, x: Tensor, out: Tensor) -> Tensor:
    """``norm(x)`` written into ``out``."""
    stats = x.new_empty(*x.shape[:-1], 1), x.new_empty(*x.shape[:-1], 1)
    torch.ops.aten.native_layer_norm.out(
        x, list(norm.normalized_shape), norm.weight, norm.bias, norm.eps, out0=out, out1=stats[0], out2=stats[1]
    )
    return out


def _pe_heads(attn: Attention, name: str, pe: Tensor) -> Tensor:
    """``attn.<name>(pe)`` (projection and bias) split into heads: (H, N, c)."""
    projection: torch.nn.Linear = getattr(attn, name)
    return _split_heads(projection(pe), attn.num_heads).contiguous()


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(N, H*c) -> (H, N, c)."""
    n, width = x.shape
    return x.view(n, heads, width // heads).transpose(0, 1)


def _project_heads(linear: torch.nn.Linear, heads: int, x: Tensor) -> Tensor:
    """Project (B, T, E) prompt tokens into heads (B, H, T, c)."""
    y = linear(x)
    b, t, internal = y.shape
    return y.view(b, t, heads, internal // heads).transpose(1, 2)


def _head_weights(linear: torch.nn.Linear, heads: int) -> tuple[Tensor, Tensor]:
    """A projection E -> H*c as per-head weights (H, c, E) and biases (H, c)."""
    internal, width = linear.weight.shape
    return linear.weight.view(heads, internal // heads, width), linear.bias.view(heads, internal // heads)


def _merge_heads(attn: Attention, x: Tensor) -> Tensor:
    """(B, H, T, c) -> out_proj -> (B, T, E)."""
    b, h, t, c = x.shape
    return attn.out_proj(x.transpose(1, 2).reshape(b, t, h * c))


def _per_head(x: Tensor, shared: Tensor) -> Tensor:
    """x (B, H, T, c) against per-image (H, N, c): (H, B, T, N), one GEMM per head."""
    b, h, t, c = x.shape
    return torch.bmm(x.transpose(0, 1).reshape(h, b * t, c), shared.transpose(1, 2)).view(h, b, t, -1)


def _tokens_to_shared_image(attn: Attention, q_in: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Prompt tokens attend to image tokens shared by all prompts; k, v: (H, N, c) projected once."""
    q = _project_heads(attn.q_proj, attn.num_heads, q_in)  # B, H, T, c
    b, h, t, c = q.shape
    weights = torch.softmax(_per_head(q / math.sqrt(c), k), dim=-1).view(h, b * t, -1)  # H, BT, N
    out = torch.bmm(weights, v).view(h, b, t, c).transpose(0, 1)  # B, H, T, c
    return _merge_heads(attn, out)


def _tokens_to_image(attn: Attention, q_in: Tensor, keys: Tensor, pe_keys: Tensor) -> Tensor:
    """Prompt tokens (B, T, E) attend to per-prompt image tokens (B or 1, N, E) plus the image PE, folded.

    logits = (W_k (x + pe) + b_k) . q  is computed as  x . (W_k^T q) + (W_k pe + b_k) . q, the
    second term from the per-image ``pe_keys``; the values are W_v (sum_n a_n x_n) + b_v, so the N
    image tokens are never projected per prompt.
    """
    heads = attn.num_heads
    q = _project_heads(attn.q_proj, heads, q_in)
    b, _, t, c = q.shape
    q = q / math.sqrt(c)
    w_k, _ = _head_weights(attn.k_proj, heads)
    q_back = torch.einsum("bhtc,hce->bhte", q, w_k).reshape(b, heads * t, -1)  # B, HT, E
    logits = torch.matmul(q_back, keys.transpose(1, 2)).view(b, heads, t, -1)  # B, H, T, N
    from_pe = _per_head(q, pe_keys).transpose(0, 1)
    logits = logits + from_pe if torch.onnx.is_in_onnx_export() else logits.add_(from_pe)
    weights = torch.softmax(logits, dim=-1).view(b, heads * t, -1)
    pooled = torch.matmul(weights, keys).view(b, heads, t, -1)  # B, H, T, E
    w_v, b_v = _head_weights(attn.v_proj, heads)
    values = torch.einsum("bhte,hce->bhtc", pooled, w_v) + b_v[None, :, None, :]
    return _merge_heads(attn, values)


def _image_to_tokens(
    attn: Attention,
    residual: Tensor,
    k_in: Tensor,
    v_in: Tensor,
    image_queries: Tensor,
    *,
    per_prompt: bool = False,
    inplace: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """``residual + attention(image tokens -> prompt tokens)``, (B, N, E), folded.

    Args:
        residual: (1 or B, N, E) image tokens the update is added to (in place when per-prompt,
            unless not ``inplace``: then a (B, N, E) result, and ``residual`` may have batch 1).
        k_in, v_in: (B, T, E) prompt tokens for keys (with PE) and values.
        image_queries: (H, N, c) the image queries projected once per image (first block: the
            shared image tokens with PE), or, with ``per_prompt``, the projection of the image PE
            alone; the per-prompt ``residual``'s projection is then folded into the token keys:
            logits = x . (W_q^T k) + (W_q pe + b_q) . k.
        out: (B, N, E) where the first block's result is written (else a new tensor).

    The out-projection is applied to the T token values before they are mixed into the N image
    positions, sum_t a_t (W_o v_t), and its bias is spread over the heads' tokens: the weights of
    each head sum to 1 over the tokens, so sum_(t,h) a_th (b_o / H) = b_o.
    """
    heads = attn.num_heads
    k = _project_heads(attn.k_proj, heads, k_in)  # B, H, T, c
    b, _, t, c = k.shape
    k = k / math.sqrt(c)
    values = _project_heads(attn.v_proj, heads, v_in)  # B, H, T, c
    width = attn.out_proj.weight.shape[0]
    spread = torch.einsum("bhtc,ehc->bthe", values, attn.out_proj.weight.view(width, heads, c))
    spread = (spread + attn.out_proj.bias / heads).reshape(b, t * heads, width)  # B, TH, E
    # Logits laid out (B, T, H, N): the softmax runs over T (7 tokens) with a long contiguous
    # inner dimension, several times faster on CPU than a softmax over a last dimension of 7.
    from_pe = _per_head(k, image_queries).permute(1, 2, 0, 3)  # B, T, H, N
    if per_prompt:
        w_q, _ = _head_weights(attn.q_proj, heads)
        k_back = torch.einsum("bhtc,hce->bthe", k, w_q).reshape(b, t * heads, -1)  # B, TH, E
        logits = torch.matmul(k_back, residual.transpose(1, 2)).view(b, t, heads, -1) + from_pe
        weights = _softmax_tokens(logits).view(b, t * heads, -1)
        if inplace:
            return residual.baddbmm_(weights.transpose(1, 2), spread)
        return residual + torch.matmul(weights.transpose(1, 2), spread)
    weights = _softmax_tokens(from_pe).reshape(b, t * heads, -1)
    return torch.baddbmm(residual.expand(b, -1, -1), weights.transpose(1, 2), spread, out=out)


def _softmax_tokens(logits: Tensor) -> Tensor:
    """Softmax over dimension 1 of (B, T, H, N) logits. Written out when exporting: ONNX Runtime
    transposes a softmax over an inner axis to the last and back, which cost 15 % of the decoder."""
    if not torch.onnx.is_in_onnx_export():
        return torch.softmax(logits, dim=1)
    shifted = logits - logits.amax(dim=1, keepdim=True)
    exp = torch.exp(shifted)
    return exp / exp.sum(dim=1, keepdim=True)
