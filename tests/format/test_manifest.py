from __future__ import annotations

import msgpack
import numpy as np
import pytest

from ckptfmt.errors import FormatError, IntegrityError, LimitExceededError, UnsupportedVersionError
from ckptfmt.format.manifest import ManifestBuilder, decode_manifest
from ckptfmt.format.spec import FORMAT_VERSION, LIMITS, Limits


def _builder(n=3, cs=4096):
    b = ManifestBuilder(chunk_size=cs)
    f = b.add_file("x.data")
    off = 0
    for i in range(n):
        b.add_tensor(f"t{i}", "float32", (3, 1000))  # 12000 bytes -> 3 chunks of 4096
        for _ in range(3):
            b.add_chunk(f, off, bytes(32))
            off += 4096
    b.set_file_size(f, off)
    return b


def _env(data):
    return msgpack.unpackb(data, raw=False)


def _reenv(env, body=None):
    from ckptfmt.format.hashing import get_hash

    if body is not None:
        env["body"] = msgpack.packb(body, use_bin_type=True)
        env["hash"] = get_hash("blake3").digest(env["body"])
    return msgpack.packb(env, use_bin_type=True)


def test_decode_round_trip():
    m = decode_manifest(_builder().encode(tree=["v", 1], metadata={"k": [1, 2]}, producer={"p": 1}))
    assert m.names == ["t0", "t1", "t2"]
    e = m.tensor(1)
    assert (e.dtype, e.shape, e.nbytes, e.first_chunk, e.num_chunks) == ("float32", (3, 1000), 12000, 3, 3)
    assert m.chunk_length(e, 2) == 12000 - 2 * 4096
    assert m.metadata == {"k": [1, 2]} and m.version == FORMAT_VERSION
    assert len(m.hexdigest) == 64 and m.index_of("t2") == 2


def test_manifest_hash_detects_any_change():
    data = bytearray(_builder().encode(tree=["v", 1], metadata=None, producer={}))
    env = _env(bytes(data))
    body = bytearray(env["body"])
    body[len(body) // 2] ^= 1
    env["body"] = bytes(body)
    with pytest.raises(IntegrityError, match="manifest hash mismatch"):
        decode_manifest(msgpack.packb(env, use_bin_type=True))


def test_unknown_major_refused_and_unknown_fields_ignored():
    env = _env(_builder().encode(tree=["v", 1], metadata=None, producer={}))
    env["version"] = [2, 0]
    with pytest.raises(UnsupportedVersionError, match="2.0"):
        decode_manifest(_reenv(dict(env)))
    env["version"] = [1, 7]
    body = msgpack.unpackb(env["body"], raw=False)
    body["future_field"] = {"anything": [1, 2, 3]}
    env["future_envelope_field"] = 1
    m = decode_manifest(_reenv(env, body))
    assert m.version == (1, 7)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda b: b.update(chunk_size=100), "chunk_size"),
        (lambda b: b["files"].__setitem__(0, ["/etc/passwd", 10]), "invalid data file path"),
        (lambda b: b["files"].__setitem__(0, ["../../x", 10]), "invalid data file path"),
        (lambda b: b["files"].__setitem__(0, ["x.data", 100]), "past the end"),
        (lambda b: b["tensors"].__setitem__("names", ["a", "a", "b"]), "duplicate"),
        (lambda b: b["tensors"].__setitem__("rank", b"\x02\x02"), "column"),
        (lambda b: b["tensors"].__setitem__("dims", b"\xff" * 48), "dimension exceeds|limit"),
        (lambda b: b["tensors"].__setitem__("dtype", b"\x00\x00\x77"), "dtype code"),
        (lambda b: b["chunks"].__setitem__("file", b"\x05\x00\x00\x00" * 9), "data file #5"),
        (lambda b: b["chunks"].__setitem__("hash", b""), "hash column"),
        (lambda b: b.update(hash_alg="md5"), "unknown hash"),
        (lambda b: b.pop("tensors"), "required field 'tensors'"),
    ],
)
def test_inconsistent_manifests_are_format_errors(mutate, match):
    env = _env(_builder().encode(tree=["v", 1], metadata=None, producer={}))
    body = msgpack.unpackb(env["body"], raw=False)
    mutate(body)
    with pytest.raises(FormatError, match=match):
        decode_manifest(_reenv(env, body))


