"""Data readers: canonical formats, checksums, safe unpickling, clear errors, resumable order."""

import gzip
import io
import os
import pickle
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from seqvae import data as D
from seqvae import datafiles as DF


def test_real_data_sets_have_their_published_sizes(data_dir):
    sizes = {("binarized_mnist", "train"): 50000, ("binarized_mnist", "valid"): 10000, ("binarized_mnist", "test"): 10000,
             ("mnist", "train"): 50000, ("mnist", "valid"): 10000, ("mnist", "test"): 10000, ("mnist", "train_full"): 60000,
             ("jsb_chorales", "train"): 229, ("jsb_chorales", "valid"): 76, ("jsb_chorales", "test"): 77}
    for (name, split), n in sizes.items():
        d = D.load_dataset(name, split, data_dir=data_dir, download=False)
        assert len(d) == n, (name, split)
    img = D.load_dataset("binarized_mnist", "test", data_dir=data_dir, download=False)
    assert img.image_shape == (1, 28, 28) and set(img.images.unique().tolist()) == {0, 1}
    jsb = D.load_dataset("jsb_chorales", "test", data_dir=data_dir, download=False)
    assert jsb.x_dim == 88 and int(jsb.lengths.sum()) == 4725
    seq = D.load_dataset("seq_mnist", "valid", data_dir=data_dir, download=False)
    assert seq.x_dim == 28 and len(seq) == 10000 and bool((seq.lengths == 28).all())


def test_dynamic_binarization_draws_afresh_but_reproducibly(data_dir):
    d = D.load_dataset("mnist", "test", data_dir=data_dir, download=False)
    idx = torch.arange(8)
    a = d.batch(idx, torch.Generator().manual_seed(1)).x
    b = d.batch(idx, torch.Generator().manual_seed(2)).x
    c = d.batch(idx, torch.Generator().manual_seed(1)).x
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(a, b) and torch.equal(a, c)
    # the draws follow the intensities: a pixel at 255 is always on, at 0 always off
    raw = d.images[idx].float() / 255
    assert bool((a[raw == 1] == 1).all()) and bool((a[raw == 0] == 0).all())


def test_parse_amat_and_its_errors():
    good = b"0 1 1\n1 0 0\n"
    assert DF.parse_amat(good, width=3).tolist() == [[0, 1, 1], [1, 0, 0]]
    with pytest.raises(D.DataError, match="rows of 3 values"):
        DF.parse_amat(b"0 1 1\n1 0\n", width=3)
    with pytest.raises(D.DataError, match="other than 0, 1"):
        DF.parse_amat(b"0 1 2\n", width=3)


