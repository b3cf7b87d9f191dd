"""The VLM judge and its differentiable preprocessing, on tiny LLaVA and Qwen2.5-VL models.

Tolerances:
- preprocessing vs the transformers processors: max |diff| <= 0.02 and mean |diff| <= 0.01 in
  normalised units. The processors resize uint8 images with PIL, rounding to whole grey levels
  after each of PIL's two passes; one grey level is 1 / 255 / std ~= 0.015 for CLIP's std.
- prefix (KV cache) reuse vs the plain forward, and yes_no_logits vs yes_no_logits_multi:
  atol 1e-5 on fp32 logits (only the summation order differs).
- save -> load round trip: atol 1e-6 (the same fp32 weights).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, Qwen2VLImageProcessorPil

from nb_edit.models.text import build_tokenizer
from nb_edit.models.vlm.judge import _FAMILIES, TEMPLATE_WORDS, VLMJudge, _bnb_config, _family_of, single_token_id
from nb_edit.models.vlm.parsing import parse_score
from nb_edit.models.vlm.preprocess import ClipPreprocess, QwenVLPreprocess

torch.set_num_threads(1)

QUESTIONS = ["is the square red ?", "did image 2 carry out the instruction ? answer yes or no .", "same ?"]
FAMILIES = ["llava", "qwen2_5_vl"]
PREPROCESS_ATOL, PREPROCESS_MEAN_ATOL = 0.02, 0.01
REUSE_ATOL = 1e-5


def _tokenizer():
    words = " ".join(TEMPLATE_WORDS) + " " + " ".join(QUESTIONS) + " image 1 2 edit"
    return build_tokenizer([words])


@pytest.fixture(scope="module")
def judges() -> dict[str, VLMJudge]:
    return {family: VLMJudge.tiny(family, _tokenizer(), seed=0).freeze() for family in FAMILIES}


def _images(batch: int, seed: int, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 1.8 - 0.9


def _test_pictures() -> list[np.ndarray]:
    """Noise (worst case for bicubic ringing) and a smooth picture with one sharp wrap-around edge."""
    rng = np.random.default_rng(0)
    pictures = []
    for height, width in [(40, 48), (24, 20), (100, 64), (32, 32)]:
        pictures.append((rng.random((height, width, 3)) * 255).astype(np.uint8))
        yy, xx = np.mgrid[0:height, 0:width]
        smooth = np.stack([127 + 120 * np.sin(xx / 5), 127 + 120 * np.cos(yy / 7), (3 * xx + yy) % 256], -1)
        pictures.append(smooth.astype(np.uint8))
    return pictures


def _as_tensor(picture: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 127.5 - 1


def _assert_close_to_processor(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    diff = (ours - reference).abs()
    assert diff.max().item() <= PREPROCESS_ATOL, diff.max().item()
    assert diff.mean().item() <= PREPROCESS_MEAN_ATOL, diff.mean().item()


# ------------------------------------------------------------------------------ preprocessing
def test_clip_preprocess_matches_clip_image_processor():
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    preprocess = ClipPreprocess.from_image_processor(processor)
    for picture in _test_pictures():
        reference = processor(picture, return_tensors="pt")["pixel_values"]
        _assert_close_to_processor(preprocess(_as_tensor(picture)), reference)


def test_clip_preprocess_matches_llava_processor_padding_to_square():
    processor = LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    preprocess = ClipPreprocess.from_image_processor(processor)
    assert preprocess.pad_to_square
    for picture in _test_pictures()[:6]:  # landscape and portrait
        reference = processor(picture, return_tensors="pt")["pixel_values"]
        _assert_close_to_processor(preprocess(_as_tensor(picture)), reference)


def test_clip_preprocess_accepts_unit_range_inputs():
    processor = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 20})
    preprocess = ClipPreprocess.from_image_processor(processor)
    picture = _test_pictures()[1]
    reference = processor(picture, return_tensors="pt")["pixel_values"]
    unit = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255
    _assert_close_to_processor(preprocess(unit, input_range=(0.0, 1.0)), reference)


def test_qwen_preprocess_matches_qwen2vl_image_processor():
    processor = Qwen2VLImageProcessorPil(min_pixels=256, max_pixels=48 * 48, patch_size=4, merge_size=2)
    preprocess = QwenVLPreprocess.from_image_processor(processor)
    for picture in _test_pictures():
        reference = processor(picture, return_tensors="pt")
        pixel_values, grid_thw = preprocess(_as_tensor(picture))
        assert torch.equal(grid_thw, reference["image_grid_thw"])
        _assert_close_to_processor(pixel_values, reference["pixel_values"])
        height, width = picture.shape[:2]
        assert preprocess.tokens_per_image(height, width) == int(grid_thw.prod()) // 4


@pytest.mark.parametrize("which", ["clip", "qwen"])
def test_preprocess_gradient_reaches_every_pixel(which):
    images = _images(2, seed=1, size=40).requires_grad_()
    if which == "clip":
        processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        out = ClipPreprocess.from_image_processor(processor)(images)
    else:
        processor = Qwen2VLImageProcessorPil(min_pixels=256, max_pixels=32 * 32, patch_size=4, merge_size=2)
        out, _ = QwenVLPreprocess.from_image_processor(processor)(images)
    (out * torch.randn_like(out)).sum().backward()
    grad = images.grad
    assert torch.isfinite(grad).all()
    # 40 px -> 32 px: every source pixel lies under the resize kernel of some kept output pixel
    # (CLIP resizes the short side to 32, so nothing is cropped away for a square input).
    assert (grad.abs() > 0).float().mean() > 0.99


def test_preprocess_rejects_bad_images():
    preprocess = ClipPreprocess.from_image_processor(CLIPImageProcessorPil())
    with pytest.raises(ValueError, match="floating point"):
        preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        preprocess(torch.zeros(8, 8, 3))


# ------------------------------------------------------------------------------ prompts
def test_image_tokens_match_each_family(judges):
    llava, qwen = judges["llava"], judges["qwen2_5_vl"]
    _, counts, _ = llava._vision_inputs([_images(1, 0)])
    assert counts == [(32 // 4) ** 2]  # one token per patch, CLS dropped ("default")
    _, counts, _ = qwen._vision_inputs([_images(1, 0), _images(1, 1)])
    assert counts == [(32 // 4) ** 2 // 2**2] * 2  # grid_h * grid_w / merge^2
    ids, prefix = qwen.prompt_ids("same ?", counts)
    assert ids.count(qwen.image_token_id) == 32
    assert ids[prefix - 1] == qwen.vision_end_token_id
    other_ids, other_prefix = qwen.prompt_ids("is the square red ?", counts)
    assert other_prefix == prefix and other_ids[:prefix] == ids[:prefix]  # the question is not in the prefix
    assert other_ids[prefix:] != ids[prefix:]


def test_chat_template_is_used_when_present():
    judge = VLMJudge.tiny("llava", _tokenizer())
    judge.tokenizer.chat_template = (
        "{% for m in messages %}{{ m.role }} :{% for c in m.content %}"
        "{% if c.type == 'image' %} <image>{% else %} {{ c.text }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} assistant :{% endif %}"
    )
    text = judge.prompt_text("same ?", 2)
    assert text == "user : <image> <image> same ? assistant :"
    ids, prefix = judge.prompt_ids("same ?", [64, 64])
    assert ids.count(judge.image_token_id) == 128 and ids[prefix - 1] == judge.image_token_id
    yes, no = judge.yes_no_logits([_images(2, 0), _images(2, 1)], ["same ?"] * 2)
    assert yes.shape == no.shape == (2,)


# ------------------------------------------------------------------------------ yes / no
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_images", [1, 2])
def test_yes_no_logits_shape_and_gradient_to_pixels(judges, family, n_images):
    judge = judges[family]
    images = [_images(3, seed=k).requires_grad_() for k in range(n_images)]
    yes, no = judge.yes_no_logits(images, QUESTIONS)
    assert yes.shape == no.shape == (3,)
    assert torch.isfinite(yes).all() and torch.isfinite(no).all()
    assert not torch.equal(yes, no)
    loss = -torch.nn.functional.logsigmoid(yes - no).sum()
    loss.backward()
    for image in images:
        assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in judge.model.parameters())  # frozen judge


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_depend_on_the_images_and_the_question(judges, family):
    judge = judges[family]
    source = _images(1, seed=0)
    yes_a, _ = judge.yes_no_logits([source, _images(1, seed=1)], ["same ?"])
    yes_b, _ = judge.yes_no_logits([source, _images(1, seed=2)], ["same ?"])
    yes_c, _ = judge.yes_no_logits([source, _images(1, seed=1)], ["is the square red ?"])
    assert not torch.allclose(yes_a, yes_b) and not torch.allclose(yes_a, yes_c)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_rows_equal_one_sample_at_a_time(judges, family):
    """Images are matched to the right sample and slot, and padding does not leak into answers."""
    judge = judges[family]
    source, edited = _images(3, seed=11), _images(3, seed=12)
    yes, no = judge.yes_no_logits([source, edited], QUESTIONS)
    for b in range(3):
        yes_b, no_b = judge.yes_no_logits([source[b : b + 1], edited[b : b + 1]], [QUESTIONS[b]])
        torch.testing.assert_close(yes_b, yes[b : b + 1], atol=REUSE_ATOL, rtol=0)
        torch.testing.assert_close(no_b, no[b : b + 1], atol=REUSE_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_reuse_equals_plain_forward(judges, family):
    judge = judges[family]
    images = [_images(2, seed=3).requires_grad_(), _images(2, seed=4).requires_grad_()]
    questions = [QUESTIONS, QUESTIONS[::-1]]  # per sample, different lengths
    calls = []
    original = judge._prefix_reuse_logits
    judge._prefix_reuse_logits = lambda *args: calls.append(1) or original(*args)
    try:
        yes_reused, no_reused = judge.yes_no_logits_multi(images, questions, reuse_prefix=True)
    finally:
        del judge._prefix_reuse_logits
    assert calls == [1]  # the cached path really ran
    yes_plain, no_plain = judge.yes_no_logits_multi(images, questions, reuse_prefix=False)
    assert yes_reused.shape == (2, 3)
    torch.testing.assert_close(yes_reused, yes_plain, atol=REUSE_ATOL, rtol=0)
    torch.testing.assert_close(no_reused, no_plain, atol=REUSE_ATOL, rtol=0)
    (yes_reused - no_reused).sum().backward()
    assert all(image.grad.abs().sum() > 0 for image in images)
    # Single-question calls agree with the multi-question rows.
    yes_single, _ = judge.yes_no_logits(images, [questions[0][1], questions[1][1]])
    torch.testing.assert_close(yes_single, yes_plain[:, 1], atol=REUSE_ATOL, rtol=0)


# ------------------------------------------------------------------------------ scores
@pytest.mark.parametrize("family", FAMILIES)
def test_expected_score_in_range_and_differentiable(judges, family):
    judge = judges[family]
    edited = _images(3, seed=5).requires_grad_()
    score = judge.expected_score([_images(3, seed=6), edited], QUESTIONS)
    assert score.shape == (3,)
    assert ((score >= 0) & (score <= 5)).all()
    score.sum().backward()
    assert edited.grad.abs().sum() > 0
    one_to_five = judge.expected_score([edited.detach()], QUESTIONS, values=range(1, 6))
    assert ((one_to_five >= 1) & (one_to_five <= 5)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_score_reports_failures_as_nan(judges, family):
    judge = judges[family]
    images = [_images(4, seed=7), _images(4, seed=8)]
    scores, texts, n_failures = judge.generate_score(images, [QUESTIONS[0]] * 4, max_new_tokens=4)
    assert scores.shape == (4,) and len(texts) == 4
    parsed = [parse_score(text, 0, 5) for text in texts]
    assert n_failures == sum(p is None for p in parsed) == int(torch.isnan(scores).sum())
    for value, p in zip(scores.tolist(), parsed):
        assert (math.isnan(value) and p is None) or value == p
    # A parser that reads nothing: every answer is a failure, none becomes a zero.
    scores, _, n_failures = judge.generate_score(images, [QUESTIONS[0]] * 4, max_new_tokens=2,
                                                 parser=lambda text: None)
    assert n_failures == 4 and torch.isnan(scores).all()
    scores, _, n_failures = judge.generate_score(images, [QUESTIONS[0]] * 4, max_new_tokens=2,
                                                 parser=lambda text: 3.0)
    assert n_failures == 0 and torch.equal(scores, torch.full((4,), 3.0))


# ------------------------------------------------------------------------------ persistence
@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip_gives_same_logits(judges, family, tmp_path):
    judge = judges[family]
    images = [_images(2, seed=9), _images(2, seed=10)]
    yes, no = judge.yes_no_logits(images, QUESTIONS[:2])
    judge.save_pretrained(tmp_path)
    loaded = VLMJudge.from_pretrained(tmp_path, device="cpu", dtype="fp32").freeze()
    assert type(loaded.model) is type(judge.model)
    yes_loaded, no_loaded = loaded.yes_no_logits(images, QUESTIONS[:2])
    torch.testing.assert_close(yes_loaded, yes, atol=1e-6, rtol=0)
    torch.testing.assert_close(no_loaded, no, atol=1e-6, rtol=0)


@pytest.mark.parametrize("quantization, atol", [("8bit", 0.05), ("4bit", 0.25)])
def test_quantized_load_keeps_vision_precise_and_pixels_differentiable(judges, tmp_path, quantization, atol):
    """bitsandbytes on CPU: the language model quantised, the vision tower not; atol is loose
    because a randomly initialised tiny model has no outlier structure for NF4 / int8 to keep."""
    judge = judges["llava"]
    images = [_images(2, seed=13), _images(2, seed=14)]
    yes, _ = judge.yes_no_logits(images, QUESTIONS[:2])
    judge.save_pretrained(tmp_path)
    loaded = VLMJudge.from_pretrained(tmp_path, quantization=quantization, device="cpu", dtype="fp32").freeze()
    language_linear = loaded.model.model.language_model.layers[0].mlp.down_proj
    vision_linear = loaded.model.model.vision_tower.encoder.layers[0].mlp.fc1
    assert type(language_linear) is not torch.nn.Linear and type(vision_linear) is torch.nn.Linear
    edited = images[1].clone().requires_grad_()
    yes_q, no_q = loaded.yes_no_logits([images[0], edited], QUESTIONS[:2])
    torch.testing.assert_close(yes_q, yes, atol=atol, rtol=0)
    (yes_q - no_q).sum().backward()
    assert edited.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ errors
def test_clear_errors_on_bad_input(judges):
    judge = judges["llava"]
    with pytest.raises(ValueError, match="one entry per sample"):
        judge.yes_no_logits([_images(2, 0)], ["same ?"])
    with pytest.raises(ValueError, match="same B"):
        judge.yes_no_logits([_images(2, 0), _images(3, 1)], ["same ?"] * 2)
    with pytest.raises(ValueError, match="tokenizer .* has no single token for .Yes."):
        single_token_id(build_tokenizer(["only some words"]), "Yes")
    with pytest.raises(ValueError, match="quantization"):
        _bnb_config("3bit", torch.float32, _FAMILIES["llava"])
    with pytest.raises(ValueError, match="model_type"):
        _family_of(type("Config", (), {"model_type": "bert"})())
