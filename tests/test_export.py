"""LoRA export: what nb_edit trains loads into the stock diffusers pipelines and gives the same image.

Tiny hub-layout pipelines of the real classes are written with ``save_pretrained`` and loaded
back by path. The nb_edit side is the pipeline whose denoiser carries the LoRA attached by
``attach_lora`` through the nb_edit editor wrapper; the stock side is a fresh pipeline from
the same folder with ``load_lora_weights(export)``. alpha != rank in both families, so a
loader that missed the metadata would scale the adapter differently and fail the comparison.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    FluxKontextPipeline,
    FluxTransformer2DModel,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from nb_edit.core.cache import CorruptFileWarning
from nb_edit.core.validation import BadInputError
from nb_edit.methods.export import (
    CONDITION_CONFIG,
    CONDITION_WEIGHTS,
    EXPORT_INFO,
    attach_reward_condition,
    export_checkpoint,
    load_reward_condition,
    save_reward_condition,
)
from nb_edit.methods.multireward.condition import RewardCondition, RewardConditionedEditor, RewardInputs
from nb_edit.models.editors import DiTEditor, UNetEditor
from nb_edit.models.export import LORA_WEIGHT_NAME, export_lora
from nb_edit.models.lora import adapters_disabled, attach_lora, lora_parameters
from nb_edit.models.text import build_tokenizer
from nb_edit.models.tiny_configs import (
    TINY_TEXT_DIM,
    tiny_flux_config,
    tiny_unet_config,
)
from nb_edit.standins import hub_layout
from nb_edit.training.checkpoint import save_checkpoint

PROMPT = "make the red circle blue"
SIZE = 32  # pixels; the tiny VAE halves it, FLUX packs 2 x 2 latents per token
LATENT_CHANNELS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tokenizer():
    return build_tokenizer([PROMPT, "a photo of shapes", ""])


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A FluxKontextPipeline of tiny real components, written in the hub layout."""
    return hub_layout.flux_kontext(tmp_path_factory.mktemp("flux_kontext"), tokenizer=_tokenizer(),
                                   latent_channels=LATENT_CHANNELS)


@pytest.fixture(scope="module")
def ip2p_folder(tmp_path_factory):
    """A StableDiffusionInstructPix2PixPipeline of tiny real components (UNet with 8 input channels)."""
    return hub_layout.instruct_pix2pix(tmp_path_factory.mktemp("instruct_pix2pix"), tokenizer=_tokenizer(),
                                       latent_channels=LATENT_CHANNELS)


