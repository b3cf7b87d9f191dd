"""The VLM judge: one interface over LLaVA, LLaVA-OneVision and Qwen2.5-VL (NP-Edit Sec. 3.2,
MT-EditFlow's and Multi-Reward's VLM scores, UniWorld-V2's implicit digit reward).

Three ways to read a frozen vision-language model:

- ``yes_no_logits``: one teacher-forced forward pass, the logits of the "Yes" and "No" tokens at
  the answer position (NP-Edit's loss ``-log sigmoid(l_target - l_other)`` is built on them in
  ``rewards``). Differentiable with respect to the images through ``vlm_preprocess``.
- ``expected_score``: the expected value of a 0-5 (or 1-5) score under the softmax restricted to
  the digit tokens' logits at the answer position (no generation; UniWorld-V2's implicit reward).
- ``generate_score``: greedy generation and parsing; an answer that does not parse is a failure
  (NaN, counted), never a zero.

Prompts put the images first and the question after them, so the image part of the prompt is
a prefix shared by every question about the same images: ``yes_no_logits_multi`` runs it once
and reuses its key/value cache for each question.

Families are chosen by ``config.model_type`` (``_FAMILIES``; what differs between them lives in
``_Family``):

- ``llava`` (``LlavaForConditionalGeneration``, CLIP image processor, one ``<image>`` token per
  vision patch; the CLS token is dropped with ``vision_feature_select_strategy="default"``);
- ``llava_onevision`` (``LlavaOnevisionForConditionalGeneration``, SigLIP tower, Qwen2 language
  model, ``LlavaOnevisionImageProcessor``). As its processor does, an image alone in its prompt
  is read as anyres tiles (a base view plus the tiles of the best ``image_grid_pinpoints``
  resolution, padding cropped off, one newline token per feature row, shrunk past
  ``vision_aspect_ratio="anyres_max_N"``), and each image of a multi-image prompt (a source
  and an edit) as one base view and one newline token;
- ``qwen2_5_vl`` / ``qwen2_vl`` (one ``<|image_pad|>`` token per merged patch:
  ``grid_h * grid_w / merge_size**2``, wrapped in ``<|vision_start|>`` ... ``<|vision_end|>``,
  with 3-D rotary positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from nb_edit.core.images import check_image_tensor
from nb_edit.core.runtime import pick_device, pick_dtype
from nb_edit.core.validation import BadInputError
from nb_edit.models.loaders import require_safetensors
from nb_edit.models.vlm.parsing import parse_score
from nb_edit.models.vlm.preprocess import ClipPreprocess, OneVisionPreprocess, QwenVLPreprocess

# Words the plain prompt template and the answers use: a word-level tokenizer for a tiny judge
# must contain them (pass them to the tokenizer builder along with the questions).
TEMPLATE_WORDS = ("USER", ":", "ASSISTANT", "Yes", "No", "0", "1", "2", "3", "4", "5")

LLAVA_IMAGE_TOKEN = "<image>"
LLAVA_VIDEO_TOKEN = "<video>"  # LLaVA-OneVision's config names a video token; the judge never uses it
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


# What a family does with the image slots: (judge, slots on the judge's device) -> (the model's image
# inputs, image tokens per slot). Every tensor in the inputs is laid out sample-major (all of sample
# 0's rows, then sample 1's...), with the same number of rows per sample, so that repeating samples
# (one row per question) is the same operation for every family (``_repeat_samples``).
VisionInputs = Callable[["VLMJudge", Sequence[torch.Tensor]], tuple[dict[str, torch.Tensor], list[int]]]
# A tiny family member for tests: (tokenizer, image_size, **sizes) -> (config, image processor); it
# adds the family's image tokens to the tokenizer first.
TinyBuilder = Callable[..., tuple[Any, Any]]


@dataclass(frozen=True)
class _Family:
    model_class: type
    preprocess_class: type
    # Module-name prefixes (as transformers matches them) that stay in full precision: the
    # vision side, so pixel gradients stay precise, and the head, which the answer logits need.
    skip_quantization: tuple[str, ...]
    vision_inputs: VisionInputs
    tiny: TinyBuilder | None = None
    # Raises when the model's config and the preprocessing built from the image processor disagree
    # on something the model relies on (checked once, when the judge is built).
    check: Callable[[Any, Any], None] | None = None

    @property
    def is_qwen(self) -> bool:
        return self.preprocess_class is QwenVLPreprocess


def _family_of(config: Any) -> _Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"config.model_type={model_type!r} has no judge family; supported: {', '.join(_FAMILIES)}."
        )
    return _FAMILIES[model_type]


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or 'in memory'})"


def single_token_id(tokenizer: PreTrainedTokenizerBase, word: str) -> int:
    """The id of ``word`` as one token, as it would follow the answer prompt."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1 or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id):
        raise ValueError(
            f"tokenizer {_tokenizer_name(tokenizer)} has no single token for {word!r} (encodes to {ids}); "
            f"add {word!r} to the texts the tokenizer is built from (see judge.TEMPLATE_WORDS)."
        )
    return ids[0]


