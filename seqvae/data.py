"""Data sets by name, and their batches in a resumable order.

Dimensions: n examples, b batch, t time, d features, c h w image channels and size.

A data set is registered (`register_dataset`) with the kind of data it holds ("images":
(c, h, w) arrays; "sequences": variable-length (t, d) arrays), a loader for each split and
how its examples are shown. Models name the kinds of data they accept (models.py), so
nothing else in the package names a data set. Built in (files and formats in datafiles.py):

    binarized_mnist  the fixed binarization, 50k / 10k / 10k (train / valid / test), 1x28x28
    mnist            dynamic binarization: pixel intensities / 255 are Bernoulli means,
                     drawn afresh each time an image is served; train = the first 50k of the
                     60k training images, valid = the last 10k, train_full = all 60k, test = 10k
    jsb_chorales     88-key piano rolls (MIDI 21..108), 229 / 76 / 77 chorales
    fashion_mnist    Fashion-MNIST (Xiao et al. 2017), dynamic binarization, splits as mnist
    seq_mnist        binarized_mnist as sequences of 28 rows of 28 bits
    npz              your own sequences: `data_path` names an .npz file (see `save_sequences`)
    images           your own images: `data_path` names an .npz of uint8 arrays per split or a
                     folder with train/ valid/ (test/) subfolders of PNG/JPEG (imagefiles.py);
                     0/1 (or 0/255) images are used as they are, other grey levels are
                     binarized dynamically (each pixel's level / 255 is a Bernoulli mean)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .configs import check
from .datafiles import FILES, DataError, data_root, fetch, parse_amat, parse_idx, piano_roll, read_jsb_pickle, read_sequences, save_sequences
from .imagefiles import read_image_split

__all__ = [
    "DataError",
    "DataConfig",
    "DataInfo",
    "DatasetSpec",
    "DATASETS",
    "register_dataset",
    "get_dataset",
    "dataset_info",
    "check_splits_agree",
    "describe",
    "data_root",
    "load_dataset",
    "ImageData",
    "SequenceData",
    "Batch",
    "batches",
    "num_batches",
    "save_sequences",
    "SPLITS",
    "KINDS",
]

SPLITS = ("train", "valid", "test")
KINDS = ("images", "sequences")


@dataclass
class DataConfig:
    """Which data, where, and how it is batched."""

    name: str = "binarized_mnist"  # data set: a registered name (see `seqvae train --help`)
    data_dir: str | None = None  # None: $SEQVAE_DATA, else data/
    data_path: str | None = None  # name=npz: the .npz file; name=images: the .npz or the folder of images
    batch_size: int = 64  # examples per optimiser step (the global batch under torchrun)
    limit: int | None = None  # use only the first `limit` examples of the training split
    valid_limit: int | None = None  # ... and of the validation split
    download: bool = True  # download missing files from their canonical source (checked against checksums)

    def validate(self) -> "DataConfig":
        check(self.name in DATASETS, f"data.name must be one of {', '.join(DATASETS)}, got {self.name!r}")
        check(not DATASETS[self.name].needs_path or bool(self.data_path), f"data.name={self.name} needs data.data_path=FILE")
        check(self.batch_size >= 1, f"data.batch_size must be at least 1, got {self.batch_size}")
        check(self.limit is None or self.limit >= 1, f"data.limit must be at least 1 (or none), got {self.limit}")
        check(
            self.valid_limit is None or self.valid_limit >= 1,
            f"data.valid_limit must be at least 1 (or none), got {self.valid_limit}",
        )
        return self



@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know of a data set before seeing it."""

    name: str
    kind: str  # "images" | "sequences"
    shape: tuple[int, ...]  # (c, h, w) of an image, or (d,) features per time step
    binary: bool  # every value is 0 or 1
    display: str  # how examples are shown: "images", "rows" (a sequence as an image), "piano" (a piano roll), "lines"
    length: int | None = None  # sequences: the length a sample figure draws (None: the median training length)


