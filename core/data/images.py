"""Reading image files to the dataset contract: ``H x W x C`` numpy arrays of dtype uint8, uint16 or float32.

PNG and JPEG go through Pillow, TIFF through tifffile (with Pillow's libtiff as the fallback for compressed tiles
that tifffile cannot decode without ``imagecodecs``). :func:`read_num_channels` reads the header only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tifffile
from PIL import Image

from core.errors import DinoscopeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
CONTRACT_DTYPES = ("uint8", "uint16", "float32")
_TIFF_SUFFIXES = (".tif", ".tiff")
# Pillow modes whose array is not already uint8/uint16/float32 H x W (x C): convert on read.
_PIL_CONVERT = {"1": "L", "P": "RGBA", "PA": "RGBA", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG/JPEG (Pillow) or TIFF (tifffile) as ``H x W x C`` uint8, uint16 or float32."""
    try:
        image = _read_tiff(path) if str(path).lower().endswith(_TIFF_SUFFIXES) else _read_pillow(path)
    except DinoscopeError:
        raise
    except Exception as err:  # Pillow and tifffile raise many types for truncated or foreign files.
        fix = "re-export the file, or remove it from the folder"
        if "imagecodecs" in str(err):
            fix = "install the optional `imagecodecs` package, or re-export the TIFF without compression"
        raise DinoscopeError(f"the image cannot be read ({type(err).__name__}: {err})", path=path, fix=fix) from None
    return _to_contract_dtype(image[..., None] if image.ndim == 2 else image, path)


def _read_pillow(path: str | os.PathLike) -> np.ndarray:
    with Image.open(path) as pil:
        mode = _PIL_CONVERT.get(pil.mode)
        if pil.mode == "P" and "transparency" not in pil.info:
            mode = "RGB"
        return np.asarray(pil.convert(mode) if mode else pil)


def _read_tiff(path: str | os.PathLike) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        try:
            array = series.asarray()
        except ValueError as err:
            # Without imagecodecs tifffile cannot decode LZW/Deflate/JPEG tiles, common in GeoTIFFs; Pillow's
            # libtiff can for the 1-4 channel layouts it supports.
            try:
                return _read_pillow(path)
            except Exception:
                raise err from None
        return _tiff_to_hwc(array, series.axes, path)


def read_num_channels(path: str | os.PathLike) -> int:
    """Channel count from the file header only (no pixel decoding)."""
    try:
        if str(path).lower().endswith(_TIFF_SUFFIXES):
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return _tiff_channels(series.shape, series.axes, path)
        with Image.open(path) as pil:
            if pil.mode in ("P", "PA"):
                return 4 if pil.mode == "PA" or "transparency" in pil.info else 3
            return len(pil.getbands())
    except DinoscopeError:
        raise
    except Exception as err:
        raise DinoscopeError(
            f"the image header cannot be read ({type(err).__name__}: {err})",
            path=path,
            fix="re-export the file, or remove it from the folder",
        ) from None


def _tiff_layout(shape: Sequence[int], axes: str, path: str | os.PathLike) -> tuple[list[int], int | None]:
    """Axes kept (singletons other than Y/X dropped) and the position of the channel axis among them."""
    kept = [i for i, (n, a) in enumerate(zip(shape, axes, strict=False)) if n > 1 or a in "YX"]
    others = [i for i in kept if axes[i] not in "YX"]
    if len(kept) - len(others) != 2 or len(others) > 1:
        raise DinoscopeError(
            f"the TIFF has axes {axes} with shape {tuple(shape)}; expected a 2-D image or a "
            "3-D stack with one channel axis",
            path=path,
            field="axes",
            fix="save one image per file as YX, CYX or YXS",
        )
    return kept, (kept.index(others[0]) if others else None)


def _tiff_channels(shape: Sequence[int], axes: str, path: str | os.PathLike) -> int:
    kept, channel_axis = _tiff_layout(shape, axes, path)
    return 1 if channel_axis is None else int(shape[kept[channel_axis]])


def _tiff_to_hwc(array: np.ndarray, axes: str, path: str | os.PathLike) -> np.ndarray:
    kept, channel_axis = _tiff_layout(array.shape, axes, path)
    array = array.reshape([array.shape[i] for i in kept])
    return array if channel_axis is None else np.moveaxis(array, channel_axis, -1)


def _to_contract_dtype(image: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    if image.dtype.name in CONTRACT_DTYPES:
        return image
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32)
    if image.dtype == bool:
        return image.astype(np.uint8) * np.uint8(255)
    # Other integer types (Pillow's 32-bit "I" mode for 16-bit PNGs, int16 TIFFs) are kept when lossless.
    if np.issubdtype(image.dtype, np.integer) and image.size and image.min() >= 0 and image.max() <= 65535:
        return image.astype(np.uint16)
    raise DinoscopeError(
        f"pixel type {image.dtype} is not supported",
        path=path,
        field="dtype",
        fix=f"store the image as one of {', '.join(CONTRACT_DTYPES)}",
    )