def _randomize(model, seed=1, scale=0.3):
    """Non-zero LoRA weights (B starts at zero, which would make any export look right)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(scale * torch.randn(p.shape, generator=gen))


def _source_image():
    pixels = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _uint8(images) -> np.ndarray:
    return np.round(np.asarray(images) * 255).astype(np.int16)


def _flux_image(pipe):
    return _uint8(pipe(image=_source_image(), prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=2,
                       max_sequence_length=16, _auto_resize=False, max_area=SIZE * SIZE, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images)


def _ip2p_image(pipe):
    return _uint8(pipe(PROMPT, image=_source_image(), num_inference_steps=2, guidance_scale=3.0,
                       image_guidance_scale=1.5, output_type="np", generator=torch.Generator().manual_seed(0)).images)


def _latent_inputs(pooled_dim=TINY_TEXT_DIM, seed=2):
    gen = torch.Generator().manual_seed(seed)
    shape = (1, LATENT_CHANNELS, SIZE // 2, SIZE // 2)
    return (torch.randn(shape, generator=gen), torch.tensor([0.6]), torch.randn(1, 8, TINY_TEXT_DIM, generator=gen),
            torch.randn(1, pooled_dim, generator=gen), torch.randn(shape, generator=gen))


def _metadata(file) -> dict:
    with safe_open(str(file), "pt") as handle:
        return json.loads(handle.metadata()["lora_adapter_metadata"])


@torch.no_grad()
def test_flux_kontext_pipeline_reads_exported_lora(flux_folder, tmp_path):
    ours = FluxKontextPipeline.from_pretrained(flux_folder)
    editor = DiTEditor(ours.transformer, LATENT_CHANNELS)  # the nb_edit wrapper around the pipeline's transformer
    attach_lora(editor, rank=4, alpha=8)  # scale 2: the metadata must carry it
    _randomize(editor)
    file = export_lora(editor, "dit", tmp_path)
    assert file == tmp_path / LORA_WEIGHT_NAME
    keys = load_file(file)
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert _metadata(file)["transformer.lora_alpha"] == 8 and _metadata(file)["transformer.r"] == 4

    stock = FluxKontextPipeline.from_pretrained(flux_folder)
    stock.load_lora_weights(tmp_path)
    assert stock.transformer.peft_config["default_0"].lora_alpha == 8

    x, t, text, pooled, source = _latent_inputs()
    expected = editor(x, t, text, pooled, source)
    got = DiTEditor(stock.transformer, LATENT_CHANNELS)(x, t, text, pooled, source)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    image_ours, image_stock = _flux_image(ours), _flux_image(stock)
    assert np.abs(image_ours - image_stock).max() <= 1
    with adapters_disabled(editor):
        image_base = _flux_image(ours)
    assert np.abs(image_ours - image_base).max() > 1  # the LoRA changes the image, so the match means something


@torch.no_grad()
def test_instructpix2pix_pipeline_reads_exported_lora(ip2p_folder, tmp_path):
    ours = StableDiffusionInstructPix2PixPipeline.from_pretrained(ip2p_folder)
    editor = UNetEditor(ours.unet)
    attach_lora(editor, rank=4, alpha=2)  # attention and conv_in (the reference channels), scale 0.5
    _randomize(editor)
    file = export_lora(editor, "unet", tmp_path)
    keys = load_file(file)
    assert all(k.startswith("unet.") for k in keys) and "unet.conv_in.lora_A.weight" in keys

    stock = StableDiffusionInstructPix2PixPipeline.from_pretrained(ip2p_folder)
    stock.load_lora_weights(tmp_path)

    x, t, text, pooled, source = _latent_inputs()
    torch.testing.assert_close(UNetEditor(stock.unet)(x, t, text, pooled, source),
                               editor(x, t, text, pooled, source), atol=1e-5, rtol=1e-4)
    image_ours, image_stock = _ip2p_image(ours), _ip2p_image(stock)
    assert np.abs(image_ours - image_stock).max() <= 1
    with adapters_disabled(editor):
        image_base = _ip2p_image(ours)
    assert np.abs(image_ours - image_base).max() > 1


def _checkpoint(ckpt_dir, step, model, run, ema=None):
    return save_checkpoint(ckpt_dir, step, modules={"editor": model}, state={}, ema=ema,
                           config={"loop": {}, "run": run}, stage_config=run)


def test_checkpoint_export_picks_newest_intact_and_the_trained_adapter(tmp_path):
    """NP-Edit's layout: two adapters on one base; the generator is exported, byte-equal in content
    to peft's own state dict of the live model; a corrupt newer checkpoint is skipped."""
    torch.manual_seed(0)
    editor = DiTEditor(FluxTransformer2DModel(**tiny_flux_config(LATENT_CHANNELS, patch=2)), LATENT_CHANNELS)
    attach_lora(editor, 4, adapter_name="fake")
    attach_lora(editor, 4, adapter_name="generator")
    run = {"backbone": "dit", "teacher_id": "some/teacher", "lora_rank": 4}
    ckpt_dir = tmp_path / "ckpt"
    _randomize(editor, seed=1)
    _checkpoint(ckpt_dir, 1, editor, run)
    _randomize(editor, seed=2)
    ema = {"editor": {n: 0.5 * p.detach() for n, p in editor.named_parameters() if p.requires_grad}}
    _checkpoint(ckpt_dir, 2, editor, run, ema=ema)
    live = export_lora(editor, "dit", tmp_path / "live", adapter_name="generator")
    _randomize(editor, seed=3)
    newest = _checkpoint(ckpt_dir, 3, editor, run)
    weights = newest / "weights_editor.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a bit flip that keeps the size: only the checksum finds it
    weights.write_bytes(bytes(data))

    with pytest.warns(CorruptFileWarning, match="step_00000003"):
        to = export_checkpoint(ckpt_dir, tmp_path / "export")
    exported, expected = load_file(to / LORA_WEIGHT_NAME), load_file(live)
    assert exported.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(exported[key], expected[key], atol=0, rtol=0)
    assert _metadata(to / LORA_WEIGHT_NAME) == _metadata(live)
    info = json.loads((to / EXPORT_INFO).read_text())
    assert (info["step"], info["adapter"], info["family"], info["rank"]) == (2, "generator", "dit", 4)
    assert info["pipeline"] == "FluxKontextPipeline" and not info["reward_condition"]
    assert newest.exists()  # an export reads only: nothing is moved aside

    with pytest.warns(CorruptFileWarning):
        averaged = load_file(export_checkpoint(ckpt_dir, tmp_path / "ema", use_ema=True) / LORA_WEIGHT_NAME)
    for key in expected:
        torch.testing.assert_close(averaged[key], 0.5 * expected[key])