Loader = Callable[[str, "DataConfig"], "ImageData | SequenceData"]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: its kind, its loader and, where known without reading files, its shape."""

    name: str
    kind: str
    load: Loader  # (split, DataConfig) -> ImageData | SequenceData
    splits: tuple[str, ...] = SPLITS
    shape: tuple[int, ...] | None = None  # None: read from the training split
    binary: bool | None = None
    display: str | None = "images"  # None: "piano" for binary sequences, else "lines"
    length: int | None = None
    needs_path: bool = False  # the data come from data.data_path
    description: str = ""


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Make a data set usable by name wherever data are named (`--data NAME`, DataConfig.name)."""
    if spec.kind not in KINDS:
        raise ValueError(f"a data set's kind must be one of {', '.join(KINDS)}, got {spec.kind!r}")
    DATASETS[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


class Batch(NamedTuple):
    x: Tensor  # (b, c, h, w) images or (b, t, d) padded sequences
    lengths: Tensor | None = None  # (b,) for sequences


class ImageData:
    """In-memory images (n, c, h, w) as uint8: {0,1} (fixed) or 0..255 (dynamic binarization)."""

    kind = "images"

    def __init__(self, images: Tensor, *, binarize: str, name: str):
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise DataError(f"{name}: expected uint8 images (n, c, h, w), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise DataError(f"{name}: the data set is empty")
        if binarize not in ("fixed", "dynamic"):
            raise ValueError(f"binarize must be 'fixed' or 'dynamic', got {binarize!r}")
        self.images, self.binarize, self.name = images, binarize, name

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def binary(self) -> bool:
        return True  # fixed {0, 1} images, or Bernoulli draws from intensities

    def subset(self, limit: int | None) -> "ImageData":
        return self if limit is None else ImageData(self.images[:limit], binarize=self.binarize, name=self.name)

    def batch(self, index: Tensor, generator: torch.Generator | None = None) -> Batch:
        raw = self.images[index]
        if self.binarize == "fixed":
            return Batch(raw.float())
        return Batch(torch.bernoulli(raw.float() / 255.0, generator=generator))


class SequenceData:
    """Variable-length sequences: a list of (t_i, d) float tensors, served padded with lengths."""

    kind = "sequences"

    def __init__(self, sequences: list[Tensor], *, name: str, binary: bool = False):
        if not sequences:
            raise DataError(f"{name}: the data set is empty")
        d = sequences[0].shape[-1]
        for i, s in enumerate(sequences):
            if s.dim() != 2 or s.shape[1] != d:
                raise DataError(f"{name}: sequence {i} has shape {tuple(s.shape)}; expected (time, {d})")
            if s.shape[0] == 0:
                raise DataError(f"{name}: sequence {i} has length zero; every sequence needs at least one step")
            if not torch.isfinite(s).all():
                raise DataError(f"{name}: sequence {i} holds NaN or infinite values")
        self.sequences, self.name, self.binary = [s.float() for s in sequences], name, binary
        self.lengths = torch.tensor([s.shape[0] for s in sequences])

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def x_dim(self) -> int:
        return self.sequences[0].shape[1]

    def subset(self, limit: int | None) -> "SequenceData":
        return self if limit is None else SequenceData(self.sequences[:limit], name=self.name, binary=self.binary)

    def batch(self, index: Tensor, generator: torch.Generator | None = None) -> Batch:
        seqs = [self.sequences[i] for i in index.tolist()]
        return Batch(torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True), self.lengths[index])


def _root(dc: DataConfig) -> Path:
    return data_root(dc.data_dir)


def _binarized_mnist(split: str, dc: DataConfig) -> np.ndarray:
    spec = FILES[("binarized_mnist", split)]
    (content,) = fetch(_root(dc), [spec], dc.download)
    return parse_amat(content, where=f"{spec.folder}/{spec.name}")


def _load_binarized_mnist(split: str, dc: DataConfig) -> ImageData:
    images = _binarized_mnist(split, dc)
    return ImageData(torch.from_numpy(images.copy()).view(-1, 1, 28, 28), binarize="fixed", name=f"binarized_mnist/{split}")


def _idx_images(name: str, split: str, dc: DataConfig) -> ImageData:
    """MNIST-like IDX images: train = the first 50k training images, valid = the last 10k."""
    part = "test" if split == "test" else "train"
    spec = FILES[(name, f"{part}-images")]
    (content,) = fetch(_root(dc), [spec], dc.download)
    images = parse_idx(content, f"{spec.folder}/{spec.name}", 3)
    images = {"train": images[:50000], "valid": images[50000:], "train_full": images, "test": images}[split]
    return ImageData(torch.from_numpy(images.copy()).view(-1, 1, 28, 28), binarize="dynamic", name=f"{name}/{split}")


def _load_mnist(split: str, dc: DataConfig) -> ImageData:
    return _idx_images("mnist", split, dc)


def _load_fashion_mnist(split: str, dc: DataConfig) -> ImageData:
    return _idx_images("fashion_mnist", split, dc)


def _load_images(split: str, dc: DataConfig) -> ImageData:
    if not dc.data_path:
        raise DataError("the images data set needs a file or folder: pass --data.data_path=PATH (.npz or a folder)")
    images = read_image_split(dc.data_path, split)
    levels = np.unique(images[: min(len(images), 2000)])  # the levels used decide the binarisation
    if set(levels.tolist()) <= {0, 1} and bool((images <= 1).all()):
        binarize = "fixed"
    elif set(levels.tolist()) <= {0, 255} and bool(((images == 0) | (images == 255)).all()):
        images, binarize = images // 255, "fixed"
    else:
        binarize = "dynamic"
    return ImageData(torch.from_numpy(np.ascontiguousarray(images)), binarize=binarize, name=f"{Path(dc.data_path).name}/{split}")


def _load_seq_mnist(split: str, dc: DataConfig) -> SequenceData:
    rows = torch.from_numpy(_binarized_mnist(split, dc).copy()).float().view(-1, 28, 28)
    return SequenceData(list(rows.unbind(0)), name=f"seq_mnist/{split}", binary=True)


def _load_jsb(split: str, dc: DataConfig) -> SequenceData:
    spec = FILES[("jsb_chorales", "all")]
    (content,) = fetch(_root(dc), [spec], dc.download)
    pieces = read_jsb_pickle(content, where=f"{spec.folder}/{spec.name}")[split]
    return SequenceData([piano_roll(p) for p in pieces], name=f"jsb_chorales/{split}", binary=True)


def _load_npz(split: str, dc: DataConfig) -> SequenceData:
    if not dc.data_path:
        raise DataError("the npz data set needs a file: pass data_path (--data.data_path=FILE.npz)")
    seqs, binary = read_sequences(dc.data_path, split)
    return SequenceData(seqs, name=f"{Path(dc.data_path).name}/{split}", binary=binary)


register_dataset(DatasetSpec("binarized_mnist", "images", _load_binarized_mnist, shape=(1, 28, 28), binary=True,
                             description="the fixed binarization of Larochelle & Murray (2011)"))
register_dataset(DatasetSpec("mnist", "images", _load_mnist, splits=(*SPLITS, "train_full"), shape=(1, 28, 28), binary=True,
                             description="MNIST with dynamic binarization"))
register_dataset(DatasetSpec("fashion_mnist", "images", _load_fashion_mnist, splits=(*SPLITS, "train_full"), shape=(1, 28, 28),
                             binary=True, description="Fashion-MNIST (Xiao et al. 2017) with dynamic binarization"))
register_dataset(DatasetSpec("images", "images", _load_images, binary=True, needs_path=True,
                             description="your own images: an .npz of uint8 arrays per split or a folder of PNG/JPEG per split"))
register_dataset(DatasetSpec("jsb_chorales", "sequences", _load_jsb, shape=(88,), binary=True, display="piano",
                             description="JSB chorales as 88-key piano rolls"))
register_dataset(DatasetSpec("seq_mnist", "sequences", _load_seq_mnist, shape=(28,), binary=True, display="rows", length=28,
                             description="binarized MNIST as sequences of 28 rows"))
register_dataset(DatasetSpec("npz", "sequences", _load_npz, display=None, needs_path=True,
                             description="your own sequences in an .npz written by seqvae.data.save_sequences"))


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
    download: bool = True,
) -> ImageData | SequenceData:
    """A data set split by name (see the module docstring)."""
    spec = get_dataset(name)
    if split not in spec.splits:
        raise DataError(f"unknown split {split!r} for {name}: expected one of {', '.join(spec.splits)}")
    dc = DataConfig(name=name, data_dir=None if data_dir is None else str(data_dir),
                    data_path=None if data_path is None else str(data_path), download=download)
    data = spec.load(split, dc)
    if data.kind != spec.kind:
        raise DataError(f"the loader of {name} returned {data.kind}, but {name} is registered as {spec.kind}")
    return data


