"""Property-based tests (hypothesis) of the data readers and the config parser: round trips,
and arbitrary input only ever produces the readers' own clear errors."""

import pickle

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqvae import data as D
from seqvae import datafiles as DF
from seqvae.configs import ConfigError, apply_override, parse_value
from seqvae.draw import DrawConfig
from seqvae.train import TrainConfig

FAST = settings(max_examples=150, deadline=None)


@FAST
@given(st.lists(st.lists(st.integers(0, 1), min_size=5, max_size=5), min_size=1, max_size=20))
def test_amat_round_trip(rows):
    text = "".join(" ".join(map(str, r)) + "\n" for r in rows).encode()
    assert DF.parse_amat(text, width=5).tolist() == rows


@FAST
@given(st.binary(max_size=200))
def test_amat_reader_raises_only_data_errors(blob):
    try:
        DF.parse_amat(blob, width=4)
    except D.DataError:
        pass


@FAST
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.data())
def test_idx_round_trip(dims, draw):
    values = np.array(draw.draw(st.lists(st.integers(0, 255), min_size=int(np.prod(dims)), max_size=int(np.prod(dims)))), dtype=np.uint8)
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    out = DF.parse_idx(header + values.tobytes(), "x", len(dims))
    assert out.shape == tuple(dims) and out.flatten().tolist() == values.tolist()


@FAST
@given(st.binary(max_size=300), st.integers(1, 3))
def test_idx_reader_raises_only_data_errors(blob, dims):
    try:
        DF.parse_idx(blob, "x", dims)
    except D.DataError:
        pass


notes = st.lists(st.integers(21, 108), max_size=4).map(tuple)
pieces = st.lists(st.lists(notes, min_size=1, max_size=6), min_size=1, max_size=3)


@FAST
@given(st.fixed_dictionaries({s: pieces for s in D.SPLITS}), st.sampled_from([0, 2, 4]), st.booleans())
def test_jsb_reader_round_trip(content, protocol, numpy_ints):
    if numpy_ints:
        content = {s: [[tuple(np.int64(n) for n in step) for step in p] for p in ps] for s, ps in content.items()}
    out = DF.read_jsb_pickle(pickle.dumps(content, protocol=protocol))
    assert out == {s: [[tuple(int(n) for n in step) for step in p] for p in ps] for s, ps in content.items()}


@FAST
@given(st.binary(max_size=300))
def test_jsb_reader_raises_only_data_errors(blob):
    try:
        DF.read_jsb_pickle(blob)
    except D.DataError:
        pass


@FAST
@given(st.data())
def test_jsb_reader_on_mutated_pickles(draw):
    good = pickle.dumps({s: [[(60, 64)], [(21,), ()]] for s in D.SPLITS}, protocol=2)
    i = draw.draw(st.integers(0, len(good) - 1))
    byte = draw.draw(st.integers(0, 255))
    try:
        DF.read_jsb_pickle(good[:i] + bytes([byte]) + good[i + 1 :])
    except D.DataError:
        pass


@FAST
@given(st.lists(st.lists(st.lists(st.floats(-1e6, 1e6, width=32), min_size=3, max_size=3), min_size=1, max_size=8), min_size=1, max_size=5))
def test_npz_round_trip(tmp_path_factory, seqs):
    path = tmp_path_factory.mktemp("npz") / "s.npz"
    arrays = [np.array(s, dtype=np.float32) for s in seqs]
    D.save_sequences(path, {"train": arrays})
    loaded = D.load_dataset("npz", "train", data_path=path)
    assert [s.shape[0] for s in loaded.sequences] == [len(s) for s in seqs]
    for a, b in zip(loaded.sequences, arrays):
        assert torch.equal(a, torch.from_numpy(b))


@FAST
@given(st.integers(-10**9, 10**9), st.floats(allow_nan=False, allow_infinity=False), st.booleans())
def test_parse_value_round_trips(i, f, b):
    assert parse_value(str(i), int, "k") == i
    assert parse_value(repr(f), float, "k") == f
    assert parse_value(str(b).lower(), bool, "k") is b


@FAST
@given(st.text(max_size=30), st.text(max_size=30))
def test_overrides_raise_only_config_errors(key, value):
    for cfg in (DrawConfig(), TrainConfig()):
        try:
            out = apply_override(cfg, f"{key}={value}")
        except ConfigError:
            continue
        assert type(out) is type(cfg)


@FAST
@given(st.sampled_from(["steps", "hidden_size", "z_size", "read_size", "write_size"]), st.integers(-5, 40))
def test_validation_rejects_out_of_range_sizes(key, n):
    cfg = apply_override(DrawConfig(), f"{key}={n}")
    ok = n >= 1 and (key not in ("read_size", "write_size") or n <= 28)
    try:
        cfg.validate()
        assert ok
    except ConfigError:
        assert not ok
