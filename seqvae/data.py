"""Data sets, read from their canonical files, and batches in a resumable order.

Dimensions: n examples, b batch, t time, d features, c h w image channels and size.

Data root: the `data_dir` argument (`--data-dir`), else the environment variable
SEQVAE_DATA, else `data/` in the working directory. Files are looked up there:

    binarized_mnist/binarized_mnist_{train,valid,test}.amat[.gz]  Larochelle & Murray (2011)
    mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz          LeCun et al. (1998)
    polyphonic/jsb_chorales.pickle                                 Boulanger-Lewandowski et al. (2012)

Every file is checked against its published checksum before use. A missing file is
downloaded from its canonical location when `download=True` (to a temporary name, checked,
then renamed, so nothing half-written is left behind); offline, or with download=False,
a missing or corrupt file raises DataError naming the files expected and the folder searched.

Data sets (`load_dataset(name, split)`):
    binarized_mnist  the fixed binarization, 50k / 10k / 10k (train / valid / test), 1x28x28
    mnist            dynamic binarization: pixel intensities / 255 are Bernoulli means,
                     drawn afresh each time an image is served; train = the first 50k of the
                     60k training images, valid = the last 10k, train_full = all 60k, test = 10k
    jsb_chorales     88-key piano rolls (MIDI 21..108), 229 / 76 / 77 chorales
    seq_mnist        binarized_mnist as sequences of 28 rows of 28 bits
    npz              your own sequences: `data_path` names an .npz file (see `save_sequences`)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_write_bytes
from .configs import check

__all__ = [
    "DataError",
    "DataConfig",
    "data_root",
    "load_dataset",
    "ImageData",
    "SequenceData",
    "Batch",
    "batches",
    "save_sequences",
    "DATASETS",
    "SPLITS",
    "read_jsb_pickle",
]

DATASETS = ("binarized_mnist", "mnist", "jsb_chorales", "seq_mnist", "npz")
SPLITS = ("train", "valid", "test")
PIANO_LOW, PIANO_HIGH = 21, 108  # MIDI notes of the 88 piano keys


class DataError(Exception):
    """A data set that cannot be read: missing, corrupt, or not what was expected."""


@dataclass
class DataConfig:
    """Which data, where, and how it is batched."""

    name: str = "binarized_mnist"
    data_dir: str | None = None  # None: $SEQVAE_DATA, else data/
    data_path: str | None = None  # the .npz file for name=npz
    batch_size: int = 64
    limit: int | None = None  # use only the first `limit` examples of the training split
    valid_limit: int | None = None  # ... and of the validation split
    download: bool = True

    def validate(self) -> "DataConfig":
        check(self.name in DATASETS, f"data.name must be one of {', '.join(DATASETS)}, got {self.name!r}")
        check(self.batch_size >= 1, f"data.batch_size must be at least 1, got {self.batch_size}")
        check(self.limit is None or self.limit >= 1, f"data.limit must be at least 1 (or none), got {self.limit}")
        check(
            self.valid_limit is None or self.valid_limit >= 1,
            f"data.valid_limit must be at least 1 (or none), got {self.valid_limit}",
        )
        check(self.name != "npz" or bool(self.data_path), "data.name=npz needs data.data_path=FILE.npz")
        return self


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder data sets are read from: data_dir, else $SEQVAE_DATA, else ./data."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("SEQVAE_DATA")
    return Path(env).expanduser() if env else Path("data")


# ---------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _Remote:
    folder: str
    name: str  # the canonical file name (as downloaded)
    url: str
    digest: str  # hex digest of the *uncompressed* content (md5), or of the file (sha256)
    algorithm: str = "md5"
    accept_gz: bool = False  # also accept NAME.gz (a gzipped copy of the canonical file)

    @property
    def gzipped(self) -> bool:
        return self.name.endswith(".gz")


_LAROCHELLE = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_JSB = "http://www-etud.iro.umontreal.ca/~boulanni/JSB%20Chorales.pickle"

_FILES = {
    ("binarized_mnist", "train"): _Remote("binarized_mnist", "binarized_mnist_train.amat", _LAROCHELLE + "binarized_mnist_train.amat", "db28b1a6ae0fe70cbd3da91acf46e477", accept_gz=True),
    ("binarized_mnist", "valid"): _Remote("binarized_mnist", "binarized_mnist_valid.amat", _LAROCHELLE + "binarized_mnist_valid.amat", "bf37822a04e94123630de6a7dfd9c9ef", accept_gz=True),
    ("binarized_mnist", "test"): _Remote("binarized_mnist", "binarized_mnist_test.amat", _LAROCHELLE + "binarized_mnist_test.amat", "14e41ae11040adba6ab8cb291eda0dd8", accept_gz=True),
    ("mnist", "train-images"): _Remote("mnist", "train-images-idx3-ubyte.gz", _MNIST + "train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb"),
    ("mnist", "train-labels"): _Remote("mnist", "train-labels-idx1-ubyte.gz", _MNIST + "train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624"),
    ("mnist", "test-images"): _Remote("mnist", "t10k-images-idx3-ubyte.gz", _MNIST + "t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea"),
    ("mnist", "test-labels"): _Remote("mnist", "t10k-labels-idx1-ubyte.gz", _MNIST + "t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637"),
    ("jsb_chorales", "all"): _Remote("polyphonic", "jsb_chorales.pickle", _JSB, "69dc4c3e52800959ac0ab3b82aa3e5f55285ce64f1705acb3e3a8ef77a5c051c", algorithm="sha256"),
}


def _candidates(root: Path, spec: _Remote) -> list[Path]:
    folder = root / spec.folder
    names = [spec.name] + ([spec.name + ".gz"] if spec.accept_gz else [])
    return [folder / n for n in names]


def _missing_error(root: Path, specs: list[_Remote], why: str) -> DataError:
    files = "; ".join(
        f"{spec.folder}/{spec.name}" + (f" (or {spec.name}.gz)" if spec.accept_gz else "") + f" from {spec.url}" for spec in specs
    )
    return DataError(
        f"{why}: expected {files}, under {root.resolve()}; put the file(s) there, or point --data-dir / SEQVAE_DATA "
        "at a folder that has them"
    )


def _decompress(path: Path, raw: bytes) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is corrupt or truncated ({err}); delete it and download it again") from None


def _verified(raw: bytes, gzipped: bool, spec: _Remote, where: Path) -> bytes:
    """The (uncompressed) content of a file's bytes, after checking the published checksum."""
    content = _decompress(where, raw) if gzipped else raw
    checked = raw if spec.algorithm == "sha256" else content
    digest = hashlib.new(spec.algorithm, checked).hexdigest()
    if digest != spec.digest:
        raise DataError(
            f"{where} does not match its published {spec.algorithm} checksum "
            f"(expected {spec.digest}, got {digest}): the file is corrupt, truncated or a different "
            f"version; delete it and download it again from {spec.url}"
        )
    return content


