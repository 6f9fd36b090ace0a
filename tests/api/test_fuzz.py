"""The parser property: any bytes handed to the reader raise our FormatError, nothing else."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckptfmt
from ckptfmt.format.hashing import get_hash
from ckptfmt.format.manifest import decode_manifest
from ckptfmt.format.spec import MANIFEST_NAME

CS = 4096


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fz") / "ck")
    state = {"a": np.arange(2000, dtype=np.float32).reshape(20, 100), "b": [np.int8(3), "s", (None, 1.5)], 7: np.zeros((0, 2))}
    ckptfmt.save(state, path, chunk_size=CS, metadata={"m": [1, 2]})
    with open(os.path.join(path, MANIFEST_NAME), "rb") as f:
        return path, f.read()


def _exercise(data: bytes, path: str, tmp_dir) -> None:
    """Decode, open and load; anything but success or FormatError fails the test."""
    try:
        decode_manifest(data)
    except ckptfmt.FormatError:
        pass
    d = tmp_dir
    os.makedirs(d, exist_ok=True)
    for name in os.listdir(path):
        if name != MANIFEST_NAME and not os.path.exists(os.path.join(d, name)):
            os.link(os.path.join(path, name), os.path.join(d, name))  # data files that are links are refused
    with open(os.path.join(d, MANIFEST_NAME), "wb") as f:
        f.write(data)
    try:
        r = ckptfmt.open(d)
        r.keys()
        r.load()
        _ = r.tree
        for k in r.keys():
            r.slice(k)[0:1] if r.info(k).shape else r.get(k)
    except ckptfmt.FormatError:
        pass
    try:
        ckptfmt.verify(d)
    except ckptfmt.CheckpointNotFoundError:
        pass


@given(data=st.binary(max_size=2000))
def test_random_bytes(good, tmp_path_factory, data):
    _exercise(data, good[0], str(tmp_path_factory.mktemp("r")))


@given(st.data())
def test_mutated_envelope(good, tmp_path_factory, data):
    raw = bytearray(good[1])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[i : i + data.draw(st.integers(1, 64))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    _exercise(bytes(raw), good[0], str(tmp_path_factory.mktemp("m")))


@given(st.data())
def test_mutated_body_with_valid_hash(good, tmp_path_factory, data):
    """Past the hash check: every structural check of the body must hold on its own."""
    env = msgpack.unpackb(good[1], raw=False)
    body = bytearray(env["body"])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    env["body"] = bytes(body)
    env["hash"] = get_hash("blake3").digest(env["body"])
    _exercise(msgpack.packb(env, use_bin_type=True), good[0], str(tmp_path_factory.mktemp("b")))


@given(st.data())
def test_mutated_body_fields(good, tmp_path_factory, data):
    """Type-confused and out-of-range values in known fields."""
    env = msgpack.unpackb(good[1], raw=False)
    body = msgpack.unpackb(env["body"], raw=False, strict_map_key=False)
    values = st.one_of(st.none(), st.integers(-(1 << 63), (1 << 64) - 1), st.text(max_size=5), st.binary(max_size=40),
                       st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(-(1 << 63), (1 << 63) - 1), max_size=2))
    section = data.draw(st.sampled_from(["top", "tensors", "chunks"]))
    target = body if section == "top" else body[section]
    key = data.draw(st.sampled_from(sorted(target)))
    target[key] = data.draw(values)
    env["body"] = msgpack.packb(body, use_bin_type=True)
    env["hash"] = get_hash("blake3").digest(env["body"])
    _exercise(msgpack.packb(env, use_bin_type=True), good[0], str(tmp_path_factory.mktemp("f")))


def test_huge_length_prefix_does_not_allocate(good, tmp_path):
    # A bin32 header claiming 4 GiB followed by nothing: must fail fast, not allocate.
    _exercise(b"\x85\xa6format\xa7ckptfmt\xa4body\xc6\xff\xff\xff\xf0", good[0], str(tmp_path / "h"))