def dataset_info(dc: DataConfig, data: "ImageData | SequenceData | None" = None) -> DataInfo:
    """What a model needs to know of the data set dc names: from `data` (a loaded split) when
    given, else from the registry, reading the training split only when the registry does not say."""
    spec = get_dataset(dc.name)
    shape, binary, length = spec.shape, spec.binary, spec.length
    if data is None and (shape is None or binary is None):
        data = load_dataset(dc.name, "train", data_dir=dc.data_dir, data_path=dc.data_path, download=dc.download)
    if data is not None:
        shape, binary = describe(data).shape, data.binary
        if data.kind == "sequences" and length is None:
            length = int(data.lengths.float().median())
    display = spec.display or ("piano" if binary else "lines")
    return DataInfo(dc.name, spec.kind, tuple(shape), bool(binary), display, length)


def model_data_info(dc: DataConfig, model_config) -> DataInfo:
    """What a trained model says of its data, without reading files: the registry's entry where
    it knows the shape, else the shape and the head recorded in the model's config (a run on
    your own files can sample and draw after those files have moved)."""
    spec = get_dataset(dc.name)
    if spec.shape is not None and spec.binary is not None:
        return dataset_info(dc)
    shape = getattr(model_config, "image_shape", None) or (getattr(model_config, "x_dim"),)
    head = getattr(model_config, "likelihood", None) or getattr(model_config, "output", None)
    binary = head == "bernoulli"
    display = spec.display or ("piano" if binary else "lines")
    return DataInfo(dc.name, spec.kind, tuple(shape), binary, display, spec.length)