def _read_verified(path: Path, spec: _Remote) -> bytes:
    return _verified(path.read_bytes(), path.suffix == ".gz", spec, path)


def _download(spec: _Remote, dest: Path) -> None:
    """Download to a temporary file beside dest, verify, then rename: never a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        _verified(Path(tmp).read_bytes(), spec.gzipped, spec, Path(spec.url))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fetch(root: Path, specs: list[_Remote], download: bool) -> list[bytes]:
    """Verified contents of each file, downloading the missing ones if allowed."""
    missing = [s for s in specs if not any(p.exists() for p in _candidates(root, s))]
    if missing:
        if not download:
            raise _missing_error(root, missing, "missing data file(s) and downloading is off")
        for spec in missing:
            try:
                _download(spec, root / spec.folder / spec.name)
            except (urllib.error.URLError, OSError, TimeoutError) as err:
                raise _missing_error(root, missing, f"missing data file(s), and the download failed ({err})") from None
    out = []
    for spec in specs:
        path = next(p for p in _candidates(root, spec) if p.exists())
        out.append(_read_verified(path, spec))
    return out


# ---------------------------------------------------------------------------- parsers


def parse_amat(content: bytes, where: str = "amat file", width: int = 784) -> np.ndarray:
    """Rows of `width` space-separated 0/1 values -> uint8 array (n, width)."""
    arr = np.frombuffer(content, dtype=np.uint8)
    allowed = np.zeros(256, dtype=bool)
    allowed[[ord("0"), ord("1"), ord(" "), ord("\n"), ord("\r"), ord("\t")]] = True
    if not allowed[arr].all():
        raise DataError(f"{where} holds characters other than 0, 1 and whitespace; expected binary .amat rows")
    values = arr[(arr == ord("0")) | (arr == ord("1"))] - ord("0")
    rows = content.count(b"\n") + (0 if content.endswith(b"\n") or not content.strip() else 1)
    if rows == 0 or values.size != rows * width:
        raise DataError(f"{where}: expected rows of {width} values, got {values.size} values on {rows} lines")
    return values.reshape(rows, width)


def parse_idx(content: bytes, where: str, expect_dims: int) -> np.ndarray:
    """An IDX file (LeCun's MNIST format) of unsigned bytes -> uint8 array."""
    if len(content) < 4 or content[:2] != b"\x00\x00" or content[2] != 0x08 or content[3] != expect_dims:
        raise DataError(f"{where} is not an IDX file of unsigned bytes with {expect_dims} dimension(s)")
    dims = [int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(expect_dims)]
    size = int(np.prod(dims))
    body = content[4 + 4 * expect_dims :]
    if len(body) != size:
        raise DataError(f"{where}: header says {dims} ({size} bytes), file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


class _IntDType:
    """Stands in for numpy.dtype while unpickling: accepts only integer type codes."""

    _CODES = {"i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"}

    def __init__(self, code: str, align: bool = False, copy: bool = True):
        if code not in self._CODES:
            raise pickle.UnpicklingError(f"refusing numpy dtype {code!r}: only integer scalars are allowed")
        self.size = int(code[1])
        self.signed = code[0] == "i"
        self.byteorder = "little"

    def __setstate__(self, state: tuple) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "<"
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"unexpected byte order {order!r} in a pickled dtype")
        self.byteorder = "big" if order == ">" else "little"


def _int_scalar(dtype: _IntDType, data: bytes | str) -> int:
    """Stands in for numpy's scalar reconstructor: decodes an integer, nothing else."""
    if not isinstance(dtype, _IntDType):
        raise pickle.UnpicklingError("a numpy scalar must come with an integer dtype")
    raw = data.encode("latin1") if isinstance(data, str) else bytes(data)
    if len(raw) != dtype.size:
        raise pickle.UnpicklingError("a pickled integer scalar has the wrong number of bytes")
    return int.from_bytes(raw, dtype.byteorder, signed=dtype.signed)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stands in for _codecs.encode, which Python 3 pickles use to store bytes: latin-1 only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("refusing _codecs.encode other than a string to latin-1 bytes")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers (dict, list, tuple), strings and integers only.

    Pickles of note lists (like the canonical JSB file) store notes as numpy integer scalars;
    those globals (and the latin-1 byte encoding Python 3 pickles use for them) are answered
    by our own decoders above, never by numpy. Any other global (a class, a function such as
    os.system) is refused, so loading never runs code named by the file.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "scalar"): _int_scalar,
        ("numpy._core.multiarray", "scalar"): _int_scalar,
        ("numpy", "dtype"): _IntDType,
        ("_codecs", "encode"): _latin1_bytes,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: this pickle may only hold plain containers and integers"
            ) from None


