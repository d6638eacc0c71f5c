"""Data files: where they live, their checksums and downloads, and their formats.

Data root: the `data_dir` argument (`--data-dir`), else the environment variable
SEQVAE_DATA, else `data/` in the working directory. Files are looked up there:

    binarized_mnist/binarized_mnist_{train,valid,test}.amat[.gz]  Larochelle & Murray (2011)
    mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz          LeCun et al. (1998)
    fashion_mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz  Xiao et al. (2017); also found
                                  in /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist)
    polyphonic/jsb_chorales.pickle                                 Boulanger-Lewandowski et al. (2012)

Every file is checked against its published checksum before use. A missing file is
downloaded from its canonical location when `download=True` (to a temporary name, checked,
then renamed, so nothing half-written is left behind); offline, or with download=False,
a missing or corrupt file raises DataError naming the files expected and the folder searched.

Formats: .amat text rows (`parse_amat`), IDX (`parse_idx`), the JSB pickle through a
restricted unpickler (`read_jsb_pickle`, `piano_roll`), and the .npz of variable-length
sequences that `save_sequences` writes and `read_sequences` reads (no pickle ever loaded).
The data sets built from these files are in data.py.

Dimensions: n examples, t time, d features.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import pickletools
import stat
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_write_bytes

__all__ = [
    "DataError",
    "data_root",
    "fetch",
    "FILES",
    "parse_amat",
    "parse_idx",
    "read_jsb_pickle",
    "piano_roll",
    "save_sequences",
    "read_sequences",
    "PIANO_LOW",
    "PIANO_HIGH",
]

SPLITS = ("train", "valid", "test")
PIANO_LOW, PIANO_HIGH = 21, 108  # MIDI notes of the 88 piano keys


class DataError(Exception):
    """A data set that cannot be read: missing, corrupt, or not what was expected."""



def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder data sets are read from: data_dir, else $SEQVAE_DATA, else ./data.

    A relative $SEQVAE_DATA that does not exist from the working directory is looked up from
    the repository root of a source checkout (the folder above the package), so that the
    README's `SEQVAE_DATA=../shared/data`, set at the root, also works from `notebooks/`.
    """
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("SEQVAE_DATA")
    if not env:
        return Path("data")
    path = Path(env).expanduser()
    if not path.is_absolute() and not path.exists():
        from_root = Path(__file__).resolve().parents[1] / path
        if from_root.exists():
            return from_root
    return path


# ---------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _Remote:
    folder: str
    name: str  # the canonical file name (as downloaded)
    url: str
    digest: str  # hex digest of the *uncompressed* content (md5), or of the file (sha256)
    size: int  # bytes of the uncompressed content: reading stops (and refuses) beyond it
    algorithm: str = "md5"
    accept_gz: bool = False  # also accept NAME.gz (a gzipped copy of the canonical file)

    @property
    def gzipped(self) -> bool:
        return self.name.endswith(".gz")


_LAROCHELLE = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_JSB = "http://www-etud.iro.umontreal.ca/~boulanni/JSB%20Chorales.pickle"