def describe(data: "ImageData | SequenceData") -> DataInfo:
    """A DataInfo from loaded data alone (for data that did not come through the registry)."""
    shape = data.image_shape if data.kind == "images" else (data.x_dim,)
    display = "images" if data.kind == "images" else ("piano" if data.binary else "lines")
    return DataInfo(data.name, data.kind, tuple(shape), bool(data.binary), display)


def check_splits_agree(first: "ImageData | SequenceData", second: "ImageData | SequenceData") -> None:
    """Two splits of one data set hold examples of one shape (raises DataError naming both)."""
    a, b = describe(first), describe(second)
    if a.kind != b.kind or a.shape != b.shape:
        what = "features per step" if a.kind == "sequences" else "image shape (c, h, w)"
        raise DataError(f"the splits disagree: {a.name} has {what} {a.shape} but {b.name} has {b.shape}; "
                        "every split of a data set needs the same")


# ---------------------------------------------------------------------------- batches

# ---------------------------------------------------------------------------- batches


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
    """The order examples are visited in one epoch: a permutation fixed by (seed, epoch)."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batches(
    data: ImageData | SequenceData,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[int, Batch]]:
    """Yield (position, batch) over one epoch, starting at batch `start` (to resume).

    The order depends only on (seed, epoch); with world_size > 1 each global batch of
    batch_size * world_size examples is split into world_size slices and rank r takes slice
    r, so that the ranks together see exactly what one process would see with the global
    batch. Dynamic binarization draws from a generator seeded by (seed, epoch, position), so
    a resumed epoch serves the same pixels. The last, incomplete global batch is dropped.
    """
    order = epoch_order(len(data), seed=seed, epoch=epoch, shuffle=shuffle)
    global_batch = batch_size * world_size
    n_batches = len(data) // global_batch if len(data) >= global_batch else 1
    for position in range(start, n_batches):
        index = order[position * global_batch : (position + 1) * global_batch]
        index = index.tensor_split(world_size)[rank] if world_size > 1 else index
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 100_003 + position)
        yield position, data.batch(index, g)


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    global_batch = batch_size * world_size
    return n // global_batch if n >= global_batch else 1