def _unet_editor():
    torch.manual_seed(0)
    return UNetEditor(UNet2DConditionModel(**tiny_unet_config()))


def _reward(batch=1):
    gen = torch.Generator().manual_seed(5)
    return RewardInputs(torch.tensor([[4.0, 2.0, 5.0]] * batch), torch.randn(batch, TINY_TEXT_DIM, generator=gen))


@torch.no_grad()
@pytest.mark.parametrize("variant", ["reward", "score_only"])
def test_reward_condition_round_trips_beside_the_lora(tmp_path, variant):
    """Multi-Reward: the LoRA goes to diffusers' format, the condition module beside it; a fresh
    base with both loaded back computes what the trained model computed (Table 4's score-only
    run too: what the condition reads comes from the run's variant)."""
    from nb_edit.methods.multireward.train import REWARD_VARIANTS

    editor = _unet_editor()
    base_state = {k: v.clone() for k, v in editor.state_dict().items()}
    attach_lora(editor, 4, alpha=8)  # the run config says so below; the export must carry it
    _randomize(editor)
    condition = RewardCondition.for_editor(editor, TINY_TEXT_DIM, score_dim=8, hidden_dim=16, heads=2,
                                           parts=REWARD_VARIANTS[variant])
    gen = torch.Generator().manual_seed(4)
    for p in condition.parameters():  # its output layers start at zero: make them matter
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model = RewardConditionedEditor(editor, condition)
    run = {"backbone": "unet", "editor_id": "some/editor", "lora_rank": 4, "lora_alpha": 8, "heads": 2,
           "variant": variant}
    _checkpoint(tmp_path / "ckpt", 7, model, run)

    to = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    assert {LORA_WEIGHT_NAME, CONDITION_WEIGHTS, CONDITION_CONFIG, EXPORT_INFO} <= {p.name for p in to.iterdir()}
    info = json.loads((to / EXPORT_INFO).read_text())
    assert info["reward_condition"] is True and info["lora_alpha"] == 8 and info["base_in_channels"] == 6

    fresh = _unet_editor()
    fresh.load_state_dict(base_state)
    # diffusers' own loader; naming the file (not its path) makes it read the metadata, and so alpha
    fresh.backbone.load_lora_adapter(to, weight_name=LORA_WEIGHT_NAME, prefix="unet")
    restored = attach_reward_condition(fresh, to)
    x, t, text, pooled, source = _latent_inputs()
    x, source = x[:, :3], source[:, :3]  # the tiny editor works on pixels (3 channels)
    expected = model(x, t, text, pooled, source, reward=_reward())
    torch.testing.assert_close(restored(x, t, text, pooled, source, reward=_reward()), expected, atol=1e-5, rtol=1e-4)
    assert (expected - editor(x, t, text, pooled, source)).abs().max() > 1e-3  # the condition matters

    save_reward_condition(restored.condition, tmp_path / "again")  # the module-level save gives the same tensors
    again = load_reward_condition(tmp_path / "again").state_dict()
    for key, value in condition.state_dict().items():
        torch.testing.assert_close(again[key], value, atol=0, rtol=0)


@pytest.mark.bad_input
def test_export_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(BadInputError, match="no complete checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "out")
    editor = _unet_editor()
    with pytest.raises(BadInputError, match="no LoRA adapter"):
        export_lora(editor, "unet", tmp_path / "out")
    with pytest.raises(BadInputError, match="lora_rank=0"):  # full fine-tuning: no LoRA tensors
        export_lora({k: v for k, v in editor.named_parameters()}, "auto", tmp_path / "out")
    attach_lora(editor, 2)
    with pytest.raises(BadInputError, match="pass family='unet'"):
        export_lora(editor, "dit", tmp_path / "out")
    condition = RewardCondition(TINY_TEXT_DIM, 64, 48, score_dim=8, hidden_dim=16, heads=2)  # another editor's sizes
    save_reward_condition(condition, tmp_path / "cond")
    with pytest.raises(BadInputError, match="another editor"):
        attach_reward_condition(editor, tmp_path / "cond")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean export warns about nothing
        export_lora(editor, "auto", tmp_path / "ok")
