"""Safe image loading and the conversions between the world's uint8 arrays and model tensors.

``load_image`` never returns something half-read: a missing, empty, corrupt, truncated, huge or
unsupported file raises :class:`BadInputError` naming the file, the problem and the fix. Images
in other colour modes are converted to RGB with a :class:`ImageConversionWarning` that names the
file and the mode, because a silent conversion (say, a 16-bit scan cut to its low byte) is a
bug that shows up weeks later as a bad metric.

Resizing keeps the aspect ratio: ``fit="crop"`` scales the shorter side to the target and cuts
the centre (nothing is distorted, the borders are lost); ``fit="pad"`` scales the longer side
to the target and pads with white (nothing is lost, the borders are white).

Tensors follow one convention: float ``(B, 3, H, W)`` in ``[-1, 1]`` (what :func:`to_tensor`
makes). :func:`check_image_tensor` guards the public entry points that take image tensors (the
edit pipeline, the judge): NaN, Inf, another range (say [0, 255] floats), another layout or an
integer dtype would otherwise give finite, meaningless results.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from nb_edit.core.validation import BadInputError

__all__ = ["BadInputError", "ImageConversionWarning", "check_image_tensor", "load_image", "to_tensor", "to_uint8"]

# Formats decoded by Pillow itself; others (EPS through Ghostscript, PDF, ...) are refused.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; far above anything the editors take
WHITE = (255, 255, 255)
# Accepted beyond [lo, hi]: bicubic resizing overshoots by a few percent near edges; any real
# mix-up of conventions ([0, 255], [0, 65535]) is far outside.
RANGE_SLACK = 0.1


class ImageConversionWarning(UserWarning):
    """An image was converted to 8-bit RGB from another mode."""


def _note(path: Path, mode: str, how: str) -> None:
    warnings.warn(f"{path}: image mode {mode} converted to 8-bit RGB ({how})",
                  ImageConversionWarning, stacklevel=3)


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise BadInputError(path, "file does not exist", "check the path and the working folder "
                            "(use nb_edit.core.paths helpers instead of relative paths)")
    if not path.is_file():
        raise BadInputError(path, "is not a file", "pass the path of an image file")
    if path.stat().st_size == 0:
        raise BadInputError(path, "file is empty (0 bytes)",
                            "re-download or re-export the image; the copy on disk is empty")
    try:
        image = Image.open(path, formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as error:
        raise BadInputError(path, f"image is too large to decode safely ({error})",
                            "downscale the file before use") from None
    except UnidentifiedImageError:
        try:  # identify the format from the header only, to tell "unsupported" from "corrupt"
            with Image.open(path) as other:
                found = other.format
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
            found = None
        if found:
            raise BadInputError(path, f"unsupported image format {found}",
                                f"convert it to one of {', '.join(SUPPORTED_FORMATS)}") from None
        raise BadInputError(path, "not a readable image (corrupt or not an image file)",
                            "re-export or re-download the file, or remove it from the dataset") from None
    except PermissionError:
        raise BadInputError(path, "file cannot be read (permission denied)",
                            "check the file's permissions") from None
    except Exception as error:  # a header cut short: Pillow raises OSError, SyntaxError, struct.error...
        raise BadInputError(path, f"image header is truncated or corrupt ({type(error).__name__}: {error})",
                            "re-export or re-download the file, or remove it from the dataset") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise BadInputError(path, f"image is huge ({width}x{height} = {width * height:,} pixels, "
                            f"over max_pixels={max_pixels:,})",
                            "downscale the file, or raise max_pixels if it is trusted")
    try:
        image.load()
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError... on bad data
        image.close()
        raise BadInputError(path, f"image data is truncated or corrupt ({type(error).__name__}: {error})",
                            "re-export or re-download the file, or remove it from the dataset") from None
    return image


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        elif mode.startswith("I;16"):
            top = 65535.0
        else:  # 32-bit ints: older readers open 16-bit PNGs as I; 8-bit data widened to I stays as is
            top = 65535.0 if values.max(initial=0.0) > 255 else 255.0
        _note(path, mode, f"values scaled from [0, {top:g}] to [0, 255]")
        gray = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        _note(path, mode, "transparent parts composited on white")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("CMYK", "P", "L", "1", "YCbCr", "LAB", "HSV"):
        _note(path, mode, {"CMYK": "colours may shift without an ICC profile",
                           "P": "palette expanded", "L": "grayscale copied to 3 channels",
                           "1": "black/white copied to 3 channels"}.get(mode, "colour space change"))
        return image.convert("RGB")
    raise BadInputError(path, f"unsupported image mode {mode}", "save it as 8-bit RGB (PNG or JPEG)")


def _target_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) for Pillow from ``size`` = side or (height, width)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size, size
    if (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        return int(size[1]), int(size[0])
    raise BadInputError(f"size={size!r}", "not a positive int or (height, width) pair",
                        "pass e.g. size=32 or size=(32, 48)")


def load_image(path: str | Path, size: int | tuple[int, int] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, fit: str = "crop") -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3), optionally resized to ``size``.

    ``size`` is a side length or (height, width); ``fit`` is "crop" or "pad" (module docstring).
    EXIF orientation is applied, so phone photos come out upright; animated files give frame 0.
    """
    if fit not in ("crop", "pad"):
        raise BadInputError(f"fit={fit!r}", "unknown resize mode", "use fit='crop' or fit='pad'")
    path = Path(path)
    target = _target_size(size) if size is not None else None
    with _open_checked(path, max_pixels) as image:
        image = _to_rgb(ImageOps.exif_transpose(image), path)
        if target is not None and image.size != target:
            if fit == "crop":
                image = ImageOps.fit(image, target, method=Image.Resampling.LANCZOS)
            else:
                image = ImageOps.pad(image, target, method=Image.Resampling.LANCZOS, color=WHITE)
        return np.array(image, dtype=np.uint8)