class VLMJudge:
    """A frozen-or-not vision-language model asked questions about 1 or 2 images per sample.

    ``images`` everywhere is a list with one ``(B, 3, H, W)`` tensor in ``[-1, 1]`` per image
    slot (e.g. ``[source, edited]``); sample ``b`` is asked about ``images[k][b]`` for every k.
    Every readout checks them (``core.images.check_image_tensor``: NaN, Inf, range, layout) and
    raises ``BadInputError`` naming the slot, except tensors that carry a gradient.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, image_processor: Any):
        self.family = _family_of(model.config)
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.preprocess = self.family.preprocess_class.from_image_processor(image_processor)
        config = model.config
        if self.family.check is not None:
            self.family.check(config, self.preprocess)
        self.image_token_id = int(config.image_token_id)
        if self.family.is_qwen:
            self.vision_end_token_id = int(config.vision_end_token_id)
            placeholder_ids = (config.vision_start_token_id, config.image_token_id, config.vision_end_token_id)
        else:
            self.vision_end_token_id = None
            placeholder_ids = (config.image_token_id,)
        self.image_placeholder = "".join(tokenizer.convert_ids_to_tokens(list(placeholder_ids)))
        self.yes_id = single_token_id(tokenizer, "Yes")
        self.no_id = single_token_id(tokenizer, "No")
        for name in ("pad_token_id", "eos_token_id"):
            if getattr(tokenizer, name) is not None:
                self.pad_id = getattr(tokenizer, name)
                break
        else:
            self.pad_id = 0  # right padding sits after the answer position, so any id serves

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        quantization: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
    ) -> "VLMJudge":
        """Load model, tokenizer and image processor (never ``trust_remote_code``; weights from
        safetensors only: a folder with pickle weights only is refused with the fix).

        ``quantization``: None, ``"4bit"`` (NF4) or ``"8bit"`` (bitsandbytes) for the language model;
        the vision tower, projector and head stay in ``dtype`` so pixel gradients stay precise.
        """
        device = pick_device(str(device))
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else pick_dtype(device, dtype)
        require_safetensors(path_or_id)
        config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=False)
        family = _family_of(config)
        load_kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": False, "use_safetensors": True}
        if quantization is not None:
            load_kwargs["quantization_config"] = _bnb_config(quantization, torch_dtype, family)
            load_kwargs["device_map"] = {"": device}
        model = family.model_class.from_pretrained(path_or_id, config=config, **load_kwargs)
        if quantization is None:
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=False)
        image_processor = AutoImageProcessor.from_pretrained(path_or_id, backend="pil", trust_remote_code=False)
        return cls(model.eval(), tokenizer, image_processor)

    @classmethod
    def tiny(
        cls, family: str, tokenizer: PreTrainedTokenizerBase, image_size: int = 32, seed: int = 0,
        **sizes: int,
    ) -> "VLMJudge":
        """A randomly initialised tiny judge of ``family`` (``llava``, ``llava_onevision`` or
        ``qwen2_5_vl``) for tests.

        Adds the family's image tokens to ``tokenizer`` (in place) before sizing the vocabulary.
        """
        builders = {name: fam.tiny for name, fam in _FAMILIES.items() if fam.tiny is not None}
        if family not in builders:
            raise ValueError(f"family={family!r} has no tiny judge; use one of {', '.join(map(repr, builders))}.")
        config, image_processor = builders[family](tokenizer, image_size, **sizes)
        torch.manual_seed(seed)
        model = _FAMILIES[family].model_class(config).eval()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return cls(model, tokenizer, image_processor)

    def save_pretrained(self, path: str | Path) -> None:
        """Model (safetensors), tokenizer and image processor, loadable by ``from_pretrained``."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def freeze(self) -> "VLMJudge":
        """No parameter trains; gradients still flow from the logits back to the input pixels."""
        self.model.eval().requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # ----------------------------------------------------------------------------- prompts
    def prompt_text(self, question: str, n_images: int) -> str:
        """The prompt for one question about ``n_images`` images, one placeholder per image.

        The tokenizer's chat template when it has one, else ``USER: <images> question ASSISTANT:``.
        """
        if self.tokenizer.chat_template:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        return "USER: " + "".join(self.image_placeholder + "\n" for _ in range(n_images)) + question + " ASSISTANT:"

    def prompt_ids(self, question: str, tokens_per_image: Sequence[int]) -> tuple[list[int], int]:
        """Token ids with each image placeholder expanded to its image's token count.

        Returns the ids and the length of the image prefix (everything up to the last image
        token, and its closing ``<|vision_end|>`` for Qwen), which does not depend on the question.
        """
        text = self.prompt_text(question, len(tokens_per_image))
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        # A chat template writes its own begin token. Without one, only a begin token is added:
        # a post-processor's end token after the prompt would take the answer position.
        bos = self.tokenizer.bos_token_id
        if not self.tokenizer.chat_template and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        n_found = ids.count(self.image_token_id)
        if n_found != len(tokens_per_image):
            raise ValueError(
                f"the prompt holds {n_found} image tokens for {len(tokens_per_image)} images; the chat template "
                f"of {_tokenizer_name(self.tokenizer)} must render one {self.image_placeholder!r} per image."
            )
        counts = iter(tokens_per_image)
        expanded: list[int] = []
        for token in ids:
            expanded.extend([token] * next(counts) if token == self.image_token_id else [token])
        prefix_len = len(expanded) - expanded[::-1].index(self.image_token_id)
        if self.vision_end_token_id is not None and expanded[prefix_len : prefix_len + 1] == [self.vision_end_token_id]:
            prefix_len += 1
        return expanded, prefix_len

    # ----------------------------------------------------------------------------- images
    def _vision_inputs(self, images: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[int], int]:
        """Preprocess every image slot; order the images sample by sample (as the tokens are).

        Returns the model's image inputs, the token count per slot, and the batch size.
        """
        if isinstance(images, torch.Tensor):
            images = [images]
        if len(images) == 0:
            raise ValueError("images is empty; pass a list of (B, 3, H, W) tensors, one per image slot.")
        for k, img in enumerate(images):
            # Every public readout passes here. A tensor with a gradient is a model's output inside a
            # training step (NP-Edit's decoded generator output): unclamped by design, and NaN there is
            # the training loop's to count and skip, so only its layout is checked.
            if isinstance(img, torch.Tensor) and img.requires_grad:
                if img.ndim != 4 or img.shape[1] != 3:
                    raise BadInputError(f"images[{k}]", f"shape {tuple(img.shape)} is not (B, 3, H, W)",
                                        "pass one (B, 3, H, W) tensor in [-1, 1] per image slot")
            else:
                check_image_tensor(img, f"images[{k}]")
        batch = images[0].shape[0]
        if any(img.shape[0] != batch for img in images):
            raise BadInputError("images", f"the slots hold different batch sizes {[tuple(i.shape) for i in images]}",
                                "give every slot the same B (sample b is asked about images[k][b])")
        inputs, counts = self.family.vision_inputs(self, [img.to(self.device) for img in images])
        return inputs, counts, batch

    @staticmethod
    def _repeat_samples(inputs: dict[str, torch.Tensor], batch: int, repeats: int) -> dict:
        """Repeat every sample's images ``repeats`` times (sample-major), for one row per question.

        Every family lays its image inputs out sample-major with the same rows per sample.
        """
        if repeats == 1:
            return inputs
        return {
            key: value.view(batch, -1, *value.shape[1:]).repeat_interleave(repeats, dim=0).flatten(0, 1)
            for key, value in inputs.items()
        }

    # ----------------------------------------------------------------------------- forward
    def _positions(self, ids: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Qwen's 3-D rotary positions for whole sequences (images use their (t, h, w) grid)."""
        token_types = (ids == self.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=token_types, image_grid_thw=grid)
        return positions

    def _base_forward(self, ids: torch.Tensor, vision: dict | None, **kwargs) -> Any:
        if self.family.is_qwen and vision is not None:
            kwargs.setdefault("position_ids", self._positions(ids, vision["image_grid_thw"]))
        return self.model.model(input_ids=ids, **(vision or {}), **kwargs)

    def _logits_at(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return self.model.get_output_embeddings()(last).float()

    def answer_logits(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str] | Sequence[Sequence[str]],
        reuse_prefix: bool = False,
    ) -> torch.Tensor:
        """Vocabulary logits at the answer position, ``(B, Q, V)`` float32, teacher-forced.

        ``questions``: B strings (one per sample, Q = 1), or B lists of Q strings. With
        ``reuse_prefix`` the image prefix runs once per sample and its key/value cache serves all
        Q questions; otherwise each (sample, question) row is one sequence of one batched pass.
        """
        vision, counts, batch = self._vision_inputs(images)
        per_sample = _questions_per_sample(questions, batch)
        n_questions = len(per_sample[0])
        prompts = [self.prompt_ids(q, counts) for qs in per_sample for q in qs]
        prefix_len = prompts[0][1]
        shared = all(ids[:n] == prompts[0][0][:prefix_len] for ids, n in prompts) and all(
            n == prefix_len and len(ids) > n for ids, n in prompts
        )
        if reuse_prefix and shared:
            return self._prefix_reuse_logits(vision, counts, batch, n_questions, prompts, prefix_len)
        ids, lengths = _right_pad([ids for ids, _ in prompts], self.pad_id, self.device)
        # Right padding lies after every answer position, so a causal model needs no mask.
        hidden = self._base_forward(ids, self._repeat_samples(vision, batch, n_questions)).last_hidden_state
        return self._logits_at(hidden, lengths).view(batch, n_questions, -1)

    def _prefix_reuse_logits(self, vision, counts, batch, n_questions, prompts, prefix_len) -> torch.Tensor:
        prefix = torch.tensor([prompts[0][0][:prefix_len]] * batch, device=self.device)
        cache = self._base_forward(prefix, vision, use_cache=True).past_key_values
        cache.batch_repeat_interleave(n_questions)  # one copy of each sample's prefix per question
        suffix, lengths = _right_pad([ids[prefix_len:] for ids, _ in prompts], self.pad_id, self.device)
        kwargs: dict[str, Any] = {"past_key_values": cache, "use_cache": True}
        if self.family.is_qwen:
            whole = torch.cat([prefix.repeat_interleave(n_questions, dim=0), suffix], dim=1)
            grid = self._repeat_samples(vision, batch, n_questions)["image_grid_thw"]
            kwargs["position_ids"] = self._positions(whole, grid)[..., prefix_len:]
        hidden = self._base_forward(suffix, None, **kwargs).last_hidden_state
        return self._logits_at(hidden, lengths).view(batch, n_questions, -1)

    # ----------------------------------------------------------------------------- readouts
    def yes_no_logits(
        self, images: Sequence[torch.Tensor], questions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit_yes [B], logit_no [B]) at the answer position: one forward, differentiable."""
        logits = self.answer_logits(images, questions)[:, 0]
        # NP-Edit's L_vlm = -log sigmoid(l_target - l_other) is built on these two logits.
        return logits[:, self.yes_id], logits[:, self.no_id]

    def yes_no_logits_multi(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str] | Sequence[Sequence[str]],
        reuse_prefix: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit_yes [B, Q], logit_no [B, Q]) for Q questions per sample on the same images.

        ``questions``: Q strings asked of every sample, or B lists of Q strings.
        """
        images_batch = (images if isinstance(images, torch.Tensor) else images[0]).shape[0]
        if questions and isinstance(questions[0], str):
            questions = [list(questions)] * images_batch
        logits = self.answer_logits(images, questions, reuse_prefix=reuse_prefix)
        return logits[..., self.yes_id], logits[..., self.no_id]

    def expected_score(
        self, images: Sequence[torch.Tensor], questions: Sequence[str], values: Sequence[int] = range(0, 6)
    ) -> torch.Tensor:
        """E[score] under the softmax over the digit tokens' logits only, ``[B]`` (UniWorld-V2)."""
        digit_ids = [single_token_id(self.tokenizer, str(v)) for v in values]
        logits = self.answer_logits(images, questions)[:, 0, digit_ids]
        weights = torch.tensor(list(values), dtype=logits.dtype, device=logits.device)
        return (logits.softmax(dim=-1) * weights).sum(dim=-1)  # sum_k p_k * v_k

    @torch.no_grad()
    def generate(self, images: Sequence[torch.Tensor], questions: Sequence[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy answers, one per sample (left-padded batch)."""
        vision, counts, batch = self._vision_inputs(images)
        prompts = [self.prompt_ids(q, counts)[0] for qs in _questions_per_sample(questions, batch) for q in qs]
        if len(prompts) != batch:
            raise ValueError(f"generate takes one question per sample; got {len(prompts)} for {batch} samples.")
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        extra = {"mm_token_type_ids": (ids == self.image_token_id).int()} if self.family.is_qwen else {}
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, **vision, **extra, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=self.pad_id,
        )
        return self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    def generate_score(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str],
        lo: int = 0,
        hi: int = 5,
        max_new_tokens: int = 16,
        parser: Callable[[str], float | None] | None = None,
    ) -> tuple[torch.Tensor, list[str], int]:
        """Generate, parse a score in [lo, hi]: (scores [B] with NaN for failures, texts, n_failures).

        ``parser`` defaults to ``nb_edit.models.vlm.parsing.parse_score(text, lo, hi)``.
        """
        if parser is None:

            def parser(text: str) -> float | None:
                return parse_score(text, lo, hi)

        texts = self.generate(images, questions, max_new_tokens=max_new_tokens)
        parsed = [parser(text) for text in texts]
        scores = torch.tensor([math.nan if p is None else float(p) for p in parsed], dtype=torch.float32)
        return scores, texts, sum(p is None for p in parsed)


# --------------------------------------------------------------------------------- helpers
def _same_shapes(tensors: Sequence[torch.Tensor]) -> bool:
    return all(t.shape == tensors[0].shape for t in tensors)


def _questions_per_sample(questions: Sequence[str] | Sequence[Sequence[str]], batch: int) -> list[list[str]]:
    if isinstance(questions, str) or len(questions) != batch:
        raise ValueError(
            f"questions must hold one entry per sample ({batch}); got "
            f"{'a single string' if isinstance(questions, str) else len(questions)}. Wrap a shared question as [q] * B."
        )
    per_sample = [[q] if isinstance(q, str) else list(q) for q in questions]
    if len({len(qs) for qs in per_sample}) != 1 or not per_sample[0]:
        raise ValueError("every sample must be asked the same, non-zero number of questions.")
    return per_sample


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)
    return ids, torch.tensor([len(r) for r in rows], device=device)


def _bnb_config(quantization: str, compute_dtype: torch.dtype, family: _Family) -> BitsAndBytesConfig:
    skip = list(family.skip_quantization)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"quantization={quantization!r} is unknown; use None, '4bit' or '8bit'.")


# --------------------------------------------------------------------------------- per family
def _llava_vision_inputs(judge: VLMJudge, images: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[int]]:
    slots = [judge.preprocess(img) for img in images]
    if not _same_shapes(slots):
        raise ValueError(
            f"LLaVA needs every image at the vision tower's size; slots preprocess to "
            f"{[tuple(s.shape[-2:]) for s in slots]}."
        )
    patch = judge.model.config.vision_config.patch_size
    height, width = slots[0].shape[-2:]
    cls_kept = judge.model.config.vision_feature_select_strategy == "full"
    counts = [(height // patch) * (width // patch) + int(cls_kept)] * len(slots)
    return {"pixel_values": torch.stack(slots, dim=1).flatten(0, 1).to(judge.dtype)}, counts


def _qwen_vision_inputs(judge: VLMJudge, images: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[int]]:
    batch = images[0].shape[0]
    per_slot = [judge.preprocess(img) for img in images]
    rows = [pixels.view(batch, -1, pixels.shape[-1]) for pixels, _ in per_slot]
    pixel_values = torch.stack(rows, dim=1).flatten(0, 2) if _same_shapes(rows) else torch.cat(
        [rows[k][b] for b in range(batch) for k in range(len(rows))]
    )
    grid = torch.stack([thw for _, thw in per_slot], dim=1).flatten(0, 1)
    merge = judge.preprocess.merge_size**2
    counts = [int(thw[0].prod()) // merge for _, thw in per_slot]
    return {"pixel_values": pixel_values.to(judge.dtype), "image_grid_thw": grid}, counts


def _onevision_vision_inputs(
    judge: VLMJudge, images: Sequence[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[int]]:
    # As LlavaOnevisionProcessor does: anyres tiles only for an image alone in its prompt. The model
    # learns which images came as tiles from batch_num_images (without it, it expects tiles for all).
    tiles = len(images) == 1
    per_slot = [judge.preprocess(img, tiles=tiles) for img in images]
    batch = images[0].shape[0]
    # (B, views of slot 0 + views of slot 1 + ..., 3, S, S) -> one row per view, sample-major.
    pixel_values = torch.cat([pixels for pixels, _ in per_slot], dim=1).flatten(0, 1)
    image_sizes = torch.stack([sizes for _, sizes in per_slot], dim=1).flatten(0, 1)
    config = judge.model.config
    features_per_side = config.vision_config.image_size // config.vision_config.patch_size
    max_tiles = _onevision_max_tiles(config)
    counts = [
        judge.preprocess.tokens_per_image(*img.shape[-2:], features_per_side, max_tiles, tiles=tiles) for img in images
    ]
    inputs = {
        "pixel_values": pixel_values.to(judge.dtype),
        "image_sizes": image_sizes,
        "batch_num_images": torch.full((batch,), len(images), dtype=torch.long, device=pixel_values.device),
    }
    return inputs, counts


def _onevision_max_tiles(config: Any) -> int:
    aspect = str(config.vision_aspect_ratio)
    if not aspect.startswith("anyres_max_") or not aspect.removeprefix("anyres_max_").isdigit():
        raise ValueError(
            f"config.vision_aspect_ratio={aspect!r} is not 'anyres_max_N'; the judge counts image tokens the way "
            "LlavaOnevisionModel packs them, which needs N (the released models use 'anyres_max_9')."
        )
    return int(aspect.removeprefix("anyres_max_"))


def _check_onevision(config: Any, preprocess: OneVisionPreprocess) -> None:
    """The model unpacks tiles with its own config; the preprocessing cut them with the processor's."""
    pinpoints = tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints)
    if pinpoints != preprocess.grid_pinpoints:
        raise ValueError(
            f"config.image_grid_pinpoints={list(map(list, pinpoints))} differ from the image processor's "
            f"{list(map(list, preprocess.grid_pinpoints))}; the model would read the tiles on another grid. "
            "Save the image processor with the model's image_grid_pinpoints."
        )
    if config.vision_config.image_size != preprocess.side:
        raise ValueError(
            f"the vision tower takes {config.vision_config.image_size} px tiles but the image processor makes "
            f"{preprocess.side} px ones; build the processor with size={{'height': "
            f"{config.vision_config.image_size}, 'width': {config.vision_config.image_size}}}."
        )
    if config.vision_feature_select_strategy != "full":
        # SigLIP has no CLS token: "default" drops a real patch, and the model then refuses tiles.
        raise ValueError(
            f"config.vision_feature_select_strategy={config.vision_feature_select_strategy!r}; LLaVA-OneVision "
            "keeps every SigLIP patch: set it to 'full'."
        )
    _onevision_max_tiles(config)


def _tiny_llava(tokenizer: PreTrainedTokenizerBase, image_size: int, **sizes: int) -> tuple[LlavaConfig, Any]:
    tokenizer.add_special_tokens({"extra_special_tokens": [LLAVA_IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    config = tiny_llava_config(
        vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
        image_size=image_size, **sizes,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return config, image_processor


def _tiny_llava_onevision(
    tokenizer: PreTrainedTokenizerBase, image_size: int, **sizes: int
) -> tuple[LlavaOnevisionConfig, Any]:
    tokens = [LLAVA_IMAGE_TOKEN, LLAVA_VIDEO_TOKEN]
    tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    image_id, video_id = tokenizer.convert_tokens_to_ids(tokens)
    config = tiny_llava_onevision_config(
        vocab_size=len(tokenizer), image_token_id=image_id, video_token_id=video_id, image_size=image_size, **sizes
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
    )
    return config, image_processor


def _tiny_qwen2_5_vl(tokenizer: PreTrainedTokenizerBase, image_size: int, **_sizes: int) -> tuple[Any, Any]:
    # The tiny Qwen2.5-VL has fixed sizes (the layer and width arguments of the other families are ignored).
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(QWEN_VISION_TOKENS)}, replace_extra_special_tokens=False
    )
    start, pad, end, video = tokenizer.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))
    config = tiny_qwen2_5_vl_config(
        vocab_size=len(tokenizer), image_token_id=pad, video_token_id=video,
        vision_start_token_id=start, vision_end_token_id=end,
    )
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        min_pixels=factor * factor, max_pixels=image_size * image_size,
    )
    return config, image_processor


_FAMILIES = {
    "llava": _Family(
        LlavaForConditionalGeneration, ClipPreprocess,
        ("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        vision_inputs=_llava_vision_inputs, tiny=_tiny_llava,
    ),
    "llava_onevision": _Family(
        # image_newline is a parameter, not a Linear: bitsandbytes leaves it in dtype anyway.
        LlavaOnevisionForConditionalGeneration, OneVisionPreprocess,
        ("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        vision_inputs=_onevision_vision_inputs, tiny=_tiny_llava_onevision, check=_check_onevision,
    ),
    "qwen2_5_vl": _Family(
        Qwen2_5_VLForConditionalGeneration, QwenVLPreprocess, ("model.visual", "lm_head"),
        vision_inputs=_qwen_vision_inputs, tiny=_tiny_qwen2_5_vl,
    ),
    "qwen2_vl": _Family(
        Qwen2VLForConditionalGeneration, QwenVLPreprocess, ("model.visual", "lm_head"),
        vision_inputs=_qwen_vision_inputs,
    ),
}


# --------------------------------------------------------------------------------- tiny configs
def tiny_llava_config(vocab_size: int, image_token_id: int, image_size: int = 32, patch_size: int = 4,
                      vision_layers: int = 2, text_layers: int = 2, hidden: int = 96) -> LlavaConfig:
    """CLIP vision tower (32 px, patch 4 -> 64 image tokens, 2 layers, hidden 96) + 2-layer Llama."""
    return LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model", "image_size": image_size, "patch_size": patch_size,
            "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": vision_layers,
            "num_attention_heads": 4, "projection_dim": hidden,
        },
        text_config={
            "model_type": "llama", "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        },
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def tiny_qwen2_5_vl_config(
    vocab_size: int, image_token_id: int, video_token_id: int, vision_start_token_id: int, vision_end_token_id: int
) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL vision tower (patch 4, merge 2, 2 blocks, hidden 64) + 2-layer Qwen2 (hidden 96).

    A 32 px image is an 8 x 8 patch grid, 16 language tokens after the 2 x 2 merge.
    """
    return Qwen2_5_VLConfig(
        vision_config={
            "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "patch_size": 4,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 16, "out_hidden_size": 96,
            "fullatt_block_indexes": [1],
        },
        text_config={
            "vocab_size": vocab_size, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4]},
            "bos_token_id": None, "eos_token_id": None,
        },
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id,
        vision_end_token_id=vision_end_token_id,
    )


def tiny_llava_onevision_config(
    vocab_size: int, image_token_id: int, video_token_id: int, image_size: int = 32, patch_size: int = 4,
    vision_layers: int = 2, text_layers: int = 2, hidden: int = 96,
) -> LlavaOnevisionConfig:
    """SigLIP tower (32 px tiles, patch 4 -> 64 features a tile, 2 layers, hidden 96) + 2-layer Qwen2.

    Pinpoints: 1 x 1, 1 x 2, 2 x 1 and 2 x 2 tiles, so a square image of ``image_size`` is the base
    view plus one tile (64 + 8 rows * (8 + 1 newline) = 136 tokens) and a larger one up to 4 tiles.
    """
    side = image_size
    return LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model", "image_size": image_size, "patch_size": patch_size,
            "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": vision_layers,
            "num_attention_heads": 4, "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "bos_token_id": None, "eos_token_id": None,
        },
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        image_grid_pinpoints=[[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
