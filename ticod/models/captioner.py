"""Caption branch: GPT-2 (transformers) cross-attending to projected image features."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from timm.layers import build_sincos2d_pos_embed
from torch import nn
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from ticod.config import CaptionerConfig

log = logging.getLogger(__name__)

# Parameter-name parts of the layers GPT2LMHeadModel adds for add_cross_attention=True.
CROSS_ATTENTION_PARTS = ("crossattention.", "ln_cross_attn.")


class VisualMemory(nn.Module):
    """Feature maps -> one token sequence for cross-attention.

    Each level is projected to the decoder width (Linear + LayerNorm), then gets a fixed 2-D sine-cosine
    position code (timm's, so any map size works without interpolation) and a learned level embedding
    (so tokens from different maps stay distinguishable). Tokens lying wholly in the batch padding are
    masked out.

    Args:
        in_channels: Channels of each input level, in the order the maps are passed.
        dim: Decoder width (a multiple of 4 for the 2-D position code).
    """

    def __init__(self, in_channels: list[int], dim: int) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(
                f"caption decoder width {dim} must be a multiple of 4 (2-D sine-cosine positions)"
            )
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(c, dim), nn.LayerNorm(dim)) for c in in_channels)
        self.level_embed = nn.Parameter(torch.zeros(len(in_channels), dim))
        nn.init.normal_(self.level_embed, std=0.02)
        self.dim = dim

    def forward(
        self, maps: list[torch.Tensor], image_sizes: list[tuple[int, int]], padded_shape: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, N, dim) and their mask (B, N) (1 = inside the image).

        Args:
            maps: NCHW maps, one per level given at construction.
            image_sizes: (h, w) of each image before batch padding.
            padded_shape: (H, W) of the padded batch (a map's stride is H / map height).
        """
        tokens, masks = [], []
        for level, (proj, x) in enumerate(zip(self.proj, maps, strict=True)):
            h, w = x.shape[-2:]
            pos = build_sincos2d_pos_embed([h, w], self.dim, device=x.device, dtype=x.dtype)
            tokens.append(proj(x.flatten(2).transpose(1, 2)) + pos + self.level_embed[level])
            stride_h, stride_w = padded_shape[0] / h, padded_shape[1] / w
            rows = torch.arange(h, device=x.device)[:, None]
            cols = torch.arange(w, device=x.device)[None, :]
            masks.append(
                torch.stack(
                    [
                        ((rows < math.ceil(ih / stride_h)) & (cols < math.ceil(iw / stride_w))).flatten()
                        for ih, iw in image_sizes
                    ]
                ).to(torch.int64)
            )
        return torch.cat(tokens, dim=1), torch.cat(masks, dim=1)


@dataclass
class Objects:
    """Up to N objects per image that the decoder reads beside the feature maps (zero-padded, masked).

    Attributes:
        features: (B, N, F) what describes each object (the model decides; see ``TICOD._objects``).
        boxes: (B, N, 4) xyxy in the pixels of the image (before batch padding).
        mask: (B, N) int64, 1 = an object, 0 = padding.
    """

    features: torch.Tensor
    boxes: torch.Tensor
    mask: torch.Tensor

    def rows(self, index: Sequence[int]) -> Objects:
        """These objects of the images ``index`` (in that order)."""
        return Objects(self.features[list(index)], self.boxes[list(index)], self.mask[list(index)])


def box_geometry(boxes: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(B, N, 5): x1, y1, x2, y2 as fractions of each image's width/height, and the box's area fraction."""
    hw = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)  # (B, 2) h, w
    scale = hw[:, [1, 0, 1, 0]][:, None, :]
    rel = boxes / scale
    area = (rel[..., 2] - rel[..., 0]).clamp(min=0) * (rel[..., 3] - rel[..., 1]).clamp(min=0)
    return torch.cat([rel, area[..., None]], dim=-1)


class ObjectMemory(nn.Module):
    """Objects -> decoder tokens: each part of an object's features and its box geometry through its own
    Linear + LayerNorm to the decoder width, summed, plus a learned embedding that sets object tokens apart
    from the feature-map tokens. Normalised apart, each part enters at the same scale: in one Linear over
    their concatenation, 5 geometry values or a class-probability vector that sums to 1 would move the
    token far less per Adam step than hundreds of feature values.

    Args:
        parts: Widths of the parts the object features are the concatenation of.
        dim: Decoder width.
    """

    def __init__(self, parts: Sequence[int], dim: int) -> None:
        super().__init__()
        self.parts = [int(p) for p in parts]
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(width, dim), nn.LayerNorm(dim)) for width in [*self.parts, 5]
        )
        self.type_embed = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.type_embed, std=0.02)

    def forward(
        self, objects: Objects, image_sizes: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, N, dim) and their mask (B, N)."""
        dtype = self.type_embed.dtype
        parts = [*objects.features.split(self.parts, dim=-1), box_geometry(objects.boxes, image_sizes)]
        tokens = sum(proj(x.to(dtype)) for proj, x in zip(self.proj, parts, strict=True))
        return tokens + self.type_embed, objects.mask


def build_gpt2(cfg: CaptionerConfig, vocab_size: int, bos: int, eos: int, pad: int) -> GPT2LMHeadModel:
    """GPT-2 with cross-attention: pretrained from a hub name/local dir, or random from the config sizes."""
    dropout = {"resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
    special = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    if cfg.pretrained:
        gpt = GPT2LMHeadModel.from_pretrained(cfg.name, add_cross_attention=True, **dropout, **special)
        if gpt.config.vocab_size != vocab_size:
            gpt.resize_token_embeddings(vocab_size)
        new = [n for n, _ in gpt.named_parameters() if any(p in n for p in CROSS_ATTENTION_PARTS)]
        log.info("GPT-2 from %s; %d new cross-attention tensors (e.g. %s)", cfg.name, len(new), new[:2])
        return gpt
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        add_cross_attention=True,
        **dropout,
        **special,
    )
    return GPT2LMHeadModel(config)


def captions_per_image(rows: int, images: int) -> int:
    """k of a batch holding k caption rows per image (rows = images · k), or a ValueError."""
    if images <= 0 or rows % images or rows == 0:
        raise ValueError(f"{rows} caption rows for {images} images: expected k rows per image, k >= 1")
    return rows // images


def caption_rows(images: Iterable[int], k: int) -> list[int]:
    """The caption rows of ``images`` in a batch of k rows per image, image by image."""
    return [i * k + j for i in images for j in range(k)]


class CaptionDecoder(nn.Module):
    """GPT-2 language model conditioned on image features through cross-attention.

    Args:
        cfg: GPT-2 source/sizes, generation defaults, dropout and grad checkpointing.
        visual_channels: Channels of the maps given to :meth:`forward` (last backbone stage first).
        vocab_size: Tokenizer vocabulary size.
        bos_token_id: Start token fed as the first input.
        eos_token_id: End token (generation stops on it).
        pad_token_id: Padding token of generated sequences.
        object_parts: Widths of the parts of the object features given to :meth:`forward` (none: the decoder
            reads no objects).
    """

    def __init__(
        self,
        cfg: CaptionerConfig,
        visual_channels: list[int],
        vocab_size: int,
        bos_token_id: int,
        eos_token_id: int,
        pad_token_id: int,
        object_parts: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.gpt = build_gpt2(cfg, vocab_size, bos_token_id, eos_token_id, pad_token_id)
        # transformers cannot infer the loss from the class name "GPT2LMHeadModel" and warns; name it.
        self.gpt.loss_type = "ForCausalLM"
        self.memory = VisualMemory(visual_channels, self.gpt.config.n_embd)
        self.objects = ObjectMemory(object_parts, self.gpt.config.n_embd) if object_parts else None
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.num_beams = cfg.num_beams
        self.length_penalty = cfg.length_penalty
        self.label_smoothing = cfg.label_smoothing
        self.max_new_tokens = cfg.max_new_tokens
        # Set by the caller while ranks run the decoder in lockstep (ZeRO-3 gathers its weights at every
        # forward): generation then goes on stepping until every rank's captions are done (HF synced_gpus).
        self.synced_gpus = False
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each GPT-2 block in backward (non-reentrant torch checkpoint)."""
        if enable:
            self.gpt.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.gpt.activation_checkpointing_disable()

    def read(
        self,
        maps: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        padded_shape: tuple[int, int],
        objects: Objects | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What cross-attention reads: the maps' tokens, then the objects' (B, N, dim), and their mask."""
        memory, mask = self.memory(maps, image_sizes, padded_shape)
        if self.objects is None:
            if objects is not None:
                raise ValueError("objects given to a decoder built without object tokens")
            return memory, mask
        if objects is None:
            raise ValueError("this decoder reads object tokens (model.captioner.object_tokens): pass objects")
        tokens, object_mask = self.objects(objects, image_sizes)
        return torch.cat([memory, tokens], dim=1), torch.cat([mask, object_mask.to(mask.dtype)], dim=1)

    def forward(
        self,
        maps: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        padded_shape: tuple[int, int],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        has_caption: Sequence[bool] | None = None,
        label_smoothing: float | None = None,
        objects: Objects | None = None,
    ) -> torch.Tensor:
        """Teacher-forced mean token cross-entropy over the captioned rows' tokens.

        Args:
            maps: Image feature maps (see ``visual_channels``).
            image_sizes: (h, w) of each image before padding.
            padded_shape: (H, W) of the padded batch.
            input_ids: (B·k, L) BOS + tokens + EOS, right-padded: k captions per image, image by image
                (each image's features are read once per caption).
            attention_mask: (B·k, L), 0 at padding.
            has_caption: Per image whether its rows hold real captions (None: all). The others' tokens are
                not targets, so the loss equals that of the captioned rows alone; with no captioned row it
                is an exact 0 that still reaches every weight (see below).
            label_smoothing: Of the cross-entropy; None: the configured one (0 gives the plain likelihood).
            objects: Each image's objects (required when built with ``object_parts``).
        """
        memory, memory_mask = self.read(maps, image_sizes, padded_shape, objects)
        k = captions_per_image(len(input_ids), len(image_sizes))
        if k > 1:
            memory, memory_mask = memory.repeat_interleave(k, 0), memory_mask.repeat_interleave(k, 0)
        # Padding never counts (pad may equal EOS for GPT-2, so the mask decides); GPT-2 shifts labels
        # itself, so BOS at position 0 is an input only and every later token is a target.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        uncaptioned: list[int] = []
        if has_caption is not None:
            if len(has_caption) != len(image_sizes):
                raise ValueError(f"{len(has_caption)} has_caption flags for {len(image_sizes)} images")
            uncaptioned = caption_rows((i for i, has in enumerate(has_caption) if not has), k)
        # No captioned row: row 0 stays a stand-in target (its "" caption still has EOS to predict), so that
        # the loss is finite and every decoder weight takes part in backward (ZeRO reduces each weight's
        # gradient across ranks and hangs when one is missing); its loss is multiplied by 0 below.
        stand_in = len(uncaptioned) == len(input_ids)
        for i in uncaptioned[1:] if stand_in else uncaptioned:
            labels[i] = -100  # Python-int rows: no host-device sync
        smooth = self.label_smoothing if label_smoothing is None else label_smoothing
        out = self.gpt(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=memory,
            encoder_attention_mask=memory_mask,
            labels=None if smooth else labels,
            use_cache=False,
        )
        if smooth:  # GPT-2's own loss has no smoothing: the same shifted mean token cross-entropy, smoothed
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), label_smoothing=smooth
            )
        else:
            loss = out.loss
        return loss * 0 if stand_in else loss

    @torch.no_grad()
    def generate(
        self,
        maps: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        padded_shape: tuple[int, int],
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        use_cache: bool = True,
        objects: Objects | None = None,
    ) -> list[torch.Tensor]:
        """Greedy (num_beams=1) or beam-search captions.

        Args:
            use_cache: Keep attention keys/values between steps (the KV cache). False recomputes the whole
                prefix at every step: same captions, only slower (tools/bench/generate.py measures it).

        Returns:
            Per image the generated ids without BOS, EOS and padding (int64, possibly empty).
        """
        memory, memory_mask = self.read(maps, image_sizes, padded_shape, objects)
        batch = memory.shape[0]
        start = torch.full((batch, 1), self.bos_token_id, dtype=torch.int64, device=memory.device)
        # generate() repeats every tensor kwarg per beam (encoder_hidden_states included) for
        # decoder-only models, and GPT-2 caches the cross-attention keys/values after the first step.
        out = self.gpt.generate(
            input_ids=start,
            attention_mask=torch.ones_like(start),
            encoder_hidden_states=memory,
            encoder_attention_mask=memory_mask,
            num_beams=num_beams or self.num_beams,
            length_penalty=self.length_penalty,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            do_sample=False,
            use_cache=use_cache,
            synced_gpus=self.synced_gpus,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            # BOS only starts a caption; where it differs from EOS, forbid it as a generated token.
            suppress_tokens=[self.bos_token_id] if self.bos_token_id != self.eos_token_id else None,
        )
        captions = []
        for ids in out[:, 1:]:
            end = torch.where(ids == self.eos_token_id)[0]
            captions.append(ids[: end[0]] if len(end) else ids)
        return captions
