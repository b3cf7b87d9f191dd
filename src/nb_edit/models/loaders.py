"""Loading editors, teachers, text encoders and autoencoders by hub id or local folder.

Folders follow the hub repositories' layout, so the tiny stand-ins written by
``save_components`` and the real models load through the same functions:

    InstructPix2Pix (``timbrooks/instruct-pix2pix``): unet/ vae/ text_encoder/ tokenizer/ scheduler/
    FLUX.1-Kontext-dev: transformer/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/
    tiny pixel-space stand-ins: the same, without vae/ (latents are pixels)

A frozen base can be quantised with bitsandbytes (``quantization="8bit"`` or ``"4bit"`` NF4,
diffusers / transformers ``BitsAndBytesConfig``); train it through LoRA (:mod:`.lora`).
diffusers' bitsandbytes path needs a GPU. Weights load from safetensors only (``use_safetensors=True``;
a local folder that holds pickle weights only is refused by :func:`require_safetensors` with the
fix) and no remote code runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    UNet2DConditionModel,
)
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from nb_edit.core.validation import BadInputError
from nb_edit.models.autoencoders import KLAutoencoder, PixelAutoencoder
from nb_edit.models.editors import FLUX_DEFAULT_GUIDANCE, DiTEditor, Editor, UNetEditor
from nb_edit.models.text import TextEncoder

BACKBONE_SUBFOLDER = {"unet": "unet", "dit": "transformer"}
BACKBONES = ("auto", *BACKBONE_SUBFOLDER)
QUANTIZATIONS = (None, "8bit", "4bit")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(model_id: str | Path, subfolder: str | None = None) -> None:
    """Refuse a local model folder whose weights are pickle files only.

    Unpickling can run arbitrary code, so the project loads safetensors only; the libraries,
    asked for ``use_safetensors=True``, refuse such a folder too, but with a message that
    neither says why nor how to fix it. Hub ids are left to the library (it does refuse them).
    """
    folder = Path(model_id) / subfolder if subfolder else Path(model_id)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise BadInputError(
            folder, f"holds its weights only as pickle files ({', '.join(pickles)}), which can run code when "
            "loaded; this project loads safetensors only",
            "convert them to safetensors (load the model once where you trust it and save_pretrained(..., "
            "safe_serialization=True)), or use a copy of the model that ships *.safetensors files")


def _read_json(model_id: str | Path, filename: str) -> dict | None:
    """A JSON file of a local folder or hub repo, or None when the repo has no such file."""
    local = Path(model_id) / filename
    if Path(model_id).is_dir():
        return json.loads(local.read_text()) if local.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(str(model_id), filename)).read_text())
    except RemoteEntryNotFoundError:  # the repo answered: no such file (offline misses still raise)
        return None


def resolve_backbone(model_id: str | Path, backbone: str = "auto") -> str:
    """``backbone``, or with ``"auto"`` the one ``model_id`` holds: ``unet/`` or ``transformer/``.

    Reads only ``<subfolder>/config.json`` (locally, or from the hub cache / the hub).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r} is unknown; use 'unet' (InstructPix2Pix), 'dit' (FLUX.1-Kontext) "
                         "or 'auto' (whichever the folder holds).")
    text = str(model_id)
    if not Path(model_id).is_dir() and (text.startswith((".", "/", "~")) or text.count("/") > 1):
        raise FileNotFoundError(f"{model_id}: no such model folder (a hub id is 'owner/name'); check the path, "
                                "or run `make pretrain` to make the shipped stand-ins in data/pretrained/.")
    if backbone != "auto":
        return backbone
    found = [name for name, sub in BACKBONE_SUBFOLDER.items() if _read_json(model_id, f"{sub}/config.json")]
    if len(found) != 1:
        raise ValueError(f"{model_id}: backbone='auto' needs exactly one of unet/ or transformer/ with a config.json; "
                         f"found {found or 'neither'}. Pass backbone='unet' or 'dit'.")
    return found[0]


def _quantization_config(quantization: str | None, dtype: torch.dtype | None, library: str):
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is unknown; use one of {QUANTIZATIONS}.")
    if quantization is None:
        return None
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype or torch.bfloat16)


def _load(cls, model_id, subfolder, quantization, dtype, device, library="diffusers"):
    """``cls.from_pretrained`` with the project's safety and placement rules."""
    require_safetensors(model_id, subfolder)
    kwargs = dict(subfolder=subfolder, use_safetensors=True, torch_dtype=dtype)
    quant = _quantization_config(quantization, dtype, library)
    if quant is not None:
        # quantised weights are placed at load time and cannot be moved afterwards
        kwargs.update(quantization_config=quant, device_map={"": str(device or "cuda")})
    model = cls.from_pretrained(str(model_id), **kwargs)
    if quant is None and device is not None:
        model.to(device)
    if quant is not None:
        model.requires_grad_(False)  # a quantised base is frozen: train LoRA adapters on it
    return model


def _ddpm_alphas_cumprod(model_id) -> torch.Tensor | None:
    """The DDPM schedule of an epsilon-prediction repo (InstructPix2Pix, SD 1.5), else None."""
    config = _read_json(model_id, "scheduler/scheduler_config.json")
    if config is None or config.get("_class_name", "").startswith("FlowMatch"):
        return None
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{model_id}: scheduler prediction_type={config['prediction_type']!r} is not supported; "
                         "UNetEditor converts epsilon-prediction or runs flow-matching UNets.")
    return DDPMScheduler.from_config(config).alphas_cumprod


