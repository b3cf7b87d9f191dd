"""The LLaVA-OneVision judge family on a tiny random model (SigLIP tower, Qwen2 language model).

What is checked against transformers' own path (``LlavaOnevisionImageProcessorPil`` and
``LlavaOnevisionProcessor`` feeding ``LlavaOnevisionForConditionalGeneration``):
- ``pixel_values`` and ``image_sizes``, for an image alone in its prompt (anyres tiles) and for
  each image of a two-image prompt (one padded view);
- the prompt's token ids, image tokens included, and the answer logits.

Tolerances (normalised units; one grey level is 1 / 255 / std ~= 0.015 for CLIP's std):
- square images: max |diff| <= 0.02, mean <= 0.01, as for the other families; at the judge's
  working size (32 px, tiles of 32 px) nothing is resized and the match is exact (<= 1e-6).
- non-square images: max |diff| <= 0.07, mean <= 0.01. The base view squashes the image to a
  square; at a sharp edge with a large downscale (100 x 64 -> 32 x 32) Pillow 13 does not
  always run its two resampling passes in the order the torch path does (horizontal first),
  and the clipped bicubic overshoot moves by up to ~4 grey levels on a few pixels.
- answer logits vs the transformers path: 1e-5 at the working size, 5e-3 otherwise (the pixel
  differences above, through a random model).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

from nb_edit.models.text import build_tokenizer
from nb_edit.models.vlm.judge import _FAMILIES, TEMPLATE_WORDS, VLMJudge, _bnb_config, _family_of
from nb_edit.models.vlm.preprocess import OneVisionPreprocess

torch.set_num_threads(1)

QUESTIONS = ["is the square red ?", "did image 2 carry out the instruction ? answer yes or no .", "same ?"]
SIDE = 32  # the tiny judge's working size and tile side
PINPOINTS = [[SIDE, SIDE], [SIDE, 2 * SIDE], [2 * SIDE, SIDE], [2 * SIDE, 2 * SIDE]]
SQUARE_ATOL, NON_SQUARE_ATOL, MEAN_ATOL = 0.02, 0.07, 0.01
REUSE_ATOL = 1e-5
# (H, W): the working size, a 2 x 2-tile square, landscape, portrait, tall and very wide.
SHAPES = [(32, 32), (64, 64), (40, 48), (24, 20), (100, 64), (17, 90)]


def _tokenizer():
    return build_tokenizer([" ".join(TEMPLATE_WORDS) + " " + " ".join(QUESTIONS) + " image 1 2 edit"])


@pytest.fixture(scope="module")
def judge() -> VLMJudge:
    return VLMJudge.tiny("llava_onevision", _tokenizer(), image_size=SIDE, seed=0).freeze()


def _images(batch: int, seed: int, height: int = SIDE, width: int = SIDE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 1.8 - 0.9


def _pictures(height: int, width: int) -> list[np.ndarray]:
    """Noise (worst case for bicubic ringing) and a smooth picture with one sharp wrap-around edge."""
    rng = np.random.default_rng(height * 1000 + width)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([127 + 120 * np.sin(xx / 5), 127 + 120 * np.cos(yy / 7), (3 * xx + yy) % 256], -1)
    return [(rng.random((height, width, 3)) * 255).astype(np.uint8), smooth.astype(np.uint8)]


def _as_tensor(picture: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 127.5 - 1


def _hf_processor(judge: VLMJudge, monkeypatch) -> LlavaOnevisionProcessor:
    # transformers 5.23 type-checks every processor part, the absent video processor included, and
    # that check needs torchvision (not installed here); the parts given are the right classes.
    monkeypatch.setattr(LlavaOnevisionProcessor, "check_argument_for_proper_class", lambda self, name, arg: None)
    config = judge.model.config
    return LlavaOnevisionProcessor(
        image_processor=judge.image_processor,
        tokenizer=judge.tokenizer,
        num_image_tokens=(config.vision_config.image_size // config.vision_config.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )


# ------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("tiles", [True, False], ids=["alone-anyres", "multi-image"])
def test_preprocess_matches_the_hf_image_processor(tiles):
    processor = LlavaOnevisionImageProcessorPil(size={"height": SIDE, "width": SIDE}, image_grid_pinpoints=PINPOINTS)
    preprocess = OneVisionPreprocess.from_image_processor(processor)
    for height, width in SHAPES:
        for picture in _pictures(height, width):
            # The processor tiles an image only when it is alone in its prompt.
            reference = processor(picture if tiles else [[picture, picture]], return_tensors="pt")
            pixel_values, image_sizes = preprocess(_as_tensor(picture), tiles=tiles)
            expected = reference["pixel_values"] if tiles else reference["pixel_values"][:1]
            assert pixel_values.shape == expected.shape, (height, width)
            assert torch.equal(image_sizes, reference["image_sizes"][:1])
            diff = (pixel_values - expected).abs()
            atol = 1e-6 if (height, width) == (SIDE, SIDE) else SQUARE_ATOL if height == width else NON_SQUARE_ATOL
            assert diff.max().item() <= atol, ((height, width), diff.max().item())
            assert diff.mean().item() <= MEAN_ATOL, ((height, width), diff.mean().item())


def test_preprocess_tiles_for_the_working_size_and_larger_images():
    preprocess = OneVisionPreprocess.from_image_processor(
        LlavaOnevisionImageProcessorPil(size={"height": SIDE, "width": SIDE}, image_grid_pinpoints=PINPOINTS)
    )
    assert preprocess.tile_grid(SIDE, SIDE) == (1, 1)  # base view + one tile
    assert preprocess.tile_grid(2 * SIDE, 2 * SIDE) == (2, 2)
    assert preprocess.tile_grid(SIDE, 3 * SIDE) == (1, 2)
    pixel_values, image_sizes = preprocess(_images(2, 0, 40, 48))
    assert pixel_values.shape == (2, 5, 3, SIDE, SIDE) and image_sizes.tolist() == [[40, 48]] * 2


@pytest.mark.parametrize("tiles", [True, False])
def test_preprocess_gradient_reaches_every_pixel(tiles):
    processor = LlavaOnevisionImageProcessorPil(size={"height": SIDE, "width": SIDE}, image_grid_pinpoints=PINPOINTS)
    images = _images(2, seed=1, height=40, width=48).requires_grad_()
    pixel_values, _ = OneVisionPreprocess.from_image_processor(processor)(images, tiles=tiles)
    (pixel_values * torch.randn_like(pixel_values)).sum().backward()
    assert torch.isfinite(images.grad).all()
    assert (images.grad.abs() > 0).float().mean() > 0.99  # the base view alone covers every pixel


def test_preprocess_refuses_what_it_does_not_reproduce():
    with pytest.raises(ValueError, match="not square"):
        OneVisionPreprocess.from_image_processor(
            LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 48}, image_grid_pinpoints=PINPOINTS)
        )
    with pytest.raises(ValueError, match="multiples of the tile side"):
        OneVisionPreprocess.from_image_processor(
            LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 48]])
        )


# ------------------------------------------------------------------------------ against transformers
@pytest.mark.parametrize("shapes", [[(32, 32)], [(32, 32), (32, 32)], [(40, 48)], [(100, 64)], [(40, 48), (24, 20)]])
def test_prompt_and_logits_match_the_hf_processor(judge, monkeypatch, shapes):
    """Same token ids (image tokens included) as LlavaOnevisionProcessor, same answer logits as the
    model fed by it."""
    processor = _hf_processor(judge, monkeypatch)
    pictures = [_pictures(h, w)[0] for h, w in shapes]
    question = QUESTIONS[2]
    # The judge's plain template adds a begin token and no end token (the answer position is last).
    hf = processor(
        text=[judge.prompt_text(question, len(pictures))],
        images=[pictures] if len(pictures) > 1 else pictures,
        add_special_tokens=False,
        return_tensors="pt",
    )
    hf_ids = [judge.tokenizer.bos_token_id] + hf["input_ids"][0].tolist()
    tensors = [_as_tensor(p) for p in pictures]
    _, counts, _ = judge._vision_inputs(tensors)
    ids, _ = judge.prompt_ids(question, counts)
    assert ids.count(judge.image_token_id) == hf_ids.count(judge.image_token_id) == sum(counts)
    assert ids == hf_ids
    with torch.no_grad():
        reference = judge.model(
            input_ids=torch.tensor([hf_ids]), pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"],
            batch_num_images=hf["batch_num_images"],
        ).logits[0, -1]
        ours = judge.answer_logits(tensors, [question])[0, 0]
    atol = 1e-5 if all(shape == (SIDE, SIDE) for shape in shapes) else 5e-3
    torch.testing.assert_close(ours, reference, atol=atol, rtol=0)


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
def test_token_counts_are_what_the_model_packs(aspect):
    """Counted image tokens equal the features LlavaOnevisionModel packs, also when it shrinks a
    tile map larger than ``anyres_max_N`` tiles (N = 1 shrinks every multi-tile image here)."""
    judge = VLMJudge.tiny("llava_onevision", _tokenizer(), image_size=SIDE).freeze()
    judge.model.config.vision_aspect_ratio = aspect
    for shapes in [[(32, 32)], [(64, 64)], [(100, 64)], [(17, 90)], [(40, 48), (24, 20)]]:
        vision, counts, _ = judge._vision_inputs([_images(1, k, h, w) for k, (h, w) in enumerate(shapes)])
        with torch.no_grad():
            packed = judge.model.model.get_image_features(**vision).pooler_output
        assert [len(features) for features in packed] == counts, shapes


# ------------------------------------------------------------------------------ readouts
@pytest.mark.parametrize("n_images", [1, 2])
def test_yes_no_logits_are_finite_and_differentiable_to_pixels(judge, n_images):
    images = [_images(3, seed=k).requires_grad_() for k in range(n_images)]
    yes, no = judge.yes_no_logits(images, QUESTIONS)
    assert yes.shape == no.shape == (3,)
    assert torch.isfinite(yes).all() and torch.isfinite(no).all() and not torch.equal(yes, no)
    (-torch.nn.functional.logsigmoid(yes - no).sum()).backward()  # NP-Edit's yes/no loss
    for image in images:
        assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in judge.model.parameters())  # frozen judge


@pytest.mark.parametrize("n_images", [1, 2])
def test_batching_and_prefix_reuse_agree_with_one_row_at_a_time(judge, n_images):
    images = [_images(2, seed=20 + k) for k in range(n_images)]
    questions = [QUESTIONS, QUESTIONS[::-1]]
    yes_reused, no_reused = judge.yes_no_logits_multi(images, questions, reuse_prefix=True)
    yes_plain, no_plain = judge.yes_no_logits_multi(images, questions, reuse_prefix=False)
    torch.testing.assert_close(yes_reused, yes_plain, atol=REUSE_ATOL, rtol=0)
    torch.testing.assert_close(no_reused, no_plain, atol=REUSE_ATOL, rtol=0)
    for b in range(2):
        yes_b, _ = judge.yes_no_logits([image[b : b + 1] for image in images], [questions[b][1]])
        torch.testing.assert_close(yes_b, yes_plain[b : b + 1, 1], atol=REUSE_ATOL, rtol=0)


def test_digit_scores(judge):
    edited = _images(3, seed=5).requires_grad_()
    score = judge.expected_score([_images(3, seed=6), edited], QUESTIONS)
    assert score.shape == (3,) and ((score >= 0) & (score <= 5)).all()
    score.sum().backward()
    assert edited.grad.abs().sum() > 0
    scores, texts, n_failures = judge.generate_score([_images(2, 7), _images(2, 8)], QUESTIONS[:2], max_new_tokens=3)
    assert scores.shape == (2,) and len(texts) == 2 and n_failures == int(torch.isnan(scores).sum())


# ------------------------------------------------------------------------------ loading
def test_family_is_recognised_and_round_trips_through_from_pretrained(judge, tmp_path):
    assert _family_of(judge.model.config) is _FAMILIES["llava_onevision"]
    images = [_images(2, seed=9), _images(2, seed=10)]
    yes, no = judge.yes_no_logits(images, QUESTIONS[:2])
    judge.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = VLMJudge.from_pretrained(tmp_path, device="cpu", dtype="fp32").freeze()
    assert type(loaded.model) is type(judge.model)
    assert isinstance(loaded.preprocess, OneVisionPreprocess) and loaded.preprocess == judge.preprocess
    yes_loaded, no_loaded = loaded.yes_no_logits(images, QUESTIONS[:2])
    torch.testing.assert_close(yes_loaded, yes, atol=1e-6, rtol=0)
    torch.testing.assert_close(no_loaded, no, atol=1e-6, rtol=0)
    edited = images[1].clone().requires_grad_()
    yes_loaded, _ = loaded.yes_no_logits([edited], QUESTIONS[:2])
    yes_loaded.sum().backward()
    assert edited.grad.abs().sum() > 0


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_config_keeps_the_vision_side_in_dtype(judge, quantization):
    config = _bnb_config(quantization, torch.bfloat16, _FAMILIES["llava_onevision"])
    assert getattr(config, f"load_in_{quantization}")
    assert config.quantization_method() == ("nf4" if quantization == "4bit" else "llm_int8")
    skipped = config.llm_int8_skip_modules
    assert set(skipped) == {"model.vision_tower", "model.multi_modal_projector", "lm_head"}
    names = {name for name, _ in judge.model.named_modules()}
    assert all(prefix in names for prefix in skipped)  # each prefix names a real module of this family


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_quantized_load_keeps_vision_precise_and_pixels_differentiable(judge, tmp_path):
    """bitsandbytes' CPU path, as for the LLaVA family in test_judge.py (4-bit; atol loose because
    a random tiny model has no outlier structure for NF4 to keep)."""
    images = [_images(2, seed=13), _images(2, seed=14)]
    yes, _ = judge.yes_no_logits(images, QUESTIONS[:2])
    judge.save_pretrained(tmp_path)
    loaded = VLMJudge.from_pretrained(tmp_path, quantization="4bit", device="cpu", dtype="fp32").freeze()
    language_linear = loaded.model.model.language_model.layers[0].mlp.down_proj
    vision_linear = loaded.model.model.vision_tower.encoder.layers[0].mlp.fc1
    projector_linear = loaded.model.model.multi_modal_projector.linear_1
    assert type(language_linear) is not torch.nn.Linear
    assert type(vision_linear) is torch.nn.Linear and type(projector_linear) is torch.nn.Linear
    assert loaded.model.model.image_newline.dtype == torch.float32
    edited = images[1].clone().requires_grad_()
    yes_q, no_q = loaded.yes_no_logits([images[0], edited], QUESTIONS[:2])
    torch.testing.assert_close(yes_q, yes, atol=0.25, rtol=0)
    (yes_q - no_q).sum().backward()
    assert edited.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ errors
def test_judge_refuses_a_config_the_preprocessing_disagrees_with():
    judge = VLMJudge.tiny("llava_onevision", _tokenizer(), image_size=SIDE)
    judge.model.config.image_grid_pinpoints = [[SIDE, SIDE]]
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        VLMJudge(judge.model, judge.tokenizer, judge.image_processor)
    judge.model.config.image_grid_pinpoints = PINPOINTS
    judge.model.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="'full'"):
        VLMJudge(judge.model, judge.tokenizer, judge.image_processor)
    judge.model.config.vision_feature_select_strategy = "full"
    judge.model.config.vision_aspect_ratio = "pad"
    with pytest.raises(ValueError, match="anyres_max_N"):
        VLMJudge(judge.model, judge.tokenizer, judge.image_processor)
    with pytest.raises(ValueError, match="no tiny judge"):
        VLMJudge.tiny("llava_next", _tokenizer())
