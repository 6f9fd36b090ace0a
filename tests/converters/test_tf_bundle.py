"""TensorBundle reader/writer and object-graph resolution, against committed fixtures and TF."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptfmt.converters.tf import (
    TFCheckpointReader,
    build_object_graph,
    latest_checkpoint,
    read_object_graph,
    write_checkpoint,
)
from ckptfmt.converters.tf.object_graph import CheckpointObjectGraph, split_object_path
from ckptfmt.errors import (
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    TensorNotFoundError,
    UnsupportedDtypeError,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "tf"
FIXTURE_NAMES = ["all_dtypes", "keras3_conv_adam", "keras3_seq_sgdm", "tf_module", "v1_partitioned"]


def fixture_prefix(name: str) -> str:
    return str(FIXTURES / name / json.loads((FIXTURES / name / "expected.json").read_text())["prefix"])


def digest(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    if arr.dtype == object:
        for item in arr.reshape(-1):
            h.update(len(item).to_bytes(8, "little"))
            h.update(item)
    else:
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def as_array(value) -> np.ndarray:
    return np.array(value, dtype=object) if isinstance(value, bytes) else np.asarray(value)


def assert_identical(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    if ours.dtype == object:
        assert theirs.dtype == object
        assert list(ours.reshape(-1)) == list(theirs.reshape(-1))
    else:
        assert ours.dtype == theirs.dtype
        assert ours.tobytes() == theirs.tobytes()


@pytest.fixture(scope="session")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    out: dict[str, np.ndarray] = {}
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                 "uint8", "uint16", "uint32", "uint64", "complex64", "complex128"):
        out[f"dt/{name}"] = (rng.standard_normal((3, 5)) * 100).astype(name)
    out["dt/bfloat16"] = rng.standard_normal((4,)).astype(ml_dtypes.bfloat16)
    out["dt/bool"] = rng.integers(0, 2, (7,)).astype(bool)
    out["dt/string"] = np.array([[b"", b"x"], [b"\x00\xff" * 300, "ü".encode()]], dtype=object)
    out["dt/string_scalar"] = np.array(b"abc\x00", dtype=object)
    out["dt/string_empty"] = np.zeros((0,), dtype=object)
    out["shape/scalar"] = np.array(1.25, dtype=np.float32)
    out["shape/empty"] = np.zeros((2, 0, 3), dtype=np.int32)
    out["shape/big"] = rng.standard_normal((64, 128)).astype(np.float32)
    return out


# ------------------------------------------------------------------ fixtures vs expectations


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_matches_committed_expectations(name):
    expected = json.loads((FIXTURES / name / "expected.json").read_text())["keys"]
    reader = TFCheckpointReader(fixture_prefix(name))
    assert sorted(reader.keys()) == sorted(expected)
    for key, exp in expected.items():
        value = reader.get(key)
        assert ("string" if value.dtype == object else value.dtype.name) == exp["dtype"], key
        assert list(value.shape) == exp["shape"] == list(reader.shape(key)), key
        assert digest(value) == exp["sha256"], key


@pytest.mark.tensorflow
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_matches_tensorflow(tf, name):
    prefix = fixture_prefix(name)
    theirs = tf.train.load_checkpoint(prefix)
    ours = TFCheckpointReader(prefix)
    assert sorted(ours.keys()) == sorted(theirs.get_variable_to_shape_map())
    for key in ours.keys():
        assert_identical(ours.get(key), as_array(theirs.get_tensor(key)))


def test_directory_uses_checkpoint_state_file():
    r = TFCheckpointReader(FIXTURES / "tf_module")
    assert r.prefix == str(FIXTURES / "tf_module" / "ckpt-1")
    assert latest_checkpoint(FIXTURES / "v1_partitioned") == str(FIXTURES / "v1_partitioned" / "model.ckpt-5")


def test_partitioned_and_sharded_fixture():
    r = TFCheckpointReader(fixture_prefix("v1_partitioned"))
    assert r.header.num_shards == 2
    entry = r.entry("emb")
    assert entry.slices and entry.shape == (10, 3)
    assert r.get("emb").shape == (10, 3)
    assert r.entry("dense/bias").shard == 1
    assert r.get("counter") == 42
    np.testing.assert_array_equal(r.get("dense/bias"), np.arange(6, dtype=np.float32))


def test_metadata_api():
    r = TFCheckpointReader(fixture_prefix("all_dtypes"))
    assert r.dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    assert r.dtype("string_vec") == np.dtype(object)
    e = r.entry("float32")
    assert (e.dtype, e.shape, e.shard) == ("float32", (3, 4), 0)
    assert "float32" in r and "nope" not in r
    with pytest.raises(TensorNotFoundError, match="nope"):
        r.get("nope")
    assert set(r.read_all()) == set(r.keys())


# ------------------------------------------------------------------------------ writing


def test_roundtrip_ours(tmp_path):
    tensors = sample_tensors()
    prefix = write_checkpoint(tmp_path / "ck" / "ckpt-1", tensors, update_state=True)
    r = TFCheckpointReader(tmp_path / "ck")
    assert r.prefix == prefix
    for k, v in tensors.items():
        assert_identical(r.get(k), v)


@pytest.mark.tensorflow
def test_tensorflow_reads_what_we_write(tf, tmp_path):
    tensors = sample_tensors()
    # Enough keys to span several index blocks.
    tensors.update({f"many/{i:04d}/long_variable_name": np.full((2,), i, np.int64) for i in range(600)})
    prefix = write_checkpoint(str(tmp_path / "ckpt"), tensors)
    assert os.path.getsize(prefix + ".index") > 3 * 8192
    theirs = tf.train.load_checkpoint(prefix)
    assert sorted(theirs.get_variable_to_shape_map()) == sorted(tensors)
    for k, v in tensors.items():
        assert_identical(as_array(theirs.get_tensor(k)), v)


dtypes = st.sampled_from(["float16", "float32", "float64", "int8", "int32", "int64", "uint16",
                          "uint64", "bool", "complex64", "bfloat16", "string"])
shapes = st.lists(st.integers(0, 4), max_size=4).map(tuple)


@settings(max_examples=40)
@given(dt=dtypes, shape=shapes, seed=st.integers(0, 2**16))
def test_roundtrip_property(tmp_path_factory, dt, shape, seed):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) if shape else 1
    if dt == "string":
        value = np.array([rng.bytes(int(rng.integers(0, 200))) for _ in range(n)] + [b""], dtype=object)[:n]
        value = value.reshape(shape)
    elif dt == "bfloat16":
        value = rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    else:
        value = (rng.standard_normal(shape) * 50).astype(dt)
    prefix = str(tmp_path_factory.mktemp("prop") / "ck")
    write_checkpoint(prefix, {"t": value})
    assert_identical(TFCheckpointReader(prefix).get("t"), value)


def test_writer_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(UnsupportedDtypeError):
        write_checkpoint(tmp_path / "ck", {"x": np.array([1], dtype="datetime64[s]")})


# ------------------------------------------------------------------------- object graph


def test_keras3_object_graph_resolves_layers_and_slots():
    r = TFCheckpointReader(fixture_prefix("keras3_conv_adam"))
    g = read_object_graph(r)
    variables = json.loads((FIXTURES / "keras3_conv_adam" / "expected.json").read_text())["variables"]
    conv_kernel_key = variables["model"]["conv/kernel"]["keys"][0]
    info = g.info(conv_kernel_key)
    assert info.path == "model/_operations/1/_kernel"
    assert "optimizer/_trainable_variables/0" in info.aliases
    assert info.full_name == "conv/kernel" and info.attribute == "VARIABLE_VALUE"
    assert g.info("model/_operations/2/moving_mean/.ATTRIBUTES/VARIABLE_VALUE").path.startswith("model/_operations/2/")
    # Every Adam slot maps to the model variable Keras named it after.
    for opt_path, rec in variables["optimizer"].items():
        key = rec["keys"][0]
        slot = g.info(key).slot
        if opt_path.endswith(("_momentum", "_velocity")):
            var_name, slot_name = opt_path.split("/", 1)[1].rsplit("_", 1)
            assert slot is not None and slot.slot_name == slot_name
            var_path = next(p for p in variables["model"] if p.replace("/", "_") == var_name)
            assert slot.variable_key == variables["model"][var_path]["keys"][0]
        else:
            assert slot is None
    assert set(g.slots_of(conv_kernel_key)) == {"momentum", "velocity"}


def test_keras3_sgd_momentum_slots():
    g = read_object_graph(TFCheckpointReader(fixture_prefix("keras3_seq_sgdm")))
    slots = [i for i in g.resolve().values() if i.slot]
    assert len(slots) == 9 and {i.slot.slot_name for i in slots} == {"momentum"}
    lstm = [i for i in g.resolve().values() if i.full_name == "sequential/lstm/lstm_cell/kernel"][0]
    assert lstm.path == "model/_functional/_operations/2/cell/kernel"
    assert list(g.slots_of(lstm.key)) == ["momentum"]


def test_tf_module_and_legacy_slots():
    g = read_object_graph(TFCheckpointReader(fixture_prefix("tf_module")))
    key = "model/layer_with_weights-0/w/.OPTIMIZER_SLOT/optimizer/v/.ATTRIBUTES/VARIABLE_VALUE"
    info = g.info(key)
    assert info.slot.slot_name == "v"
    assert info.slot.variable_key == "model/layer_with_weights-0/w/.ATTRIBUTES/VARIABLE_VALUE"
    assert info.slot.optimizer_path == "optimizer"
    w = g.info("model/layer_with_weights-0/w/.ATTRIBUTES/VARIABLE_VALUE")
    assert set(w.aliases) == {"model/layer_with_weights-0/w", "model/blocks/0/w"}
    assert g.info("model/blocks/1/b/.ATTRIBUTES/VARIABLE_VALUE").path == "model/blocks/1/b"
    assert g.slots_of("model/scale/.ATTRIBUTES/VARIABLE_VALUE") == {
        "m": "model/scale/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE",
        "v": "model/scale/.OPTIMIZER_SLOT/optimizer/v/.ATTRIBUTES/VARIABLE_VALUE",
    }


def test_v1_checkpoint_has_no_object_graph():
    with pytest.raises(TensorNotFoundError, match="name-based"):
        read_object_graph(TFCheckpointReader(fixture_prefix("v1_partitioned")))


def test_object_graph_reserializes_identically():
    r = TFCheckpointReader(fixture_prefix("keras3_conv_adam"))
    raw = r.get("_CHECKPOINTABLE_OBJECT_GRAPH").item()
    assert read_object_graph(r).to_bytes() == raw


def test_build_object_graph_and_split():
    assert split_object_path("a/b..c/d./e/.ATTRIBUTES/X") == ["a", "b.c", "d/e", ".ATTRIBUTES", "X"]
    keys = ["model/w/.ATTRIBUTES/VARIABLE_VALUE",
            "model/w/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"]
    g = CheckpointObjectGraph.from_bytes(build_object_graph(keys))
    assert g.info(keys[1]).slot.variable_key == keys[0]


@pytest.mark.tensorflow
def test_tensorflow_restores_our_checkpoint_with_built_graph(tf, tmp_path):
    class Net(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.zeros((2, 3)))
            self.inner = tf.Module()
            self.inner.b = tf.Variable(tf.zeros((3,), tf.float64))

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1.5, -2.0, 3.0])
    tensors = {"model/w/.ATTRIBUTES/VARIABLE_VALUE": w, "model/inner/b/.ATTRIBUTES/VARIABLE_VALUE": b}
    prefix = write_checkpoint(tmp_path / "ckpt-1", tensors, object_graph=build_object_graph(tensors))
    net = Net()
    tf.train.Checkpoint(model=net).read(prefix).assert_existing_objects_matched()
    np.testing.assert_array_equal(net.w.numpy(), w)
    np.testing.assert_array_equal(net.inner.b.numpy(), b)


# ---------------------------------------------------------------------------- corruption


@pytest.fixture
def ckpt_copy(tmp_path):
    prefix = str(tmp_path / "ck")
    write_checkpoint(prefix, sample_tensors())
    return prefix


def _mutate(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_flipped_byte_in_index(ckpt_copy):
    _mutate(ckpt_copy + ".index", 10)
    with pytest.raises(IntegrityError, match=r"ck\.index"):
        TFCheckpointReader(ckpt_copy).read_all()


def test_flipped_byte_in_data(ckpt_copy):
    r = TFCheckpointReader(ckpt_copy)
    e = r.entry("shape/big")
    _mutate(r.shard_path(0), e.offset + 17)
    with pytest.raises(IntegrityError, match=rf"data-00000-of-00001.*shape/big.*offset {e.offset}"):
        r.get("shape/big")
    r.get("dt/float32")  # others still fine


def test_flipped_byte_in_string_data(ckpt_copy):
    r = TFCheckpointReader(ckpt_copy)
    e = r.entry("dt/string")
    _mutate(r.shard_path(0), e.offset + e.size - 1)
    with pytest.raises(IntegrityError, match="dt/string"):
        r.get("dt/string")


def test_truncated_index(ckpt_copy):
    data = Path(ckpt_copy + ".index").read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        Path(ckpt_copy + ".index").write_bytes(data[:cut])
        with pytest.raises(FormatError, match=r"ck\.index"):
            TFCheckpointReader(ckpt_copy)


def test_bad_magic(ckpt_copy):
    _mutate(ckpt_copy + ".index", os.path.getsize(ckpt_copy + ".index") - 1)
    with pytest.raises(FormatError, match="magic"):
        TFCheckpointReader(ckpt_copy)


def test_truncated_data_shard(ckpt_copy):
    r = TFCheckpointReader(ckpt_copy)
    e = r.entry("shape/big")
    with open(r.shard_path(0), "r+b") as f:
        f.truncate(e.offset + 10)
    with pytest.raises(FormatError, match=r"data-00000-of-00001.*truncated"):
        TFCheckpointReader(ckpt_copy).get("shape/big")


def test_missing_shard(tmp_path):
    dst = tmp_path / "v1"
    shutil.copytree(FIXTURES / "v1_partitioned", dst)
    os.remove(dst / "model.ckpt-5.data-00001-of-00002")
    r = TFCheckpointReader(dst)
    r.get("emb")  # lives in shard 0
    with pytest.raises(CheckpointNotFoundError, match="data-00001-of-00002"):
        r.get("counter")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        TFCheckpointReader(tmp_path / "nothing")


# ------------------------------------------------------------------------------- laziness


def test_get_reads_only_that_entry(ckpt_copy, monkeypatch):
    r = TFCheckpointReader(ckpt_copy)
    target = r.entry("dt/int32")
    # Garbage everywhere else in the shard: a lazy reader does not notice.
    shard = r.shard_path(0)
    data = bytearray(Path(shard).read_bytes())
    keep = bytes(data[target.offset : target.offset + target.size])
    data[:] = b"\xa5" * len(data)
    data[target.offset : target.offset + target.size] = keep
    Path(shard).write_bytes(bytes(data))
    calls = []
    real = os.preadv

    def spy(fd, buffers, offset):
        n = real(fd, buffers, offset)
        calls.append((offset, n))
        return n

    monkeypatch.setattr(os, "preadv", spy)
    r.close()
    value = r.get("dt/int32")
    assert value.shape == (3, 5)
    assert calls == [(target.offset, target.size)]
    with pytest.raises(IntegrityError):
        r.get("dt/float32")


# ---------------------------------------------------------------------------- fuzzing


def _exercise(prefix: str) -> None:
    r = TFCheckpointReader(prefix)
    for k in r.keys():
        r.get(k)
    TFCheckpointReader(prefix).read_all()  # the batched path meets the same bytes


_ALLOWED = (FormatError, UnsupportedDtypeError, CheckpointNotFoundError)


@pytest.fixture(scope="module")
def valid_index(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzsrc")
    write_checkpoint(str(d / "ck"), sample_tensors())
    return (d / "ck.index").read_bytes(), (d / "ck.data-00000-of-00001").read_bytes()


@settings(max_examples=150)
@given(data=st.binary(max_size=400))
def test_random_index_bytes_raise_format_error(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fuzzrand")
    (d / "ck.index").write_bytes(data)
    with pytest.raises(FormatError):
        _exercise(str(d / "ck"))


@settings(max_examples=300)
@given(st.data())
def test_mutated_index_bytes_raise_only_our_errors(tmp_path_factory, valid_index, data):
    index, shard = valid_index
    buf = bytearray(index)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "truncate"]))
        if not buf:
            break
        pos = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[pos] = data.draw(st.integers(0, 255))
        else:
            del buf[pos:]
    d = tmp_path_factory.mktemp("fuzzmut")
    (d / "ck.index").write_bytes(bytes(buf))
    (d / "ck.data-00000-of-00001").write_bytes(shard)
    try:
        _exercise(str(d / "ck"))
    except _ALLOWED:
        pass


@settings(max_examples=200)
@given(st.data())
def test_mutated_entries_with_valid_crc_raise_only_our_errors(tmp_path_factory, valid_index, data):
    """Re-sign the table after mutating entry values, so the entry parser itself is fuzzed."""
    from ckptfmt.converters.tf._table import build_table, read_table

    index, shard = valid_index
    pairs = read_table(index, "fuzz")
    i = data.draw(st.integers(0, len(pairs) - 1))
    value = bytearray(pairs[i][1])
    if value:
        pos = data.draw(st.integers(0, len(value) - 1))
        value[pos] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            del value[data.draw(st.integers(0, len(value))):]
    pairs[i] = (pairs[i][0], bytes(value))
    d = tmp_path_factory.mktemp("fuzzentry")
    (d / "ck.index").write_bytes(build_table(pairs))
    (d / "ck.data-00000-of-00001").write_bytes(shard)
    try:
        _exercise(str(d / "ck"))
    except _ALLOWED:
        pass


def test_fifo_index_or_shard_is_refused_not_waited_on(tmp_path):
    import shutil

    src = fixture_prefix("tf_module")
    d = tmp_path / "c"
    shutil.copytree(os.path.dirname(src), d)
    prefix = str(d / os.path.basename(src))
    shard = prefix + ".data-00000-of-00001"
    os.remove(shard)
    os.mkfifo(shard)
    r = TFCheckpointReader(prefix)
    with pytest.raises(FormatError, match="not a regular file"):
        r.get(r.keys()[0])
    os.remove(prefix + ".index")
    os.mkfifo(prefix + ".index")
    from ckptfmt.errors import CkptFmtError

    with pytest.raises(CkptFmtError):  # refused at once (as "no checkpoint here"), never blocks
        TFCheckpointReader(prefix)


# ------------------------------------------------------------------ many small tensors


def _many(prefix: str, n: int = 300) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    tensors = {f"layer_{i:04d}/{'kernel' if i % 2 else 'bias'}": rng.standard_normal((i % 7 + 1, 3)).astype(np.float32) for i in range(n)}
    tensors["big"] = rng.standard_normal((600, 1000)).astype(np.float32)  # 2.4 MB: the one-by-one path
    tensors["names"] = np.array([b"a", b"bc"], dtype=object)
    tensors["step"] = np.int64(7)
    write_checkpoint(prefix, tensors)
    return tensors


def test_read_all_batches_small_tensors(tmp_path, monkeypatch):
    prefix = str(tmp_path / "many")
    tensors = _many(prefix)
    calls = []
    real = os.preadv

    def spy(fd, buffers, offset):
        calls.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", spy)
    got = TFCheckpointReader(prefix).read_all()
    assert list(got) == TFCheckpointReader(prefix).keys()
    for k, v in tensors.items():
        assert got[k].dtype == np.asarray(v).dtype and np.array_equal(got[k], v), k
        assert got[k].flags.writeable and got[k].flags.owndata or got[k].base is not None
    assert len(calls) <= 5, calls  # 300 small tensors in one run, not 300 reads


def test_read_all_names_the_corrupt_small_tensor(tmp_path):
    prefix = str(tmp_path / "many")
    _many(prefix)
    r = TFCheckpointReader(prefix)
    e = r.entry("layer_0101/kernel")
    _mutate(r.shard_path(0), e.offset + 1)
    with pytest.raises(IntegrityError, match=rf"layer_0101/kernel.*offset {e.offset}"):
        TFCheckpointReader(prefix).read_all()


def test_read_all_on_a_truncated_shard_names_a_tensor(tmp_path):
    prefix = str(tmp_path / "many")
    _many(prefix)
    r = TFCheckpointReader(prefix)
    e = r.entry("layer_0200/bias")
    with open(r.shard_path(0), "r+b") as f:
        f.truncate(e.offset + 2)
    with pytest.raises(FormatError, match=r"truncated") as info:
        TFCheckpointReader(prefix).read_all()
    assert "layer_0" in str(info.value) or "big" in str(info.value)


_entry_values = st.builds(
    lambda dtype, shape, shard, offset, size, crc: (dtype, tuple(shape), shard, offset, size, crc),
    st.integers(0, 30), st.lists(st.integers(0, 1 << 40), max_size=5), st.integers(0, 3),
    st.integers(0, 1 << 62), st.integers(0, 1 << 62), st.integers(0, (1 << 32) - 1),
)


@settings(max_examples=300)
@given(values=_entry_values, data=st.data())
def test_fast_entry_decoder_agrees_with_the_general_one(values, data):
    """The inline decoder of plain entries returns what the general one returns, and
    leaves everything it does not fully understand (a malformed byte included) to it."""
    from ckptfmt.converters.tf._proto import BundleEntry, _decode_entry_fast

    buf = bytearray(BundleEntry(*values).encode())
    mutated = data.draw(st.booleans()) and bool(buf)
    if mutated:
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            del buf[data.draw(st.integers(0, len(buf))):]
    fast = _decode_entry_fast(bytes(buf))
    if not mutated:
        assert fast is not None and BundleEntry(*fast) == BundleEntry(*values)
    try:
        general = BundleEntry.decode(memoryview(bytes(buf)), "test")  # a memoryview skips the fast path
    except FormatError:
        assert fast is None
        return
    if fast is not None:
        assert BundleEntry(*fast) == general
    else:
        assert BundleEntry.decode(bytes(buf), "test") == general
