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

import functools

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


def _capturing(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def as_unit_rgb(images: torch.Tensor, *, name: str = "images", check: bool = True) -> torch.Tensor:
    """``images`` as floating RGB in [0, 1], ``[B, 3, H, W]``: uint8 is divided by 255; floating input must
    already lie in [0, 1] (a ``ValueError`` says so otherwise). The value check reads the data on the host (a
    sync on a GPU): ``check=False`` skips it (values outside [0, 1] then give channels outside their ranges),
    and so does a CUDA graph capture."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}={type(images).__name__}: expected a torch.Tensor [batch, 3, height, width]")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} has shape {tuple(images.shape)}: expected [batch, 3, height, width] (RGB)")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"{name} has dtype {images.dtype}: expected uint8 (0..255) or a float dtype (0..1)")
    if check and images.numel() and not _capturing(images) and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"{name} holds values in [{images.min().item():.3g}, {images.max().item():.3g}]: expected "
                         "RGB in [0, 1] (un-normalise model pixel_values first: x * std + mean)")
    return images


# Constant tensors, made once per dtype and device (a tensor made from Python data per call is a host-to-device
# copy on a GPU, which also breaks CUDA graph capture).
@functools.lru_cache(maxsize=64)
def _lab_weights(dtype: torch.dtype, device: torch.device):
    """``(linear RGB -> XYZ / white`` as a 1x1 convolution, ``f -> (L*/100, a*/128, b*/128)`` as a 1x1 convolution
    with its bias, the clamp bounds of those three)."""
    m = torch.tensor(_RGB_TO_XYZ, dtype=torch.float64) / torch.tensor(_WHITE_D65, dtype=torch.float64)[:, None]
    lab = torch.tensor([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]], dtype=torch.float64)
    scale = torch.tensor([100.0, 128.0, 128.0], dtype=torch.float64)[:, None]
    bias = torch.tensor([-16.0, 0.0, 0.0], dtype=torch.float64) / scale[:, 0]
    lo = torch.tensor([0.0, -1.0, -1.0], dtype=torch.float64).view(1, 3, 1, 1)
    hi = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
    return tuple(t.to(device=device, dtype=dtype) for t in (m[:, :, None, None], (lab / scale)[:, :, None, None],
                                                          bias, lo, hi))


@functools.lru_cache(maxsize=64)
def _sobel_weights(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    return (torch.stack([kx, kx.T]).unsqueeze(1) / 4.0).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _coordinates(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[1, 3, H, W]``: x, y of the pixel centres in [-1, 1] and the eccentricity."""
    ys = (2 * torch.arange(height, dtype=dtype, device=device) + 1) / height - 1
    xs = (2 * torch.arange(width, dtype=dtype, device=device) + 1) / width - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    corner = ((1 - 1 / width) ** 2 + (1 - 1 / height) ** 2) ** 0.5 or 1.0  # the pixel centre farthest from the middle
    ecc = ((x * x + y * y).sqrt() / corner).clamp(0, 1)
    return torch.stack([x, y, ecc]).unsqueeze(0)


def _key(t: torch.Tensor):
    return t.dtype, t.device


def _linear_rgb(rgb: torch.Tensor) -> torch.Tensor:
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp_min(0) + 0.055) / 1.055) ** 2.4)


def _lab_f(xyz: torch.Tensor) -> torch.Tensor:
    eps, kappa = 216 / 24389, 24389 / 27
    return torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), (kappa * xyz + 16) / 116)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] ``[B, 3, H, W]`` -> CIELAB ``(L*, a*, b*)`` in CIE units (L* in [0, 100]), D65 white."""
    m = _lab_weights(*_key(rgb))[0]
    f = _lab_f(F.conv2d(_linear_rgb(rgb), m))
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def _unit_lab(rgb: torch.Tensor) -> torch.Tensor:
    """``(L*/100 in [0, 1], a*/128, b*/128 in [-1, 1])`` ``[B, 3, H, W]``: two 1x1 convolutions, no per-call
    constants."""
    m, lab, bias, lo, hi = _lab_weights(*_key(rgb))
    return torch.clamp(F.conv2d(_lab_f(F.conv2d(_linear_rgb(rgb), m)), lab, bias), lo, hi)


def _sobel(lum: torch.Tensor) -> torch.Tensor:
    """Sobel derivatives of ``lum [B, 1, H, W]`` (replicate padding) -> ``[B, 2, H, W]`` (x then y), / 4."""
    return F.conv2d(F.pad(lum, (1, 1, 1, 1), mode="replicate"), _sobel_weights(*_key(lum)))


def _local_contrast(lum: torch.Tensor, window: int) -> torch.Tensor:
    pad = window // 2
    lum = lum - lum.mean(dim=(2, 3), keepdim=True)  # centred: no cancellation in E[x^2] - E[x]^2 on flat areas
    padded = F.pad(lum, (pad, window - 1 - pad, pad, window - 1 - pad), mode="replicate")
    moments = F.avg_pool2d(torch.cat([padded, padded * padded], 1), window, stride=1)  # E[x], E[x^2]: one pool
    mean = moments[:, :1]
    var = (moments[:, 1:] - mean * mean).clamp_min(0)
    return (2 * var.sqrt()).clamp(0, 1)


def texture_array(images: torch.Tensor, *, previous: torch.Tensor | None = None,
                  contrast_window: int = 5, check: bool = True) -> torch.Tensor:
    """The 13-channel texture array of ``images`` (see the module docstring for channels and ranges).

    Args:
        images: RGB ``[B, 3, H, W]``, uint8 or floating in [0, 1].
        previous: the previous frames (same shape) for the motion channel; None: still images (motion = 0).
        contrast_window: side of the square window of the local-contrast channel (odd, >= 3).
        check: check that floating images lie in [0, 1] (a host read, i.e. a sync on a GPU; skipped while a
            CUDA graph is captured). Without it the call reads nothing on the host: it can be captured.

    Returns:
        ``[B, 13, H, W]`` in the images' floating dtype (float32 for uint8 input), on their device.
    """
    rgb = as_unit_rgb(images, check=check)
    if not isinstance(contrast_window, int) or contrast_window < 3 or contrast_window % 2 == 0:
        raise ValueError(f"contrast_window={contrast_window!r}: expected an odd int >= 3")
    b, _, h, w = rgb.shape
    lab = _unit_lab(rgb)
    lum = lab[:, :1]
    coords = _coordinates(h, w, *_key(rgb)).expand(b, 3, h, w)
    if previous is None:
        motion = lum.new_zeros(()).expand_as(lum)
    else:
        prev = as_unit_rgb(previous, name="previous", check=check)
        if prev.shape != rgb.shape:
            raise ValueError(f"previous has shape {tuple(prev.shape)}: expected the images' {tuple(rgb.shape)}")
        motion = (lum - _unit_lab(prev.to(rgb.dtype))[:, :1]).abs()
    return torch.cat([rgb, lab, _sobel(lum), coords, _local_contrast(lum, contrast_window), motion], 1)
