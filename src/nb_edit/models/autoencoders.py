"""Autoencoders: where the editors' latents live.

One interface for both profiles, differentiable both ways (NP-Edit sec. 3 back-propagates the
VLM loss through the decoder into the editor):

- ``encode(images [B, 3, H, W] in [-1, 1]) -> latents [B, latent_channels, H / downsample, ...]``
- ``decode(latents) -> images in [-1, 1]`` (not clamped, so gradients are not cut at the edges)

``PixelAutoencoder`` is the tiny default: latents are the pixels. ``KLAutoencoder`` wraps a
diffusers ``AutoencoderKL`` and applies its config's normalisation,
``latents = (z - shift_factor) * scaling_factor`` (shift 0 for SD-style VAEs, set for FLUX).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"encode(images) needs a float tensor [B, 3, H, W] in [-1, 1]; got shape "
                         f"{tuple(images.shape)}. Convert uint8 (H, W, 3) renders with x / 127.5 - 1 and permute.")


class PixelAutoencoder(nn.Module):
    """Identity: the editor works on pixels (tiny profile). No parameters."""

    latent_channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(images)
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class KLAutoencoder(nn.Module):
    """A diffusers ``AutoencoderKL`` behind the project's interface.

    ``sample_posterior=False`` (default) encodes to the posterior mean: deterministic, which is what
    a reference image for an editor wants. ``True`` draws ``mean + std * noise`` (with
    ``generator``), as text-to-image training does for its targets.
    """

    def __init__(self, vae: AutoencoderKL, sample_posterior: bool = False):
        super().__init__()
        self.vae = vae
        self.sample_posterior = sample_posterior
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(images)
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = posterior.sample(generator) if self.sample_posterior else posterior.mean
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample
