"""The 13-channel texture array ARR-COC's scorers read: :func:`texture_array`.

``texture_array(images)`` maps RGB images ``[B, 3, H, W]`` to ``[B, 13, H, W]`` (plain torch, any device, the
images' floating dtype; no learned parts). Channels and their value ranges (:data:`CHANNELS`):

====  ==============  =====================================================================================
 0-2  ``r g b``        sRGB in [0, 1] (the input)
 3    ``L``            CIELAB lightness L* / 100 (D65 white), in [0, 1]
 4-5  ``a b_``         CIELAB a* / 128 and b* / 128, in [-1, 1] (sRGB reaches about a* in [-86, 98],
                       b* in [-108, 95])
 6-7  ``gx gy``        Sobel derivatives of L along x and y (replicate padding) / 4, in [-1, 1]
 8-9  ``x y``          pixel-centre coordinates, -1 (left/top edge) .. 1 (right/bottom edge)
 10   ``ecc``          eccentricity: distance from the image centre / the corner's distance, in [0, 1]
 11   ``contrast``     local contrast: 2 x the standard deviation of L over a ``contrast_window`` square
                       (replicate padding), in [0, 1]
 12   ``motion``       |L - L of ``previous``|, in [0, 1]; 0 for still images (``previous=None``)
====  ==============  =====================================================================================

The seed's array is the same list; its ranges were undocumented, so each channel is scaled here to a unit
range (documented above and checked by ``tests/test_arrcoc.py`` on real photographs), which lets the scorers
mix channels without per-channel statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["CHANNELS", "CHANNEL_RANGES", "texture_array", "rgb_to_lab", "as_unit_rgb"]

#: Channel names, in order.
CHANNELS: tuple[str, ...] = ("r", "g", "b", "L", "a", "b_", "gx", "gy", "x", "y", "ecc", "contrast", "motion")
#: The documented (closed) value range of each channel.
CHANNEL_RANGES: dict[str, tuple[float, float]] = {
    "r": (0.0, 1.0), "g": (0.0, 1.0), "b": (0.0, 1.0), "L": (0.0, 1.0), "a": (-1.0, 1.0), "b_": (-1.0, 1.0),
    "gx": (-1.0, 1.0), "gy": (-1.0, 1.0), "x": (-1.0, 1.0), "y": (-1.0, 1.0), "ecc": (0.0, 1.0),
    "contrast": (0.0, 1.0), "motion": (0.0, 1.0)}

# sRGB (linear) -> CIE XYZ, D65 (IEC 61966-2-1)
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def as_unit_rgb(images: torch.Tensor, *, name: str = "images") -> torch.Tensor:
    """``images`` as floating RGB in [0, 1], ``[B, 3, H, W]``: uint8 is divided by 255; floating input must
    already lie in [0, 1] (a ``ValueError`` says so otherwise)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}={type(images).__name__}: expected a torch.Tensor [batch, 3, height, width]")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} has shape {tuple(images.shape)}: expected [batch, 3, height, width] (RGB)")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"{name} has dtype {images.dtype}: expected uint8 (0..255) or a float dtype (0..1)")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"{name} holds values in [{images.min().item():.3g}, {images.max().item():.3g}]: expected "
                         "RGB in [0, 1] (un-normalise model pixel_values first: x * std + mean)")
    return images


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] ``[B, 3, H, W]`` -> CIELAB ``(L*, a*, b*)`` in CIE units (L* in [0, 100]), D65 white."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp_min(0) + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear)
    xyz = xyz / torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    eps, kappa = 216 / 24389, 24389 / 27
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), (kappa * xyz + 16) / 116)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def _sobel(lum: torch.Tensor) -> torch.Tensor:
    """Sobel derivatives of ``lum [B, 1, H, W]`` (replicate padding) -> ``[B, 2, H, W]`` (x then y), / 4."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=lum.dtype, device=lum.device)
    k = torch.stack([kx, kx.T]).unsqueeze(1) / 4.0
    return F.conv2d(F.pad(lum, (1, 1, 1, 1), mode="replicate"), k)


def _local_contrast(lum: torch.Tensor, window: int) -> torch.Tensor:
    pad = window // 2
    lum = lum - lum.mean(dim=(2, 3), keepdim=True)  # centred: no cancellation in E[x^2] - E[x]^2 on flat areas
    padded = F.pad(lum, (pad, window - 1 - pad, pad, window - 1 - pad), mode="replicate")
    mean = F.avg_pool2d(padded, window, stride=1)
    var = (F.avg_pool2d(padded * padded, window, stride=1) - mean * mean).clamp_min(0)
    return (2 * var.sqrt()).clamp(0, 1)


def texture_array(images: torch.Tensor, *, previous: torch.Tensor | None = None,
                  contrast_window: int = 5) -> torch.Tensor:
    """The 13-channel texture array of ``images`` (see the module docstring for channels and ranges).

    Args:
        images: RGB ``[B, 3, H, W]``, uint8 or floating in [0, 1].
        previous: the previous frames (same shape) for the motion channel; None: still images (motion = 0).
        contrast_window: side of the square window of the local-contrast channel (odd, >= 3).

    Returns:
        ``[B, 13, H, W]`` in the images' floating dtype (float32 for uint8 input), on their device.
    """
    rgb = as_unit_rgb(images)
    if not isinstance(contrast_window, int) or contrast_window < 3 or contrast_window % 2 == 0:
        raise ValueError(f"contrast_window={contrast_window!r}: expected an odd int >= 3")
    b, _, h, w = rgb.shape
    lab = rgb_to_lab(rgb)
    lum = (lab[:, :1] / 100).clamp(0, 1)
    chroma = (lab[:, 1:] / 128).clamp(-1, 1)
    ys = (2 * torch.arange(h, dtype=rgb.dtype, device=rgb.device) + 1) / h - 1
    xs = (2 * torch.arange(w, dtype=rgb.dtype, device=rgb.device) + 1) / w - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    corner = ((1 - 1 / w) ** 2 + (1 - 1 / h) ** 2) ** 0.5 or 1.0  # the pixel centre farthest from the middle
    ecc = ((x * x + y * y).sqrt() / corner).clamp(0, 1)
    coords = torch.stack([x, y, ecc]).unsqueeze(0).expand(b, 3, h, w)
    if previous is None:
        motion = torch.zeros_like(lum)
    else:
        prev = as_unit_rgb(previous, name="previous")
        if prev.shape != rgb.shape:
            raise ValueError(f"previous has shape {tuple(prev.shape)}: expected the images' {tuple(rgb.shape)}")
        motion = (lum - (rgb_to_lab(prev.to(rgb.dtype))[:, :1] / 100).clamp(0, 1)).abs()
    return torch.cat([rgb, lum, chroma, _sobel(lum), coords[:, :2], coords[:, 2:], _local_contrast(lum, contrast_window),
                      motion], 1)
