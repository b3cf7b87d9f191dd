"""Tokenizer and text encoder: what turns an instruction or caption into editor conditioning.

Every backbone reads text the same way, ``encode(texts) -> (hidden_states, pooled, mask)``:

- ``hidden_states`` [B, L, D]: per-token states for cross-attention (UNet) or the text stream of
  the joint attention (DiT);
- ``pooled`` [B, P]: one vector per text, added to the timestep embedding by FLUX and used by
  Multi-Reward as Condition (sec. 3) to embed the failure texts;
- ``attention_mask`` [B, L]: 1 on real tokens.

Tiny profile: a word-level tokenizer over the world's own words and a 2-layer ``CLIPTextModel``.
Full profile: the hub model's own encoders, CLIP for InstructPix2Pix (states and pooled from one
model), CLIP + T5 for FLUX (pooled from CLIP, states from T5, as the FLUX pipelines do).
The empty string ``""`` is the null text for classifier-free guidance.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from nb_edit.models.tiny_configs import TINY_MAX_TEXT_LENGTH, tiny_clip_text_config

NULL_TEXT = ""
# [EOS] must not get id 2: CLIP falls back to its legacy "pool at the largest id" rule then.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]")


def build_tokenizer(texts: list[str], save_dir: str | Path | None = None,
                    model_max_length: int = TINY_MAX_TEXT_LENGTH) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word and punctuation mark in ``texts``.

    Lower-cased, split on whitespace and punctuation, wrapped as ``[BOS] ... [EOS]``, padded on
    the right to ``model_max_length``. Ids are deterministic: special tokens first, then words in
    sorted order. Unknown words map to ``[UNK]``. With ``save_dir`` it is also written there with
    ``save_pretrained`` (load it back with ``PreTrainedTokenizerFast.from_pretrained``).
    """
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise TypeError("build_tokenizer(texts=...) needs a list of strings; wrap a single text in a list.")
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(SPECIAL_TOKENS)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = sorted({word for text in texts
                    for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))}
                   - set(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend.model = models.WordLevel(vocab, unk_token="[UNK]")
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", pair="[BOS] $A [SEP] $B [EOS]",
        special_tokens=[(token, vocab[token]) for token in ("[BOS]", "[EOS]", "[SEP]")],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]", sep_token="[SEP]", padding_side="right", model_max_length=model_max_length,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def _tokenize(tokenizer, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                      return_tensors="pt")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


class TextEncoder(nn.Module):
    """One tokenizer + encoder (CLIP), or two (CLIP for ``pooled``, T5 for ``hidden_states``).

    The encoders run in the caller's grad mode; loaders hand them out frozen.
    """

    def __init__(self, tokenizer, encoder: nn.Module, tokenizer_2=None, encoder_2: nn.Module | None = None):
        super().__init__()
        if (tokenizer_2 is None) != (encoder_2 is None):
            raise ValueError("TextEncoder needs tokenizer_2 and encoder_2 together (CLIP + T5) or neither.")
        self.tokenizer, self.encoder = tokenizer, encoder
        self.tokenizer_2, self.encoder_2 = tokenizer_2, encoder_2

    @property
    def hidden_dim(self) -> int:
        """Width of ``hidden_states``: the UNet's cross_attention_dim / FLUX's joint_attention_dim."""
        return (self.encoder_2 or self.encoder).config.hidden_size

    @property
    def pooled_dim(self) -> int:
        """Width of ``pooled``: FLUX's pooled_projection_dim."""
        return self.encoder.config.hidden_size

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``texts`` -> (hidden_states [B, L, D], pooled [B, P], attention_mask [B, L])."""
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TypeError("TextEncoder.encode(texts=...) needs a list of strings; use [text] for one, "
                            f"and {NULL_TEXT!r} for the null text.")
        device = next(self.encoder.parameters()).device
        ids, mask = _tokenize(self.tokenizer, list(texts), device)
        clip_out = self.encoder(input_ids=ids, attention_mask=mask)
        if self.encoder_2 is None:
            return clip_out.last_hidden_state, clip_out.pooler_output, mask
        ids_2, mask_2 = _tokenize(self.tokenizer_2, list(texts), device)
        t5_states = self.encoder_2(input_ids=ids_2).last_hidden_state  # FLUX attends to T5 padding too
        return t5_states, clip_out.pooler_output, mask_2

    def forward(self, texts: list[str]):
        return self.encode(texts)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the hub layout: ``tokenizer/``, ``text_encoder/`` (+ ``_2`` for T5)."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        self.encoder.save_pretrained(str(folder / "text_encoder"))
        if self.encoder_2 is not None:
            self.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
            self.encoder_2.save_pretrained(str(folder / "text_encoder_2"))


def build_tiny_text_encoder(tokenizer: PreTrainedTokenizerFast, **overrides) -> TextEncoder:
    """A randomly initialised 2-layer CLIP text encoder sized to ``tokenizer``'s vocabulary."""
    config = tiny_clip_text_config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **{"max_position_embeddings": max(tokenizer.model_max_length, TINY_MAX_TEXT_LENGTH), **overrides},
    )
    return TextEncoder(tokenizer, CLIPTextModel(CLIPTextConfig(**config)))