def read_jsb_pickle(content: bytes, where: str = "JSB pickle") -> dict[str, list[list[tuple[int, ...]]]]:
    """Safely unpickle the JSB chorales: {'train','valid','test'} -> pieces -> steps -> notes."""
    try:
        data = _RestrictedUnpickler(io.BytesIO(content), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        if str(err).startswith("refusing"):
            raise DataError(f"{where}: {err}") from None
        raise DataError(f"{where} is not a readable pickle ({err})") from None
    except Exception as err:  # truncated or malformed streams raise many kinds of error
        raise DataError(f"{where} is not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not set(SPLITS) <= set(data):
        raise DataError(f"{where}: expected a dict with keys {', '.join(SPLITS)}")
    out = {}
    for split in SPLITS:
        pieces = data[split]
        if not isinstance(pieces, list) or not pieces:
            raise DataError(f"{where}: split {split!r} must be a non-empty list of pieces")
        clean = []
        for piece in pieces:
            if not isinstance(piece, (list, tuple)) or not piece:
                raise DataError(f"{where}: every piece must be a non-empty list of time steps")
            steps = []
            for step in piece:
                if not isinstance(step, (list, tuple)) or not all(
                    isinstance(n, int) and not isinstance(n, bool) for n in step
                ):
                    raise DataError(f"{where}: every time step must be a tuple of integer MIDI notes")
                if any(n < PIANO_LOW or n > PIANO_HIGH for n in step):
                    raise DataError(f"{where}: notes must lie in MIDI {PIANO_LOW}..{PIANO_HIGH} (the 88 piano keys)")
                steps.append(tuple(step))
            clean.append(steps)
        out[split] = clean
    return out


def piano_roll(piece: list[tuple[int, ...]]) -> Tensor:
    """A piece (list of note tuples) -> (t, 88) binary piano roll, key k = MIDI note 21 + k."""
    roll = torch.zeros(len(piece), PIANO_HIGH - PIANO_LOW + 1)
    for t, notes in enumerate(piece):
        for n in notes:
            roll[t, n - PIANO_LOW] = 1.0
    return roll


# ---------------------------------------------------------------------------- data sets


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


def _binarized_mnist(root: Path, split: str, download: bool) -> np.ndarray:
    spec = _FILES[("binarized_mnist", split)]
    (content,) = _fetch(root, [spec], download)
    return parse_amat(content, where=f"{spec.folder}/{spec.name}")


def _mnist(root: Path, split: str, download: bool) -> np.ndarray:
    part = "test" if split == "test" else "train"
    spec = _FILES[("mnist", f"{part}-images")]
    (content,) = _fetch(root, [spec], download)
    images = parse_idx(content, f"{spec.folder}/{spec.name}", 3)
    return {"train": images[:50000], "valid": images[50000:], "train_full": images, "test": images}[split]


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
    download: bool = True,
) -> ImageData | SequenceData:
    """A data set split by name (see the module docstring)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")
    splits = SPLITS + (("train_full",) if name == "mnist" else ())
    if split not in splits:
        raise DataError(f"unknown split {split!r} for {name}: expected one of {', '.join(splits)}")
    root = data_root(data_dir)
    if name == "binarized_mnist":
        images = _binarized_mnist(root, split, download)
        return ImageData(torch.from_numpy(images.copy()).view(-1, 1, 28, 28), binarize="fixed", name=f"{name}/{split}")
    if name == "mnist":
        images = _mnist(root, split, download)
        return ImageData(torch.from_numpy(images.copy()).view(-1, 1, 28, 28), binarize="dynamic", name=f"{name}/{split}")
    if name == "seq_mnist":
        rows = torch.from_numpy(_binarized_mnist(root, split, download).copy()).float().view(-1, 28, 28)
        return SequenceData(list(rows.unbind(0)), name=f"{name}/{split}", binary=True)
    if name == "jsb_chorales":
        spec = _FILES[("jsb_chorales", "all")]
        (content,) = _fetch(root, [spec], download)
        pieces = read_jsb_pickle(content, where=f"{spec.folder}/{spec.name}")[split]
        return SequenceData([piano_roll(p) for p in pieces], name=f"{name}/{split}", binary=True)
    if not data_path:
        raise DataError("the npz data set needs a file: pass data_path (--data.data_path=FILE.npz)")
    return load_sequences(data_path, split)


def save_sequences(path: str | os.PathLike, splits: dict[str, list[np.ndarray]]) -> None:
    """Write variable-length (t, d) arrays per split as an .npz that `load_dataset('npz')` reads.

    Layout: for each split S, `S` is the sequences concatenated along time, (sum t, d), and
    `S_lengths` their lengths. No pickled objects: it loads with allow_pickle=False.
    """
    arrays = {}
    for split, seqs in splits.items():
        seqs = [np.asarray(s, dtype=np.float32) for s in seqs]
        arrays[split] = np.concatenate(seqs, axis=0)
        arrays[f"{split}_lengths"] = np.array([len(s) for s in seqs], dtype=np.int64)
    path = Path(path)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_sequences(path: str | os.PathLike, split: str) -> SequenceData:
    """Read one split of an .npz written by `save_sequences` (no pickle is ever loaded)."""
    path = Path(path)
    where = f"{path}"
    if not path.exists():
        raise DataError(f"{where} does not exist; expected an .npz written by seqvae.data.save_sequences")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if split not in keys or f"{split}_lengths" not in keys:
                raise DataError(
                    f"{where} has no split {split!r}: expected arrays {split!r} (time steps concatenated, "
                    f"shape (total_time, features)) and {split + '_lengths'!r}; found {sorted(keys)}"
                )
            values, lengths = npz[split], npz[f"{split}_lengths"]
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{where} is not a readable .npz file ({type(err).__name__}: {err})") from None
    if values.ndim != 2 or lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise DataError(f"{where}: {split!r} must be (total_time, features) and its lengths a 1-D integer array")
    if (lengths <= 0).any():
        raise DataError(f"{where}: every sequence needs a positive length; {split}_lengths holds {lengths.min()}")
    if lengths.sum() != values.shape[0]:
        raise DataError(f"{where}: {split}_lengths add up to {lengths.sum()} but {split!r} has {values.shape[0]} steps")
    if not np.issubdtype(values.dtype, np.number):
        raise DataError(f"{where}: {split!r} must hold numbers, got dtype {values.dtype}")
    tensor = torch.from_numpy(values.astype(np.float32))
    seqs = list(torch.split(tensor, lengths.tolist()))
    binary = bool(((tensor == 0) | (tensor == 1)).all())
    return SequenceData(seqs, name=f"{path.name}/{split}", binary=binary)


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