def test_limits_are_enforced_before_allocation():
    data = _builder(n=3).encode(tree=["v", 1], metadata=None, producer={})
    with pytest.raises(LimitExceededError):
        decode_manifest(data, limits=Limits(max_tensors=2))
    with pytest.raises(LimitExceededError):
        decode_manifest(data, limits=Limits(max_manifest_bytes=100))
    # A tensor claiming 2**40 x 2**40 elements is refused by arithmetic, never allocated.
    env = _env(data)
    body = msgpack.unpackb(env["body"], raw=False)
    body["tensors"]["dims"] = np.array([1 << 40, 1 << 40] * 3, "<u8").tobytes()
    with pytest.raises(LimitExceededError):
        decode_manifest(_reenv(env, body))
    assert LIMITS.max_rank == 64


def test_builder_refuses_bad_chunk_size_and_long_names():
    with pytest.raises(ValueError):
        ManifestBuilder(chunk_size=1000)
    b = ManifestBuilder(chunk_size=4096)
    with pytest.raises(LimitExceededError):
        b.add_tensor("n" * 5000, "float32", ())
    with pytest.raises(LimitExceededError):
        b.add_tensor("x", "float32", (1,) * 65)


def _fp_builder(fps=True):
    b = ManifestBuilder(chunk_size=4096, fingerprint="xxh3-128")
    f = b.add_file("x.data")
    b.add_tensor("t", "uint8", (8192,))
    b.add_chunk(f, 0, bytes(32), bytes([1]) * 16)
    b.add_chunk(f, 4096, bytes(32), bytes([2]) * 16 if fps else None)
    b.set_file_size(f, 8192)
    return b


def test_fingerprint_column_round_trips_and_covers_every_chunk_or_none():
    m = decode_manifest(_fp_builder().encode(tree=["t", 0], metadata=None, producer={}))
    assert m.version == FORMAT_VERSION and m.fp_alg == "xxh3-128"  # optional columns: no new version
    assert m.chunk_fp(0) == bytes([1]) * 16 and m.chunk_fp(1) == bytes([2]) * 16
    m = decode_manifest(_fp_builder(fps=False).encode(tree=["t", 0], metadata=None, producer={}))
    assert m.fp_alg is None and m.chunk_fps is None and m.chunk_fp(0) is None
    with pytest.raises(ValueError, match="unknown fingerprint"):
        ManifestBuilder(chunk_size=4096, fingerprint="md4")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"fp_alg": "xxh9-64", "fp": b"\0" * 3}, None),  # unknown function: ignored, whatever its column
        ({"fp": b"\0" * 31}, "fingerprint column has 31 bytes, expected 32"),
        ({"fp_alg": None}, "must be given together"),
        ({"fp": None}, "must be given together"),
        ({"fp_alg": 7}, "must be given together"),
    ],
)
def test_fingerprint_column_is_checked_when_known_and_ignored_when_not(change, error):
    env = _env(_fp_builder().encode(tree=["t", 0], metadata=None, producer={}))
    body = msgpack.unpackb(env["body"], raw=False)
    for k, v in change.items():
        if v is None:
            del body["chunks"][k]
        else:
            body["chunks"][k] = v
    data = _reenv(env, body)
    if error is None:
        m = decode_manifest(data)
        assert m.fp_alg is None and m.chunk_fps is None and m.num_chunks == 2
    else:
        with pytest.raises(FormatError, match=error):
            decode_manifest(data)