def to_tensor(images) -> torch.Tensor:
    """uint8 (H, W, 3), (B, H, W, 3) or a list of (H, W, 3) arrays -> float32 (B, 3, H, W) in [-1, 1]."""
    array = np.stack(images) if isinstance(images, (list, tuple)) else np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise BadInputError(f"images (dtype {array.dtype}, shape {array.shape})",
                            "expected uint8 arrays shaped (H, W, 3) or (B, H, W, 3)",
                            "pass what load_image or the world's renderer returns")
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()
    return tensor / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) or (H, W, 3); clamps."""
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or images.shape[-3] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise BadInputError(f"images ({shape})", "expected a tensor shaped (3, H, W) or (B, 3, H, W)",
                            "pass a model output in [-1, 1]")
    images = images.detach().float().cpu()
    if not torch.isfinite(images).all():
        raise BadInputError("images", "contain NaN or Inf",
                            "check the model that produced them (a diverged run or a bad dtype)")
    scaled = ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return scaled.movedim(-3, -1).numpy()


def check_image_tensor(x, name: str, lo: float = -1.0, hi: float = 1.0, slack: float = RANGE_SLACK):
    """Return ``x`` if it is a float ``(B, 3, H, W)`` tensor of finite values in ``[lo, hi]``
    (``slack`` beyond it accepted), else raise :class:`BadInputError` naming ``name``, what is
    wrong (the NaN and Inf counts, the range found, the shape or dtype) and the fix.

    One reduction over the tensor and one sync: cheap next to any model call, but meant for
    public entry points, not for inner loops.
    """
    fix = f"pass float images (B, 3, H, W) in [{lo:g}, {hi:g}]: nb_edit.core.images.to_tensor makes them from uint8 arrays"
    if not isinstance(x, torch.Tensor):
        raise BadInputError(name, f"expected a torch.Tensor, got {type(x).__name__}", fix)
    shape = tuple(x.shape)
    if x.ndim != 4 or shape[1] != 3:
        hint = " (channels last? use x.permute(0, 3, 1, 2))" if x.ndim == 4 and shape[-1] == 3 else ""
        raise BadInputError(name, f"shape {shape} is not (B, 3, H, W){hint}", fix)
    if not x.is_floating_point():
        raise BadInputError(name, f"dtype {x.dtype} is not a float type (raw pixel values?)",
                            fix + f", or x.float() / 127.5 - 1 for {x.dtype} values in [0, 255]")
    if x.numel() == 0:
        raise BadInputError(name, f"shape {shape} holds no pixel", fix)
    values = x.detach()
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(values).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise BadInputError(name, f"{n_nan} NaN and {n_inf} Inf of {values.numel()} values",
                            "check what produced them (a diverged model, a division by zero); " + fix)
    low, high = (float(v) for v in torch.aminmax(values.float()))
    if low < lo - slack or high > hi + slack:
        hint = " (looks like [0, 255] pixel values)" if low >= 0 and high > 2 else ""
        raise BadInputError(name, f"values span [{low:.4g}, {high:.4g}], outside [{lo:g}, {hi:g}]{hint}",
                            fix + ", or x / 127.5 - 1 for floats in [0, 255]")
    return x