def _latent_channels(model_id) -> int:
    vae_config = _read_json(model_id, "vae/config.json")
    return PixelAutoencoder.latent_channels if vae_config is None else vae_config["latent_channels"]


def load_editor(model_id: str | Path, backbone: str = "auto", quantization: str | None = None,
                dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                latent_channels: int | None = None, guidance: float = FLUX_DEFAULT_GUIDANCE) -> Editor:
    """The editing backbone of ``model_id`` (``unet/`` or ``transformer/``) behind the Editor interface.

    ``backbone="auto"`` takes whichever of the two the repo holds (see :func:`resolve_backbone`).

    ``latent_channels`` (DiT only) defaults to the repo's ``vae/config.json`` (3 without a VAE).
    A UNet repo whose ``scheduler/`` is a DDPM-family epsilon schedule is converted to velocity.
    """
    backbone = resolve_backbone(model_id, backbone)
    if backbone == "unet":
        unet = _load(UNet2DConditionModel, model_id, "unet", quantization, dtype, device)
        return UNetEditor(unet, alphas_cumprod=_ddpm_alphas_cumprod(model_id))
    transformer = _load(FluxTransformer2DModel, model_id, "transformer", quantization, dtype, device)
    return DiTEditor(transformer, latent_channels or _latent_channels(model_id), guidance=guidance)


def load_teacher(model_id: str | Path, backbone: str = "auto", quantization: str | None = None,
                 dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 latent_channels: int | None = None, guidance: float = FLUX_DEFAULT_GUIDANCE) -> Editor:
    """The frozen text-to-image teacher: a UNet without reference channels (e.g. SD 1.5), or the
    DiT itself (FLUX.1-Kontext without reference tokens). Returned in eval mode, frozen."""
    teacher = load_editor(model_id, backbone, quantization, dtype, device, latent_channels, guidance)
    if isinstance(teacher, UNetEditor) and teacher.takes_reference:
        raise ValueError(f"{model_id}/unet takes reference channels (an editor such as InstructPix2Pix); a UNet "
                         "teacher is a text-to-image UNet (in_channels == out_channels), e.g. SD 1.5.")
    return teacher.requires_grad_(False).eval()


def load_text_encoder(model_id: str | Path, quantization: str | None = None, dtype: torch.dtype | None = None,
                      device: str | torch.device | None = None) -> TextEncoder:
    """``tokenizer/`` + ``text_encoder/`` (CLIP), plus ``tokenizer_2/`` + ``text_encoder_2/`` (T5) when
    the repo has them (FLUX). Frozen, eval mode."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_id), subfolder="tokenizer")
    encoder = _load(CLIPTextModel, model_id, "text_encoder", quantization, dtype, device, "transformers")
    tokenizer_2 = encoder_2 = None
    if _read_json(model_id, "text_encoder_2/config.json") is not None:
        tokenizer_2 = AutoTokenizer.from_pretrained(str(model_id), subfolder="tokenizer_2")
        encoder_2 = _load(T5EncoderModel, model_id, "text_encoder_2", quantization, dtype, device, "transformers")
    return TextEncoder(tokenizer, encoder, tokenizer_2, encoder_2).requires_grad_(False).eval()


def load_autoencoder(model_id: str | Path, dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None,
                     sample_posterior: bool = False) -> KLAutoencoder | PixelAutoencoder:
    """``vae/`` as a ``KLAutoencoder`` (frozen, eval; gradients still flow to its inputs), or the
    pixel identity for repos without ``vae/`` (the tiny pixel-space stand-ins)."""
    if _read_json(model_id, "vae/config.json") is None:
        return PixelAutoencoder()
    vae = _load(AutoencoderKL, model_id, "vae", None, dtype, device)
    return KLAutoencoder(vae, sample_posterior=sample_posterior).requires_grad_(False).eval()


def save_components(folder: str | Path, editor: Editor | None = None, text_encoder: TextEncoder | None = None,
                    autoencoder: KLAutoencoder | PixelAutoencoder | None = None) -> Path:
    """Write components in the hub layout that the loaders read (safetensors weights).

    A flow-matching scheduler config is written with a UNet, marking its output as a velocity.
    Save a teacher and an editor with the same backbone into different folders.
    """
    folder = Path(folder)
    os.makedirs(folder, exist_ok=True)
    if editor is not None:
        subfolder = "unet" if isinstance(editor, UNetEditor) else "transformer"
        editor.backbone.save_pretrained(str(folder / subfolder), safe_serialization=True)
        if isinstance(editor, UNetEditor):
            if editor._ddpm_log_snr is not None:
                raise ValueError("this UNet predicts epsilon on a DDPM schedule; save it with its own scheduler.")
            FlowMatchEulerDiscreteScheduler().save_config(str(folder / "scheduler"))
    if text_encoder is not None:
        text_encoder.save_pretrained(folder)
    if isinstance(autoencoder, KLAutoencoder):
        autoencoder.vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    return folder
