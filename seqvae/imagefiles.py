"""Your own images: an .npz of uint8 arrays per split, or a folder of PNG/JPEG files per split.

    .npz      arrays named `train`, `valid` (and optionally `test`), each uint8 (or bool) of
              shape (n, h, w) (grey) or (n, h, w, c) (c = 1, 3 or 4 channels), loaded with
              allow_pickle=False; sizes are checked from the zip directory before reading
    folder    subfolders `train/`, `valid/` (and optionally `test/`) of .png / .jpg / .jpeg
              files (read with Pillow, in sorted name order); grey images (modes 1, L, LA,
              16-bit I;16 scaled to 8 bits, P without colour) give c = 1, colour images c = 3
              (alpha dropped); at most MAX_IMAGE_BYTES of pixels per split

Every image of a data set has one size and one channel count (an error names the first
file or array that differs). Returned as uint8 (n, c, h, w) with the values as stored;
data.py decides how they are binarised (see ImageData).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from .datafiles import DataError

__all__ = ["read_image_split", "IMAGE_SUFFIXES", "MAX_IMAGE_BYTES", "MAX_IMAGES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_IMAGE_BYTES = 8 << 30  # one split's pixels, uncompressed (8 GiB)
MAX_IMAGES = 5_000_000  # files in one split folder


def read_image_split(path: str | os.PathLike, split: str) -> np.ndarray:
    """uint8 (n, c, h, w) images of one split from an .npz file or a folder (see above)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; expected an .npz of uint8 arrays per split or a folder with "
                        "train/ and valid/ subfolders of PNG or JPEG files")
    images = _read_folder(path, split) if path.is_dir() else _read_npz(path, split)
    if images.shape[0] == 0:
        raise DataError(f"{path}: split {split!r} holds no images")
    return images


def _read_npz(path: Path, split: str) -> np.ndarray:
    try:
        with zipfile.ZipFile(path) as archive:
            sizes = {info.filename.removesuffix(".npy"): info.file_size for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path} is not a readable .npz file ({err})") from None
    if split not in sizes:
        raise DataError(f"{path} has no array {split!r}: expected uint8 arrays named train, valid (and test) of shape "
                        f"(n, h, w) or (n, h, w, c); found {sorted(sizes)}")
    if sizes[split] > MAX_IMAGE_BYTES:
        raise DataError(f"{path}: array {split!r} holds {sizes[split]:,} bytes, more than the {MAX_IMAGE_BYTES:,} allowed")
    try:
        with np.load(path, allow_pickle=False) as npz:
            array = npz[split]
    except Exception as err:
        raise DataError(f"{path}: array {split!r} cannot be read ({type(err).__name__}: {err})") from None
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype != np.uint8:
        raise DataError(f"{path}: array {split!r} must be uint8 pixels (0..255) or bool, got {array.dtype}; "
                        "convert with (x * 255).round().astype(np.uint8) for values in [0, 1]")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3, 4):
        array = np.ascontiguousarray(array[..., :3].transpose(0, 3, 1, 2))  # (n, h, w, c) -> (n, c, h, w), alpha dropped
    else:
        raise DataError(f"{path}: array {split!r} has shape {array.shape}; expected (n, h, w) or (n, h, w, c) with c in 1, 3, 4")
    return array


def _read_folder(path: Path, split: str) -> np.ndarray:
    folder = path / split
    if not folder.is_dir():
        raise DataError(f"{path} has no subfolder {split}/: expected train/ and valid/ (and test/) holding PNG or JPEG files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) > MAX_IMAGES:
        raise DataError(f"{folder} holds {len(files):,} images, more than the {MAX_IMAGES:,} allowed in one split")
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading a folder of images needs Pillow (pip install pillow)") from None
    arrays, first, total = [], None, 0
    for file in files:
        try:
            with Image.open(file) as image:
                if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey: keep the top 8 bits
                    array = (np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                elif image.mode in ("1", "L", "LA", "F") or (image.mode == "P" and _palette_is_grey(image)):
                    array = np.asarray(image.convert("L"))
                else:
                    array = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{file} is not a readable image ({err})") from None
        total += array.nbytes
        if total > MAX_IMAGE_BYTES:
            raise DataError(f"{folder} holds more than {MAX_IMAGE_BYTES:,} bytes of pixels, the most one split may have")
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if first is None:
            first = (file, array.shape)
        elif array.shape != first[1]:
            raise DataError(f"{file} is {_describe(array.shape)} but {first[0].name} is {_describe(first[1])}: every image of "
                            "a data set needs one size and one channel count")
        arrays.append(array)
    if not arrays:
        raise DataError(f"{folder} holds no .png, .jpg or .jpeg files")
    return np.stack(arrays)


def _palette_is_grey(image) -> bool:
    palette = image.getpalette() or []
    rgb = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
    return bool((rgb == rgb[:, :1]).all())


def _describe(shape) -> str:
    c, h, w = shape
    return f"{w}x{h} with {c} channel{'s' if c > 1 else ''}"
