"""Keras's own files (.keras, Keras 3 .weights.h5, tf.keras .h5), read and written without Keras.

The fixtures were written by Keras 3 and tf_keras themselves (fixtures/keras/make_keras_fixtures.py).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")  # the keras extra; CI installs it

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ckptfmt.converters import kinds  # noqa: E402
from ckptfmt.converters.keras.kerasfile import KerasFileReader, is_keras_file, read_keras_file, write_keras_file  # noqa: E402
from ckptfmt.errors import CheckpointExistsError, ConversionError, FormatError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures" / "keras"
CNN_LAYERS = [("conv", "Conv2D"), ("bn", "BatchNormalization"), ("flatten", "Flatten"), ("head", "Dense")]


def layers_of(name: str) -> list[tuple[str, str]]:
    with KerasFileReader(FIX / name) as r:
        return [(l.name, l.class_name) for l in read_keras_file(r).layers]


def test_keras_archive_layers_configs_and_optimizer_from_config():
    with KerasFileReader(FIX / "k3_cnn_adam.keras") as r:
        kc = read_keras_file(r)
        assert [(l.name, l.class_name) for l in kc.layers] == CNN_LAYERS
        bn = kc.layers[1]
        assert bn.config["epsilon"] == pytest.approx(1e-3) and bn.config["momentum"] == pytest.approx(0.99)
        assert kc.layers[2].input_shape == (None, 4, 4, 4)  # the Flatten's input, from build_config
        assert kc.optimizer_config["class_name"] == "Adam" and kc.optimizer_config["beta_2"] == pytest.approx(0.999)
        assert int(r.get(kc.iterations_key)) == 3
        assert float(r.get(kc.learning_rate_key)) == pytest.approx(1e-2)
        # slots follow the trainable variables: moving statistics have none
        assert list(kc.slots) == ["conv/kernel", "conv/bias", "bn/gamma", "bn/beta", "head/kernel", "head/bias"]
        assert kc.slots["conv/kernel"] == {"momentum": "optimizer/vars/2", "velocity": "optimizer/vars/3"}
        assert kc.keys["bn/moving_variance"] == "layers/batch_normalization/vars/3"


def test_weights_h5_alone_solves_layer_order_from_slot_shapes():
    with KerasFileReader(FIX / "k3_cnn_adam.weights.h5") as r, KerasFileReader(FIX / "k3_cnn_adam.keras") as rk:
        kc, kk = read_keras_file(r), read_keras_file(rk)
        assert [c for _, c in layers_of("k3_cnn_adam.weights.h5")] == [c for _, c in CNN_LAYERS]
        assert kc.order_known and kc.slots == kk.slots and kc.keys == kk.keys
        assert any("solved from the optimizer" in n for n in kc.notes)
        assert "epsilon" not in kc.layers[1].config  # a .weights.h5 has no config


def test_rnn_slots_tie_to_keras_trainable_order_with_and_without_config():
    want = json.loads((FIX / "k3_rnn_rmsprop.json").read_text())["trainable"]
    for name in ("k3_rnn_rmsprop.keras", "k3_rnn_rmsprop.weights.h5"):
        with KerasFileReader(FIX / name) as r:
            kc = read_keras_file(r)
            assert list(kc.slots) == want, name
            assert all(set(d) == {"velocity", "momentum", "average_gradient"} for d in kc.slots.values())
            assert [l.class_name for l in kc.layers] == ["Embedding", "LSTM", "Bidirectional", "MultiHeadAttention",
                                                          "LayerNormalization", "Dense"]
            # each slot has its variable's shape
            for var, d in kc.slots.items():
                assert all(r.shape(k) == kc.shapes[var] for k in d.values())


def test_subclassed_same_shape_layers_refuse_the_optimizer_instead_of_guessing():
    with KerasFileReader(FIX / "k3_sub_adam.weights.h5") as r:
        kc = read_keras_file(r)
    assert not kc.slots and kc.problems and "do not tell which layer" in kc.problems[0]
    assert sorted(l.name for l in kc.layers) == ["aa", "zz"]


def test_tf_keras_h5_names_tie_slots_and_training_config_gives_hyperparameters():
    with KerasFileReader(FIX / "tfk_cnn_adam.h5") as r:
        kc = read_keras_file(r)
        assert [(l.name, l.class_name) for l in kc.layers][:2] == [("conv", "Conv2D"), ("bn", "BatchNormalization")]
        assert kc.slots["head/kernel"] == {"momentum": "optimizer_weights/Adam/m/head/kernel:0",
                                           "velocity": "optimizer_weights/Adam/v/head/kernel:0"}
        assert int(r.get(kc.iterations_key)) == 3
        assert kc.optimizer_config["class_name"] == "Adam"
        assert kc.optimizer_config["learning_rate"] == pytest.approx(1e-2)
        assert kc.layers[1].config["epsilon"] == pytest.approx(1e-3)


def test_bfloat16_is_read_as_bfloat16():
    want = np.load(FIX / "k3_bf16.npz")
    with KerasFileReader(FIX / "k3_bf16.weights.h5") as r:
        kc = read_keras_file(r)
        k = r.get(kc.keys["d/kernel"])
        assert str(k.dtype) == "bfloat16"
        np.testing.assert_array_equal(k.astype(np.float32), want["kernel"])


def test_a_dataset_is_read_with_one_copy_in_memory(tmp_path):
    """h5py reports native little-endian data as "<f4": reading it must not copy it a second time
    (a VGG fc1 kernel is 392 MiB). Big-endian data (no Keras writes it) is refused, naming it."""
    import tracemalloc

    want = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)
    p, q = tmp_path / "w.weights.h5", tmp_path / "be.weights.h5"
    for path, dt in ((p, "<f4"), (q, ">f4")):
        with h5py.File(path, "w") as f:
            f.create_dataset("layers/dense/vars/0", data=want.astype(dt))
    with KerasFileReader(p) as r:
        tracemalloc.start()
        try:
            got = r.get("layers/dense/vars/0")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(got, want)
    assert peak < 1.2 * want.nbytes, f"{peak} bytes traced reading a {want.nbytes}-byte dataset"
    with pytest.raises(FormatError, match="layers/dense/vars/0 has dtype >f4"):
        with KerasFileReader(q) as r:
            r.get("layers/dense/vars/0")


@pytest.mark.parametrize("name", ["k3_cnn_adam.keras", "k3_cnn_adam.weights.h5", "tfk_cnn_adam.h5", "k3_bf16.weights.h5"])
def test_writer_round_trips_every_dataset_bit_exactly(tmp_path, name):
    out = tmp_path / name
    with KerasFileReader(FIX / name) as r:
        first = r.keys()[0]
        new = (r.get(first).astype(np.float32) + 1).astype(r.dtype(first))
        write_keras_file(r, out, {first: new})
        with pytest.raises(CheckpointExistsError):
            write_keras_file(r, out, {})
        with pytest.raises(ConversionError, match="shape"):
            write_keras_file(r, tmp_path / "bad", {first: np.zeros((7, 7, 7))})
    assert is_keras_file(out) == is_keras_file(FIX / name)
    with KerasFileReader(FIX / name) as r0, KerasFileReader(out) as r1:
        assert r0.keys() == r1.keys() and r0.groups().keys() == r1.groups().keys()
        for k in r0.keys():
            want = new if k == first else r0.get(k)
            assert r1.dtype(k) == r0.dtype(k) and np.array_equal(r1.get(k), want), k
        if name.endswith(".keras"):
            assert r1.config == r0.config and r1.metadata == r0.metadata


def test_keras_zip_is_not_sniffed_as_torch_and_verify_says_no_checksums():
    assert kinds.detect_kind(FIX / "k3_cnn_adam.keras") == "keras"
    renamed = FIX / "k3_cnn_adam.keras"
    assert is_keras_file(renamed) == "keras"
    for name in ("k3_cnn_adam.keras", "k3_cnn_adam.weights.h5", "tfk_cnn_adam.h5"):
        rep = kinds.verify_any(FIX / name)
        assert rep.ok and rep.tensors > 0, name
        assert [p.kind for p in rep.problems] == ["no_checksums"] and rep.problems[0].severity == "warning"
    s = kinds.inspect_any(FIX / "k3_cnn_adam.keras")
    names = [t.name for t in s.tensors]
    assert "conv/kernel" in names and "optimizer/conv/kernel/momentum" in names and "optimizer/iterations" in names
    assert kinds.diff_any(FIX / "k3_cnn_adam.keras", FIX / "k3_cnn_adam.weights.h5").identical


def test_extensionless_files_are_sniffed_by_content(tmp_path):
    for name in ("k3_cnn_adam.keras", "k3_cnn_adam.weights.h5"):
        p = tmp_path / name.replace(".", "_")
        p.write_bytes((FIX / name).read_bytes())
        assert kinds.detect_kind(p) == "keras"


def test_verify_reports_a_corrupted_keras_member_and_a_truncated_h5(tmp_path):
    raw = bytearray((FIX / "k3_cnn_adam.keras").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        info = z.getinfo("model.weights.h5")
    raw[info.header_offset + 30 + len(info.filename) + 20000] ^= 0xFF  # inside the HDF5 member
    bad = tmp_path / "bad.keras"
    bad.write_bytes(bytes(raw))
    rep = kinds.verify_any(bad)
    assert not rep.ok and any(p.kind == "hash_mismatch" for p in rep.problems)
    trunc = tmp_path / "t.weights.h5"
    trunc.write_bytes((FIX / "k3_cnn_adam.weights.h5").read_bytes()[:20000])
    rep = kinds.verify_any(trunc)
    assert not rep.ok


def test_a_keras_archive_with_npz_weights_is_refused_naming_it(tmp_path):
    p = tmp_path / "m.keras"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("metadata.json", "{}")
        z.writestr("config.json", "{}")
        z.writestr("model.weights.npz", b"")
    with pytest.raises(FormatError, match="npz"):
        KerasFileReader(p)


def test_links_in_hdf5_are_refused(tmp_path):
    import h5py

    p = tmp_path / "l.weights.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.ones((2, 2), np.float32))
        f["layers/dense/vars"].attrs["name"] = "dense"
        f["layers/dense/vars/1"] = h5py.ExternalLink("/etc/passwd", "/x")
    with pytest.raises(FormatError, match="ExternalLink"):
        KerasFileReader(p)


# -- any bytes -> only our errors (libhdf5 runs in a child process first: it can crash) -----------

_SEEDS = [FIX / "k3_bf16.weights.h5", FIX / "k3_cnn_adam.keras", FIX / "tfk_cnn_adam.h5"]


def _open_everything(path: Path) -> None:
    try:
        with KerasFileReader(path) as r:
            try:
                read_keras_file(r)
            except ConversionError:
                pass
            for k in r.keys():
                r.get(k)
    except (FormatError, ConversionError):
        pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(range(len(_SEEDS))), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8), truncate=st.booleans())
def test_any_damage_raises_only_our_errors(tmp_path, seed, cut, flips, truncate):
    src = _SEEDS[seed]
    data = bytearray(src.read_bytes())
    if truncate:
        data = data[: int(cut * len(data))]
    for pos, value in flips:
        if data:
            data[min(int(pos * len(data)), len(data) - 1)] = value
    p = tmp_path / ("fz" + "".join(src.suffixes))
    p.write_bytes(bytes(data))
    _open_everything(p)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
def test_any_bytes_after_an_hdf5_signature_raise_only_our_errors(tmp_path, data):
    p = tmp_path / "x.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + data)
    _open_everything(p)


@pytest.mark.tensorflow
@pytest.mark.slow
def test_keras_applications_mobilenet_slots_tie_as_keras_names_them(tmp_path):
    """A published architecture nobody here wrote (nested in a Sequential, one layer frozen):
    every slot the reader ties by position is the one Keras itself names for that variable."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, include_top=False)
    model = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)])
    base.layers[5].trainable = False
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.save(tmp_path / "m.keras")
    names = [v.path for v in model.optimizer.variables]
    with KerasFileReader(tmp_path / "m.keras") as r:
        kc = read_keras_file(r)
        assert len(kc.slots) == len(model.trainable_variables) and not kc.problems
        assert len(kc.keys) == len(model.weights)
        for var, slots in kc.slots.items():
            for slot, key in slots.items():
                # Keras names a slot {optimizer}/{variable path, "/" -> "_"}_{slot}; a layer built inside
                # the Sequential has the Sequential's name in front of its path, which the file does not record
                assert names[int(key.rsplit("/", 1)[1])].endswith(f"{var.replace('/', '_')}_{slot}"), (var, slot)
        classes = {l.class_name for l in kc.layers}
        assert {"Conv2D", "DepthwiseConv2D", "BatchNormalization", "Dense"} <= classes
        frozen = base.layers[5]
        assert all(w.path not in kc.slots for w in frozen.weights)
