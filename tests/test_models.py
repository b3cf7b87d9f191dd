"""Editors, teacher, text encoder, autoencoders, LoRA sharing and loaders on tiny models (CPU, 32 px)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import PreTrainedTokenizerFast

from nb_edit.models.autoencoders import KLAutoencoder, PixelAutoencoder
from nb_edit.models.editors import DiTEditor, UNetEditor, build_editor, editor_from_teacher
from nb_edit.models.loaders import (
    load_autoencoder,
    load_editor,
    load_teacher,
    load_text_encoder,
    resolve_backbone,
    save_components,
)
from nb_edit.models.lora import (
    active_adapter,
    adapter_names,
    adapters_disabled,
    attach_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merged_copy,
)
from nb_edit.models.text import NULL_TEXT, build_tiny_text_encoder, build_tokenizer
from nb_edit.models.tiny_configs import TINY_MAX_TEXT_LENGTH, tiny_flux_config, tiny_unet_config, tiny_vae_config

torch.set_num_threads(1)
TEXTS = ["Make the red circle blue.", "a blue square on a green background", "remove the triangle"]
B, C, H = 2, 3, 32


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def text_encoder(tokenizer):
    torch.manual_seed(0)
    return build_tiny_text_encoder(tokenizer)


@pytest.fixture(scope="module")
def text(text_encoder):
    with torch.no_grad():
        states, pooled, _ = text_encoder.encode(TEXTS[:B])
    return states, pooled


def _teacher(backbone: str):
    torch.manual_seed(0)
    config = tiny_unet_config(with_reference=False) if backbone == "unet" else tiny_flux_config()
    return build_editor(backbone, config)


def _inputs(seed=0, channels=C, size=H):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, channels, size, size, generator=g), torch.rand(B, generator=g),
            torch.randn(B, channels, size, size, generator=g))


# ---------------------------------------------------------------- tokenizer and text encoder

def test_tokenizer_words_padding_and_round_trip(tokenizer, tmp_path):
    ids = tokenizer(["MAKE the red circle blue!"], padding="max_length", truncation=True)["input_ids"][0]
    vocab = tokenizer.get_vocab()
    assert len(ids) == TINY_MAX_TEXT_LENGTH == tokenizer.model_max_length
    expected = [vocab[w] for w in ["[BOS]", "make", "the", "red", "circle", "blue"]] + [vocab["[UNK]"], vocab["[EOS]"]]
    assert ids[:8] == expected  # lower-cased, "!" unseen -> [UNK], punctuation split off
    assert set(ids[8:]) == {tokenizer.pad_token_id} and tokenizer.padding_side == "right"
    assert tokenizer.eos_token_id != 2  # CLIP's legacy pooling rule would otherwise apply
    assert "." in vocab and "make." not in vocab

    tokenizer.save_pretrained(str(tmp_path))
    reloaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for text in [*TEXTS, NULL_TEXT, "a never seen word"]:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.model_max_length == tokenizer.model_max_length and reloaded.padding_side == "right"
    with pytest.raises(TypeError, match="list of strings"):
        build_tokenizer("a single string")


def test_text_encoder_shapes_and_null_text(text_encoder):
    states, pooled, mask = text_encoder.encode([TEXTS[0], NULL_TEXT])
    assert states.shape == (2, TINY_MAX_TEXT_LENGTH, text_encoder.hidden_dim)
    assert pooled.shape == (2, text_encoder.pooled_dim)
    assert mask[1].sum() == 2 and mask[0].sum() > 2  # the null text is [BOS] [EOS]
    assert not torch.allclose(pooled[0], pooled[1])
    with pytest.raises(TypeError, match="list of strings"):
        text_encoder.encode(TEXTS[0])


# ---------------------------------------------------------------- editors

@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_editor_and_teacher_shapes_and_gradients(backbone, text):
    states, pooled = text
    teacher = _teacher(backbone)
    editor = editor_from_teacher(teacher)
    x_t, t, source = _inputs()
    x_t.requires_grad_(True)
    source.requires_grad_(True)
    assert teacher(x_t, t, states, pooled).shape == (B, C, H, H)
    velocity = editor(x_t, t, states, pooled, source)
    assert velocity.shape == (B, C, H, H)
    velocity.square().mean().backward()
    assert x_t.grad.abs().sum() > 0
    grads = [p.grad for p in editor.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    if backbone == "dit":  # reference tokens enter attention; UNet's reference weights start at zero
        assert source.grad.abs().sum() > 0


def test_unet_editor_equals_teacher_at_init(text):
    states, pooled = text
    teacher = _teacher("unet")
    editor = editor_from_teacher(teacher)
    assert editor.takes_reference and not teacher.takes_reference
    assert editor.backbone.conv_in.weight.shape[1] == 2 * C
    x_t, t, source = _inputs()
    with torch.no_grad():
        v_teacher = teacher(x_t, t, states, pooled)
        assert torch.allclose(editor(x_t, t, states, pooled, source), v_teacher, atol=1e-6)
        assert torch.allclose(editor(x_t, t, states, pooled), v_teacher, atol=1e-6)  # zero reference
        editor.backbone.conv_in.weight[:, C:] = 0.1  # once the reference weights move, the source matters
        assert not torch.allclose(editor(x_t, t, states, pooled, source), v_teacher, atol=1e-3)


def test_dit_editor_copies_teacher_and_uses_reference_tokens(text):
    states, pooled = text
    teacher = _teacher("dit")
    editor = editor_from_teacher(teacher)
    for (name, p), q in zip(teacher.named_parameters(), editor.parameters()):
        assert torch.equal(p, q), name
    x_t, t, source = _inputs()
    _, _, other_source = _inputs(seed=1)
    with torch.no_grad():
        v_teacher = teacher(x_t, t, states, pooled)
        assert torch.equal(editor(x_t, t, states, pooled), v_teacher)
        v_edit = editor(x_t, t, states, pooled, source)
        assert not torch.allclose(v_edit, editor(x_t, t, states, pooled, other_source))
    ids = editor._positions(H, H, 1, "cpu")
    assert ids.shape == ((H // editor.patch) ** 2, 3) and torch.all(ids[:, 0] == 1)
    latents = torch.randn(B, C, H, H)
    assert torch.equal(editor._unpack(editor._pack(latents), H, H), latents)


@pytest.mark.bad_input
@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_editor_rejects_bad_inputs(backbone, text, tmp_path):
    states, pooled = text
    teacher = _teacher(backbone)
    x_t, t, source = _inputs()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        teacher(x_t, t * 1000 + 1, states, pooled)
    with pytest.raises(ValueError, match="x_t must be"):
        teacher(x_t[:, :2], t, states, pooled)
    with pytest.raises(ValueError, match="text_states must be"):
        teacher(x_t, t, states[:1], pooled)
    with pytest.raises(ValueError, match="extra_time_embedding"):
        teacher(x_t, t, states, pooled, extra_time_embedding=torch.zeros(B, 3))
    if backbone == "unet":
        with pytest.raises(ValueError, match="no reference input"):
            teacher(x_t, t, states, pooled, source)
    else:
        with pytest.raises(ValueError, match="divisible by the DiT patch"):
            teacher(x_t[..., :30, :30], t, states, pooled)
    with pytest.raises(ValueError, match="backbone"):
        load_editor(tmp_path, "vit")
    with pytest.raises(ValueError, match="quantization"):
        load_editor(tmp_path, backbone, quantization="3bit")


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_extra_time_embedding_is_added(backbone, text):
    states, pooled = text
    teacher = _teacher(backbone)
    x_t, t, _ = _inputs()
    with torch.no_grad():
        base = teacher(x_t, t, states, pooled)
        zero = torch.zeros(B, teacher.time_embedding_dim)
        assert torch.allclose(teacher(x_t, t, states, pooled, extra_time_embedding=zero), base, atol=1e-6)
        shifted = teacher(x_t, t, states, pooled, extra_time_embedding=zero + 1.0)
    assert not torch.allclose(shifted, base, atol=1e-3)


def test_gradient_checkpointing_keeps_gradients(text):
    states, pooled = text
    x_t, t, source = _inputs()
    grads = []
    for checkpointing in (False, True):
        editor = _teacher("dit")
        editor.train()
        if checkpointing:
            editor.enable_gradient_checkpointing()
        editor(x_t, t, states, pooled, source).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in editor.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_epsilon_unet_converts_to_flow_velocity(text):
    states, pooled = text
    alphas_cumprod = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    editor = UNetEditor(_teacher("unet").backbone, alphas_cumprod=alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(B, C, H, H, generator=g), torch.randn(B, C, H, H, generator=g)
    t = torch.tensor([0.5, 0.3])
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    seen = {}

    def oracle_unet(x, timestep, source_latents, text_states):  # a perfect noise predictor
        seen["timestep"] = timestep
        return eps

    editor._unet = oracle_unet
    velocity = editor(x_t, t, states, pooled)
    assert torch.allclose(velocity, eps - x0, atol=1e-4)
    # t = 0.5 has log-SNR 0: the fractional DDPM timestep where alphas_cumprod crosses 1/2
    k = seen["timestep"][0]
    lo, hi = alphas_cumprod[int(k)], alphas_cumprod[int(k) + 1]
    assert lo >= 0.5 >= hi
    assert torch.isfinite(editor(eps, torch.ones(B), states, pooled)).all()


# ---------------------------------------------------------------- autoencoders

def test_pixel_autoencoder_is_identity():
    images = torch.rand(B, 3, H, H) * 2 - 1
    ae = PixelAutoencoder()
    assert torch.equal(ae.decode(ae.encode(images)), images) and ae.downsample == 1
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ae.encode(torch.rand(H, H, 3))


def test_kl_autoencoder_shapes_scaling_and_gradients():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(tiny_vae_config())
    ae = KLAutoencoder(vae)
    images = (torch.rand(B, 3, H, H) * 2 - 1).requires_grad_(True)
    latents = ae.encode(images)
    assert latents.shape == (B, ae.latent_channels, H // ae.downsample, H // ae.downsample) == (B, 4, 16, 16)
    mean = vae.encode(images).latent_dist.mean
    assert torch.allclose(latents, (mean - 0.1) * 0.5, atol=1e-6)  # (z - shift) * scale
    latents.sum().backward()
    assert images.grad.abs().sum() > 0
    z = torch.randn(B, 4, 16, 16, requires_grad=True)
    decoded = ae.decode(z)
    assert decoded.shape == (B, 3, H, H)
    decoded.sum().backward()
    assert z.grad.abs().sum() > 0
    sampler = KLAutoencoder(vae, sample_posterior=True)
    with torch.no_grad():
        a = sampler.encode(images, torch.Generator().manual_seed(0))
        b = sampler.encode(images, torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b) and torch.allclose(ae.encode(images), latents)


# ---------------------------------------------------------------- LoRA: one base, three roles

@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_lora_generator_teacher_fake_share_one_base(backbone, text):
    states, pooled = text
    teacher = _teacher(backbone)
    editor = editor_from_teacher(teacher)
    x_t, t, source = _inputs()
    with torch.no_grad():
        v_teacher = teacher(x_t, t, states, pooled)
        v_before = editor(x_t, t, states, pooled, source)
    attach_lora(editor, rank=4, adapter_name="generator")
    attach_lora(editor, rank=4, adapter_name="fake")
    assert adapter_names(editor) == ["fake", "generator"]
    trainable = {n for n, p in editor.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert trainable == {n for n, p in editor.named_parameters() if "lora_" in n}
    with torch.no_grad():
        assert torch.allclose(editor(x_t, t, states, pooled, source), v_before, atol=1e-6)  # B starts at zero
        for p in lora_parameters(editor):
            p.normal_(std=0.5)
        with adapters_disabled(editor):  # teacher = the frozen base, no reference
            assert torch.allclose(editor(x_t, t, states, pooled), v_teacher, atol=1e-5)
        with active_adapter(editor, "fake"):
            v_fake = editor(x_t, t, states, pooled)
    assert not torch.allclose(v_fake, v_teacher, atol=1e-3)
    assert all(p.requires_grad for p in lora_parameters(editor))  # switching keeps both trainable
    with active_adapter(editor, "generator"):
        editor(x_t, t, states, pooled, source).square().mean().backward()
    assert all(p.grad is not None for p in lora_parameters(editor, "generator"))
    assert all(p.grad is None for p in lora_parameters(editor, "fake"))
    saved = lora_state_dict(editor, "generator")
    assert saved and all(".generator." in k for k in saved)
    with torch.no_grad():
        for p in lora_parameters(editor, "generator"):
            p.zero_()
    load_lora_state_dict(editor, saved)
    assert all(torch.equal(dict(editor.named_parameters())[k], v) for k, v in saved.items())
    with pytest.raises(ValueError, match="not attached"):
        with active_adapter(editor, "missing"):
            pass


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_merged_copy_saves_the_adapted_editor_as_a_plain_model(backbone, text_encoder, text, tmp_path):
    """merged_copy: one adapter folded into a copy of the base computes what the model computes
    with that adapter active; the model keeps its adapters; the copy saves and loads by path."""
    states, pooled = text
    editor = editor_from_teacher(_teacher(backbone))
    attach_lora(editor, rank=4, adapter_name="fake")
    attach_lora(editor, rank=4, adapter_name="generator")
    with torch.no_grad():
        for p in lora_parameters(editor):
            p.normal_(std=0.3)
    x_t, t, source = _inputs()
    with torch.no_grad(), active_adapter(editor, "generator"):
        v_generator = editor(x_t, t, states, pooled, source)
    merged = merged_copy(editor, "generator")
    assert adapter_names(editor) == ["fake", "generator"]
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(x_t, t, states, pooled, source), v_generator, atol=1e-5)
        with adapters_disabled(editor):  # the base was not touched by the merge
            assert not torch.allclose(editor(x_t, t, states, pooled, source), v_generator, atol=1e-3)
    save_components(tmp_path / "merged", editor=merged, text_encoder=text_encoder)
    with torch.no_grad():
        assert torch.allclose(load_editor(tmp_path / "merged")(x_t, t, states, pooled, source), v_generator, atol=1e-5)
    with pytest.raises(ValueError, match="not attached"):
        merged_copy(editor, "missing")


# ---------------------------------------------------------------- save_pretrained -> load by path

@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_save_and_load_by_path(backbone, text_encoder, text, tmp_path):
    states, pooled = text
    teacher = _teacher(backbone)
    editor = editor_from_teacher(teacher)
    editor_dir, teacher_dir = tmp_path / "editor", tmp_path / "teacher"
    save_components(editor_dir, editor=editor, text_encoder=text_encoder)
    save_components(teacher_dir, editor=teacher)
    subfolder = "unet" if backbone == "unet" else "transformer"
    assert (editor_dir / subfolder / "diffusion_pytorch_model.safetensors").is_file()
    assert (editor_dir / "tokenizer").is_dir() and (editor_dir / "text_encoder").is_dir()

    loaded_editor = load_editor(editor_dir, backbone)
    loaded_teacher = load_teacher(teacher_dir, backbone)
    assert resolve_backbone(editor_dir) == resolve_backbone(teacher_dir) == backbone  # "auto" reads the folder
    assert type(load_editor(editor_dir)) is type(editor)
    assert type(loaded_editor) is type(editor) and not any(p.requires_grad for p in loaded_teacher.parameters())
    x_t, t, source = _inputs()
    with torch.no_grad():
        assert torch.allclose(loaded_editor(x_t, t, states, pooled, source), editor(x_t, t, states, pooled, source))
        assert torch.allclose(loaded_teacher(x_t, t, states, pooled), teacher(x_t, t, states, pooled))
    assert isinstance(load_autoencoder(editor_dir), PixelAutoencoder)

    loaded_text = load_text_encoder(editor_dir)
    for a, b in zip(loaded_text.encode(TEXTS), text_encoder.encode(TEXTS)):
        assert torch.allclose(a.float(), b.float())
    if backbone == "unet":
        with pytest.raises(ValueError, match="text-to-image UNet"):
            load_teacher(editor_dir, "unet")


def test_backbone_auto_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="make pretrain"):
        resolve_backbone(tmp_path / "no" / "such" / "folder")
    with pytest.raises(ValueError, match="neither"):
        resolve_backbone(tmp_path)  # a folder with no unet/ or transformer/
    with pytest.raises(ValueError, match="unknown"):
        resolve_backbone(tmp_path, "vit")


def test_load_kl_autoencoder_and_latent_dit_by_path(tmp_path):
    torch.manual_seed(0)
    ae = KLAutoencoder(AutoencoderKL.from_config(tiny_vae_config()))
    editor = build_editor("dit", tiny_flux_config(latent_channels=4, patch=2), latent_channels=4)
    save_components(tmp_path, editor=editor, autoencoder=ae)
    loaded_ae = load_autoencoder(tmp_path)
    assert isinstance(loaded_ae, KLAutoencoder) and loaded_ae.shift_factor == pytest.approx(0.1)
    images = torch.rand(1, 3, H, H) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded_ae.encode(images), ae.encode(images), atol=1e-6)
    loaded = load_editor(tmp_path, "dit")  # latent channels read from vae/config.json
    assert isinstance(loaded, DiTEditor) and loaded.latent_channels == 4 and loaded.patch == 2


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_text_encoder_on_cpu(quantization, tmp_path):
    """transformers' bitsandbytes path runs on CPU (4-bit needs widths of at least 64)."""
    bnb = pytest.importorskip("bitsandbytes")
    tokenizer = build_tokenizer(TEXTS)
    torch.manual_seed(0)
    build_tiny_text_encoder(tokenizer, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)
    encoder = load_text_encoder(tmp_path, quantization=quantization, device="cpu", dtype=torch.float32)
    layer_cls = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
    assert any(isinstance(m, layer_cls) for m in encoder.modules())
    states, pooled, _ = encoder.encode(TEXTS)
    assert states.shape == (3, TINY_MAX_TEXT_LENGTH, 128) and torch.isfinite(states).all()


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_quantized_editor_base_with_lora_on_cuda(backbone, quantization, text_encoder, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("diffusers' bitsandbytes quantisation needs a CUDA device")
    torch.manual_seed(0)
    config = tiny_unet_config(with_reference=False) if backbone == "unet" else tiny_flux_config()
    if backbone == "unet":
        config.update(block_out_channels=(64, 128), norm_num_groups=32)
    else:
        config.update(attention_head_dim=32, axes_dims_rope=(8, 12, 12))
    save_components(tmp_path, editor=build_editor(backbone, config))
    editor = load_editor(tmp_path, backbone, quantization=quantization, dtype=torch.bfloat16, device="cuda")
    assert not any(p.requires_grad for p in editor.parameters())
    attach_lora(editor, rank=4, adapter_name="generator")
    x_t = torch.randn(B, C, H, H, device="cuda")
    states = torch.randn(B, TINY_MAX_TEXT_LENGTH, config.get("cross_attention_dim", 32), device="cuda")
    velocity = editor(x_t, torch.rand(B, device="cuda"), states, torch.randn(B, 32, device="cuda"))
    velocity.float().square().mean().backward()
    assert velocity.shape == x_t.shape
    assert all(p.grad is not None for p in lora_parameters(editor, "generator"))
