"""Input images of image-to-image requests: file bytes (or base64) in, an `ImageCondition` out.

Every refusal is a 400 naming the field. Checked from the header alone, before any pixel is decoded
(PIL opens lazily): that the file is an image, its pixel count against `max_image_pixels` (a small
file that claims 30000x30000 costs nothing), and that it has one frame. Then the pixels are decoded
(a truncated file fails here) and converted: CMYK through its own ICC profile when it carries one,
palette, greyscale and 16-bit images to 8-bit RGB, transparent pixels over white. A mask follows
OpenAI: a PNG of the image's size whose fully transparent pixels (alpha 0) mark where to edit.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re

import numpy as np
from PIL import Image, ImageCms

from model.image_condition import ImageCondition
from server.errors import ServingError, invalid

log = logging.getLogger(__name__)

# Default strength (0 = the input as it is, through the VAE; 1 = ignore it). With a mask the masked
# region is repainted freely (outside it the input's bits are kept whatever the strength); without
# one, a variation keeps the input's first 40% of scales (layout and colours) and samples the rest.
EDIT_STRENGTH, VARIATION_STRENGTH = 1.0, 0.6
BACKGROUND = (255, 255, 255)  # what shows through the transparent pixels of an input image
_DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.ASCII)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_HIGH_DEPTH_GREY = ("I", "I;16", "I;16B", "I;16L")  # 16-bit greyscale PNGs open as one of these


def image_condition(
    image: bytes,
    mask: bytes | None,
    strength: float | None,
    paste: bool,
    max_pixels: int,
    fields: tuple[str, str] = ("image", "mask"),
    alpha_as_mask: bool = False,
) -> ImageCondition:
    """One request's input: its image, where to edit it, how strongly.

    fields: the names the errors give the image and the mask (the CLI's flags, the API's fields).
    alpha_as_mask: without a mask, the image's own fully transparent pixels are the mask (OpenAI's
    edits contract); an image without any is a variation."""
    picture = open_image(image, fields[0], max_pixels)
    pixels = rgb_pixels(picture)
    if mask is not None:
        edit: np.ndarray | None = mask_pixels(open_image(mask, fields[1], max_pixels), fields[1], picture.size)
    else:
        edit = transparent_pixels(picture) if alpha_as_mask else None
    if strength is None:
        strength = EDIT_STRENGTH if edit is not None else VARIATION_STRENGTH
    return ImageCondition(pixels, edit, strength, paste)


def decode_base64(text: str, field: str) -> bytes:
    """A data URL (`data:image/png;base64,...`) or bare base64 -> bytes; line breaks are ignored."""
    match = _DATA_URL.match(text)
    payload = text[match.end() :] if match else text
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(
            f"`{field}` is neither base64 nor a base64 data URL (data:image/png;base64,...)", field, "invalid_base64"
        ) from None


def open_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """The decoded image; refused before decoding when its header is not one frame of <= `max_pixels`."""
    try:
        image = Image.open(io.BytesIO(data))  # lazy: the header only
    except Image.DecompressionBombError:  # PIL's own cap (~179 M pixels), far above ours
        raise _too_large(field, "claims more", max_pixels) from None
    except Exception:  # noqa: BLE001 - whatever a client's file makes PIL raise, it is that file's 400
        raise invalid(f"`{field}` is not an image (PNG, JPEG, WebP, GIF, ...)", field, "invalid_image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(field, f"is {width}x{height} = {width * height}", max_pixels)
    frames = getattr(image, "n_frames", 1)  # from the headers (GIF, APNG, WebP, TIFF pages)
    if frames > 1:
        raise invalid(f"`{field}` is animated ({frames} frames); send one still image", field, "animated_image")
    try:
        image.load()
    except Exception:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error... on a bad file
        raise invalid(f"`{field}` could not be decoded: truncated or corrupt", field, "invalid_image") from None
    return image


def _too_large(field: str, what: str, max_pixels: int) -> ServingError:
    return invalid(
        f"`{field}` {what} pixels, more than this server's limit of {max_pixels} (max_image_pixels)",
        field,
        "image_too_large",
    )


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any mode: CMYK through its own ICC profile when present, palette,
    greyscale and 16-bit to 8-bit RGB, transparent pixels over BACKGROUND."""
    if image.mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(image))
    if image.mode in _HIGH_DEPTH_GREY:  # scaled to 8 bits: a plain convert would clip 16-bit values at 255
        grey = (np.asarray(image, np.float32) / 257).round().clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if _has_alpha(image):  # a palette's transparency included
        rgba = image.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Through the file's ICC profile when it has one (what a viewer shows); else PIL's plain formula
    (Adobe's inverted CMYK JPEGs are already undone by PIL's decoder)."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError) as e:
            log.info("an input image's ICC profile is unusable (%s): plain CMYK conversion", e)
    return image.convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _alpha(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA").getchannel("A"))


def mask_pixels(mask: Image.Image, field: str, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool, True = edit: the fully transparent pixels of a mask the image's size (`size`: W, H)."""
    if mask.size != size:
        raise invalid(
            f"`{field}` is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}: they must match",
            field,
            "mask_size_mismatch",
        )
    if not _has_alpha(mask):
        raise invalid(
            f"`{field}` has no alpha channel: a mask is a PNG whose fully transparent pixels mark where to edit",
            field,
            "mask_without_alpha",
        )
    edit = _alpha(mask) == 0
    if not edit.any():
        raise invalid(f"`{field}` has no fully transparent pixel: it marks nothing to edit", field, "empty_mask")
    return edit


def transparent_pixels(image: Image.Image) -> np.ndarray | None:
    """(H, W) bool of the image's fully transparent pixels; None when it has none."""
    if not _has_alpha(image):
        return None
    edit = _alpha(image) == 0
    return edit if edit.any() else None