FILES = {
    ("binarized_mnist", "train"): _Remote("binarized_mnist", "binarized_mnist_train.amat", _LAROCHELLE + "binarized_mnist_train.amat", "db28b1a6ae0fe70cbd3da91acf46e477", 78_400_000, accept_gz=True),
    ("binarized_mnist", "valid"): _Remote("binarized_mnist", "binarized_mnist_valid.amat", _LAROCHELLE + "binarized_mnist_valid.amat", "bf37822a04e94123630de6a7dfd9c9ef", 15_680_000, accept_gz=True),
    ("binarized_mnist", "test"): _Remote("binarized_mnist", "binarized_mnist_test.amat", _LAROCHELLE + "binarized_mnist_test.amat", "14e41ae11040adba6ab8cb291eda0dd8", 15_680_000, accept_gz=True),
    ("mnist", "train-images"): _Remote("mnist", "train-images-idx3-ubyte.gz", _MNIST + "train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb", 47_040_016),
    ("mnist", "train-labels"): _Remote("mnist", "train-labels-idx1-ubyte.gz", _MNIST + "train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624", 60_008),
    ("mnist", "test-images"): _Remote("mnist", "t10k-images-idx3-ubyte.gz", _MNIST + "t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea", 7_840_016),
    ("mnist", "test-labels"): _Remote("mnist", "t10k-labels-idx1-ubyte.gz", _MNIST + "t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637", 10_008),
    # Fashion-MNIST: md5 of the uncompressed IDX content (so a recompressed copy, such as the
    # Debian package dataset-fashion-mnist installs, is accepted as well as the download)
    ("fashion_mnist", "train-images"): _Remote("fashion_mnist", "train-images-idx3-ubyte.gz", _FASHION + "train-images-idx3-ubyte.gz", "f4a8712d7a061bf5bd6d2ca38dc4d50a", 47_040_016),
    ("fashion_mnist", "train-labels"): _Remote("fashion_mnist", "train-labels-idx1-ubyte.gz", _FASHION + "train-labels-idx1-ubyte.gz", "9018921c3c673c538a1fc5bad174d6f9", 60_008),
    ("fashion_mnist", "test-images"): _Remote("fashion_mnist", "t10k-images-idx3-ubyte.gz", _FASHION + "t10k-images-idx3-ubyte.gz", "8181f5470baa50b63fa0f6fddb340f0a", 7_840_016),
    ("fashion_mnist", "test-labels"): _Remote("fashion_mnist", "t10k-labels-idx1-ubyte.gz", _FASHION + "t10k-labels-idx1-ubyte.gz", "15d484375f8d13e6eb1aabb0c3f46965", 10_008),
    ("jsb_chorales", "all"): _Remote("polyphonic", "jsb_chorales.pickle", _JSB, "69dc4c3e52800959ac0ab3b82aa3e5f55285ce64f1705acb3e3a8ef77a5c051c", 2_051_809, algorithm="sha256"),
}


# Where a system package installs a data set, searched after the data root.
SYSTEM_FOLDERS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}


def _candidates(root: Path, spec: _Remote) -> list[Path]:
    folders = [root / spec.folder] + ([SYSTEM_FOLDERS[spec.folder]] if spec.folder in SYSTEM_FOLDERS else [])
    names = [spec.name] + ([spec.name + ".gz"] if spec.accept_gz else [])
    return [folder / n for folder in folders for n in names]


def _missing_error(root: Path, specs: list[_Remote], why: str) -> DataError:
    files = "; ".join(
        f"{spec.folder}/{spec.name}" + (f" (or {spec.name}.gz)" if spec.accept_gz else "") + f" from {spec.url}" for spec in specs
    )
    return DataError(
        f"{why}: expected {files}, under {root.resolve()}; put the file(s) there, or point --data-dir / SEQVAE_DATA "
        "at a folder that has them"
    )


def _decompress(path: Path, raw: bytes, limit: int) -> bytes:
    """gunzip raw, streaming, and refuse as soon as the output would pass `limit` bytes (a
    gzip bomb costs at most `limit` bytes of memory, not what it would inflate to)."""
    out, total, data = [], 0, raw
    try:
        while data:  # one gzip member per pass (a file may hold several)
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while not inflater.eof:
                chunk = inflater.decompress(data, 1 << 20)
                data = inflater.unconsumed_tail
                total += len(chunk)
                if total > limit:
                    raise DataError(f"{path} inflates to more than the expected {limit:,} bytes: it is not the published file; "
                                    "delete it and download it again")
                if not chunk and not data and not inflater.eof:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
                out.append(chunk)
            data = inflater.unused_data.lstrip(b"\0")  # (gzip pads some files with zeros after the last member)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is corrupt or truncated ({err}); delete it and download it again") from None
    return b"".join(out)