def test_parse_idx_and_its_errors():
    body = bytes(range(6))
    content = b"\x00\x00\x08\x03" + (1).to_bytes(4, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + body
    assert DF.parse_idx(content, "x", 3).shape == (1, 2, 3)
    with pytest.raises(D.DataError, match="header says"):
        DF.parse_idx(content[:-1], "x", 3)
    with pytest.raises(D.DataError, match="not an IDX file"):
        DF.parse_idx(b"\x00\x00\x0d\x03" + content[4:], "x", 3)


def _copy_tree(src: Path, dst: Path, folder: str) -> Path:
    shutil.copytree(src / folder, dst / folder)
    return dst


def test_missing_file_offline_names_files_and_folder(tmp_path, no_network):
    with pytest.raises(D.DataError) as info:
        D.load_dataset("binarized_mnist", "train", data_dir=tmp_path, download=True)
    message = str(info.value)
    assert "binarized_mnist/binarized_mnist_train.amat" in message and str(tmp_path.resolve()) in message
    assert "download failed" in message and "http" in message
    assert not any(tmp_path.rglob("*.part"))  # nothing half-written left behind
    assert not (tmp_path / "binarized_mnist").exists()  # nor the empty folder the download made
    with pytest.raises(D.DataError, match="downloading is off"):
        D.load_dataset("mnist", "test", data_dir=tmp_path, download=False)


def test_truncated_gzip_and_wrong_checksum_are_refused(tmp_path, data_dir):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    raw = (data_dir / "binarized_mnist" / "binarized_mnist_valid.amat.gz").read_bytes()
    (folder / "binarized_mnist_valid.amat.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DataError, match="corrupt or truncated"):
        D.load_dataset("binarized_mnist", "valid", data_dir=tmp_path, download=False)
    (folder / "binarized_mnist_valid.amat.gz").unlink()
    (folder / "binarized_mnist_valid.amat").write_bytes(b"0 1\n" * 10)
    with pytest.raises(D.DataError, match="does not match its published md5 checksum"):
        D.load_dataset("binarized_mnist", "valid", data_dir=tmp_path, download=False)


def test_plain_amat_is_accepted(tmp_path, data_dir):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    content = gzip.decompress((data_dir / "binarized_mnist" / "binarized_mnist_test.amat.gz").read_bytes())
    (folder / "binarized_mnist_test.amat").write_bytes(content)
    assert len(D.load_dataset("binarized_mnist", "test", data_dir=tmp_path, download=False)) == 10000


def test_download_is_verified_and_atomic(tmp_path, data_dir, monkeypatch):
    good = (data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    served = {"payload": good[:1000]}  # first a corrupt download, then the real file

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Response(served["payload"]))
    with pytest.raises(D.DataError):
        D.load_dataset("mnist", "test", data_dir=tmp_path)
    assert not (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    assert not list((tmp_path / "mnist").glob("*.part"))
    served["payload"] = good
    assert len(D.load_dataset("mnist", "test", data_dir=tmp_path)) == 10000
    assert (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes() == good


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQVAE_DATA", str(tmp_path))
    assert D.data_root() == tmp_path
    assert D.data_root("elsewhere") == Path("elsewhere")
    monkeypatch.delenv("SEQVAE_DATA")
    assert D.data_root() == Path("data")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_jsb_reader_refuses_pickles_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = pickle.dumps({"train": [[(60,)]], "valid": [[(60,)]], "test": [_Evil()]}, protocol=2)
    with pytest.raises(D.DataError, match="refusing to load posix.system|refusing to load os.system"):
        DF.read_jsb_pickle(evil)
    assert not (tmp_path / "pwned-by-pickle").exists()
    # a float dtype, or anything but plain containers and integers, is refused too
    with pytest.raises(D.DataError, match="refusing"):
        DF.read_jsb_pickle(pickle.dumps({"train": [[(np.float64(60.0),)]]}, protocol=2))
    with pytest.raises(D.DataError, match="keys"):
        DF.read_jsb_pickle(pickle.dumps([1, 2, 3]))
    with pytest.raises(D.DataError, match="MIDI 21..108"):
        DF.read_jsb_pickle(pickle.dumps({s: [[(10,)]] for s in D.SPLITS}))
    with pytest.raises(D.DataError, match="not a readable pickle"):
        DF.read_jsb_pickle(pickle.dumps({s: [[(60,)]] for s in D.SPLITS})[:-5])


def test_jsb_reader_reads_numpy_int_pickles_without_numpy_objects():
    content = pickle.dumps({s: [[(np.int64(60), np.int64(64)), (), (np.int32(21),)]] for s in D.SPLITS}, protocol=2)
    out = DF.read_jsb_pickle(content)
    assert out["train"] == [[(60, 64), (), (21,)]]
    assert all(type(n) is int for n in out["train"][0][0])
    roll = DF.piano_roll(out["train"][0])
    assert roll.shape == (3, 88) and roll[0, 60 - 21] == 1 and roll[1].sum() == 0 and roll[2, 0] == 1


def test_npz_round_trip_and_errors(tmp_path):
    seqs = [np.random.rand(n, 3).astype(np.float32) for n in (4, 7, 1)]
    path = tmp_path / "mine.npz"
    D.save_sequences(path, {"train": seqs, "valid": seqs[:1]})
    d = D.load_dataset("npz", "train", data_path=path)
    assert len(d) == 3 and d.lengths.tolist() == [4, 7, 1] and d.x_dim == 3 and not d.binary
    torch.testing.assert_close(d.sequences[1], torch.from_numpy(seqs[1]))
    batch = d.batch(torch.tensor([0, 1]))
    assert batch.x.shape == (2, 7, 3) and batch.lengths.tolist() == [4, 7]
    with pytest.raises(D.DataError, match="no split 'test'"):
        D.load_dataset("npz", "test", data_path=path)
    np.savez(tmp_path / "bad.npz", train=np.zeros((5, 2)), train_lengths=np.array([2, 2]))
    with pytest.raises(D.DataError, match="add up to 4"):
        D.load_dataset("npz", "train", data_path=tmp_path / "bad.npz")
    np.savez(tmp_path / "nan.npz", train=np.full((2, 2), np.nan), train_lengths=np.array([2]))
    with pytest.raises(D.DataError, match="NaN"):
        D.load_dataset("npz", "train", data_path=tmp_path / "nan.npz")
    np.savez(tmp_path / "zero.npz", train=np.zeros((2, 2)), train_lengths=np.array([2, 0]))
    with pytest.raises(D.DataError, match="positive length"):
        D.load_dataset("npz", "train", data_path=tmp_path / "zero.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(D.DataError, match="not a readable"):
        D.load_dataset("npz", "train", data_path=tmp_path / "garbage.npz")


def test_unknown_names_and_empty_sets():
    with pytest.raises(D.DataError, match="unknown data set 'cifar'"):
        D.load_dataset("cifar", "train")
    with pytest.raises(D.DataError, match="unknown split"):
        D.load_dataset("binarized_mnist", "dev")
    with pytest.raises(D.DataError, match="empty"):
        D.ImageData(torch.zeros(0, 1, 2, 2, dtype=torch.uint8), binarize="fixed", name="none")


def test_batches_resume_and_shard():
    d = D.ImageData(torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1), binarize="fixed", name="toy")
    full = [(p, b.x.flatten().tolist()) for p, b in D.batches(d, 8, seed=3, epoch=2)]
    assert len(full) == 5 and sorted(sum((v for _, v in full), [])) == list(range(40))
    resumed = [(p, b.x.flatten().tolist()) for p, b in D.batches(d, 8, seed=3, epoch=2, start=3)]
    assert resumed == full[3:]
    other_epoch = [b.x.flatten().tolist() for _, b in D.batches(d, 8, seed=3, epoch=3)]
    assert other_epoch != [v for _, v in full]
    # two ranks with half the batch each see exactly what one process sees
    halves = [[b.x.flatten().tolist() for _, b in D.batches(d, 4, seed=3, epoch=2, rank=r, world_size=2)] for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == [v for _, v in full]


def test_jsb_reader_refuses_a_memo_index_that_would_allocate_gigabytes():
    """One changed byte (BINPUT -> LONG_BINPUT) turns the next four bytes into a memo index near
    2^31: the unpickler would grow its memo table to it (tens of gigabytes; a property test once
    got a test process killed for memory). Refused before unpickling, from the opcodes alone."""
    good = pickle.dumps({s: [[(60, 64)], [(21,), ()]] for s in D.SPLITS}, protocol=2)
    at = good.index(b"q")  # the first BINPUT
    bad = good[:at] + b"r" + good[at + 1 :]
    with pytest.raises(D.DataError, match="memo index"):
        DF.read_jsb_pickle(bad)