def _verified(raw: bytes, gzipped: bool, spec: _Remote, where: Path) -> bytes:
    """The (uncompressed) content of a file's bytes, after checking the published checksum."""
    content = _decompress(where, raw, spec.size) if gzipped else raw
    checked = raw if spec.algorithm == "sha256" else content
    digest = hashlib.new(spec.algorithm, checked).hexdigest()
    if digest != spec.digest:
        raise DataError(
            f"{where} does not match its published {spec.algorithm} checksum "
            f"(expected {spec.digest}, got {digest}): the file is corrupt, truncated or a different "
            f"version; delete it and download it again from {spec.url}"
        )
    return content


def _read_bounded(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refused when it is larger than `limit` (never more than limit + 1 read)."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise DataError(f"{path} is not a regular file; expected the published data file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DataError(f"{path} holds more than the {limit:,} bytes expected: it is not the published file; "
                        "delete it and download it again")
    return data


def _read_verified(path: Path, spec: _Remote) -> bytes:
    # a gzipped copy is never larger than its content plus gzip's few bytes per 32 KB block
    return _verified(_read_bounded(path, spec.size + spec.size // 1000 + 4096), path.suffix == ".gz", spec, path)


def _download(spec: _Remote, dest: Path) -> None:
    """Download to a temporary file beside dest, verify, then rename: never a partial file, and
    no folder left behind that the download created."""
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download_into(spec, dest)
    except BaseException:
        for folder in created:  # innermost first; only folders this download made, and only if empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _download_into(spec: _Remote, dest: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        os.fchmod(fd, 0o644)
        from .logs import progress_bar

        limit, received = spec.size + spec.size // 1000 + 4096, 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=60) as response, \
                progress_bar(total=int((getattr(response, "headers", None) or {}).get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                             desc=f"downloading {spec.name}", leave=False, disable=None) as bar:
            while chunk := response.read(1 << 20):
                received += len(chunk)
                if received > limit:
                    raise DataError(f"{spec.url} sent more than the expected {limit:,} bytes: not the published file")
                out.write(chunk)
                bar.update(len(chunk))
        _verified(Path(tmp).read_bytes(), spec.gzipped, spec, Path(spec.url))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(root: Path, specs: list[_Remote], download: bool) -> list[bytes]:
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


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _check_memo(content: bytes, where: str) -> None:
    """Refuse memo indices that no honest pickle uses, before unpickling: the unpickler grows its
    memo table to whatever index a PUT names, so one changed byte in a 108-byte pickle (a
    LONG_BINPUT of index ~2^31) asked for tens of gigabytes. A pickle numbers the objects it
    memoises from 0 and memoises at most one per opcode, so an index never reaches its length.
    The opcodes are only parsed (pickletools), not run."""
    for op, arg, _ in pickletools.genops(content):
        if op.name in _MEMO_OPS and int(arg) >= len(content):
            raise pickle.UnpicklingError(f"refusing a memo index of {arg} in a pickle of {len(content)} bytes")


def read_jsb_pickle(content: bytes, where: str = "JSB pickle") -> dict[str, list[list[tuple[int, ...]]]]:
    """Safely unpickle the JSB chorales: {'train','valid','test'} -> pieces -> steps -> notes."""
    try:
        _check_memo(content, where)
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


def read_sequences(path: str | os.PathLike, split: str) -> tuple[list[Tensor], bool]:
    """One split of an .npz written by `save_sequences` (no pickle is ever loaded): the
    (t_i, d) sequences and whether every value is 0 or 1."""
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
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating) or values.dtype == np.bool_):
        raise DataError(f"{where}: {split!r} must hold real numbers (integer, float or bool), got dtype {values.dtype}")
    tensor = torch.from_numpy(values.astype(np.float32))
    binary = bool(((tensor == 0) | (tensor == 1)).all())
    return list(torch.split(tensor, lengths.tolist())), binary
