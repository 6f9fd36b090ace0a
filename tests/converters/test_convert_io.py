"""tf2torch outputs (streamed .safetensors, ckptfmt directories, .pt) and torch2tf inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import ckptfmt
from ckptfmt.converters.convert import tf_to_torch, torch_to_tf
from ckptfmt.converters.keras import outputs
from ckptfmt.converters.mapping import Cast, Convert, Discard, Mapping, Rename, Split, Transpose
from ckptfmt.converters.tf import (
    TFCheckpointReader,
    build_object_graph,
    write_checkpoint,
)
from ckptfmt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConversionError,
    FormatError,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "fixtures" / "examples" / "cnn_adam"
MODELS = str(ROOT / "fixtures" / "examples" / "models.py")
A = "/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.fixture
def keras_ckpt(tmp_path):
    """A small Keras-like checkpoint: Embedding, Conv2D, LayerNormalization, Dense."""
    rng = np.random.default_rng(0)
    keys = {
        f"model/embedding/embeddings{A}": rng.standard_normal((10, 4), dtype=np.float32),
        f"model/conv2d/kernel{A}": rng.standard_normal((3, 3, 2, 4), dtype=np.float32),
        f"model/conv2d/bias{A}": rng.standard_normal((4,), dtype=np.float32),
        f"model/layer_normalization/gamma{A}": rng.standard_normal((4,), dtype=np.float32),
        f"model/layer_normalization/beta{A}": rng.standard_normal((4,), dtype=np.float32),
        f"model/dense_3/kernel{A}": rng.standard_normal((4, 5), dtype=np.float32),
        f"model/dense_3/bias{A}": rng.standard_normal((5,), dtype=np.float32),
    }
    prefix = tmp_path / "tf" / "ckpt-1"
    write_checkpoint(prefix, keys, object_graph=build_object_graph(keys))
    return prefix


def _old_path(src, report):
    """What tf2torch wrote before streaming: read everything, plan.apply, save_file."""
    with TFCheckpointReader(src) as r:
        arrays = {s: r.get(report.key_map[s]) for e in report.plan.entries for s in e.sources}
    return report.plan.apply(arrays)


def test_streamed_safetensors_loads_bit_identical_to_the_old_path(keras_ckpt, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    out = tmp_path / "w.safetensors"
    report = tf_to_torch(keras_ckpt, out, optimizer=False)
    want = _old_path(keras_ckpt, report)
    got = load_file(out)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k
    assert got["conv2d.weight"].shape == (4, 2, 3, 3) and got["dense_3.weight"].shape == (5, 4)
    with safe_open(out, "np") as f:
        assert f.metadata() == {"format": "pt", "converted_by": "ckptfmt tf2torch"}
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []  # no temporary left


@pytest.mark.torch
def test_streamed_safetensors_loads_in_torch(keras_ckpt, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    out = tmp_path / "w.safetensors"
    report = tf_to_torch(keras_ckpt, out, optimizer=False)
    want = _old_path(keras_ckpt, report)
    got = load_file(out)
    for k, v in want.items():
        assert torch.equal(got[k], torch.from_numpy(v)), k


def test_stream_writer_entry_by_entry_with_split_cast_and_bfloat16(tmp_path):
    import ml_dtypes

    from ckptfmt.converters.sources.safetensors import SafetensorsSource

    src = {"k": np.arange(24, dtype=np.float32).reshape(4, 6), "b": np.arange(3, dtype=np.float32).astype(ml_dtypes.bfloat16),
           "d": np.ones(2, np.float32), "s": np.array(3, np.int64)}
    m = Mapping((Convert(("k",), ("a.w", "b.w"), (Transpose((1, 0)), Split(0, (2, 4)))),
                 Convert(("b",), ("c",), (Cast("float32"),)), Convert(("d",), (), (Discard(),)), Rename("s", "step")))
    plan = m.plan(src, strict=False)
    reads: list[str] = []

    def read(key):
        reads.append(key)
        return src[key]

    out = str(tmp_path / "o.safetensors")
    size = outputs.write_safetensors_stream(out, plan, read)
    assert size == os.path.getsize(out)
    assert reads == ["k", "b", "d", "s"]  # each source once, entry by entry
    with SafetensorsSource(out) as s:
        want = plan.apply(src)
        assert sorted(s.keys()) == sorted(want)
        for k, v in want.items():
            got = s.get(k)
            assert got.shape == plan.target_specs[k].shape and got.dtype == v.dtype, k
            assert got.tobytes() == np.ascontiguousarray(v).tobytes(), k
        assert s.get("step").shape == ()  # 0-d stays 0-d (plan.apply's Entry.run makes it (1,))


def test_stream_writer_failure_leaves_nothing(tmp_path):
    src = {"k": np.ones((2, 3), np.float32), "j": np.ones(2, np.float32)}
    plan = Mapping((Rename("k", "a"), Rename("j", "b"))).plan(src)
    out = tmp_path / "o.safetensors"

    def read(key):
        if key == "j":
            raise OSError("disk went away")
        return src[key]

    with pytest.raises(OSError):
        outputs.write_safetensors_stream(str(out), plan, read)
    assert list(tmp_path.iterdir()) == []


def test_ckptfmt_directory_output_reads_back_with_ckptfmt_load(keras_ckpt, tmp_path):
    out = tmp_path / "run" / "step-1"
    report = tf_to_torch(keras_ckpt, out, optimizer=False)
    want = _old_path(keras_ckpt, report)
    tree = ckptfmt.load(out)
    assert tree["framework"]["name"] == "torch" and tree["aliases"] == {}
    assert sorted(tree["model"]) == sorted(want)
    for k, v in want.items():
        assert tree["model"][k].tobytes() == v.tobytes() and tree["model"][k].shape == v.shape, k
    assert "dense_3.weight" in tree["extra"]["conversion_report"]
    assert ckptfmt.verify(out).ok
    # an empty directory is a fine destination too; a non-empty foreign one is refused
    empty = tmp_path / "empty"
    empty.mkdir()
    tf_to_torch(keras_ckpt, empty, optimizer=False)
    assert sorted(ckptfmt.load(empty)["model"]) == sorted(want)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointExistsError, match="not a ckptfmt checkpoint"):
        tf_to_torch(keras_ckpt, junk, optimizer=False)
    with pytest.raises(CheckpointExistsError, match="overwrite"):
        tf_to_torch(keras_ckpt, out, optimizer=False)
    tf_to_torch(keras_ckpt, out, optimizer=False, overwrite=True)


def test_output_kind_rule(tmp_path):
    assert outputs.output_kind("a/b.safetensors") == "safetensors"
    assert [outputs.output_kind(f"x{s}") for s in (".pt", ".PTH", ".bin")] == ["torch"] * 3
    assert outputs.output_kind("runs/step-3") == "ckptfmt"
    with pytest.raises(ConversionError):
        outputs.output_kind("m.onnx")
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointExistsError, match="not a directory"):
        outputs.check_output(str(f), "ckptfmt", True)
    with pytest.raises(CheckpointExistsError, match="is a directory"):
        outputs.check_output(str(tmp_path), "safetensors", True)
    with pytest.raises(ConversionError, match="weights only"):
        outputs.check_output(str(tmp_path / "w.safetensors"), "safetensors", False, optimizer=True)


def test_progress_bar_counts_every_byte(keras_ckpt, tmp_path, monkeypatch):
    seen: list[tuple[int, int]] = []

    class Bar:
        def __init__(self, total):
            self.total, self.n = total, 0

        def update(self, n):
            self.n += n

        def close(self):
            seen.append((self.total, self.n))

    monkeypatch.setattr(outputs, "progress_bar", lambda total, desc, enabled: Bar(total))
    report = tf_to_torch(keras_ckpt, tmp_path / "w.safetensors", optimizer=False, progress=True)
    total = sum(4 * int(np.prod(s.shape)) for s in report.plan.target_specs.values())
    assert seen == [(total, total)]


def test_torch2tf_from_safetensors_and_ckptfmt_without_torch_imports(keras_ckpt, tmp_path):
    st = tmp_path / "w.safetensors"
    d = tmp_path / "ck"
    tf_to_torch(keras_ckpt, st, optimizer=False)
    tf_to_torch(keras_ckpt, d, optimizer=False)
    with TFCheckpointReader(keras_ckpt) as orig:
        for src in (st, d):
            out = tmp_path / f"back-{src.name}" / "ckpt-1"
            torch_to_tf(src, out, template=keras_ckpt, optimizer=False)
            with TFCheckpointReader(out) as back:
                for k in orig.keys():
                    assert np.array_equal(orig.get(k), back.get(k)), (src, k)


def test_torch2tf_reads_a_bare_state_dict_saved_with_ckptfmt(keras_ckpt, tmp_path):
    from safetensors.numpy import load_file

    st = tmp_path / "w.safetensors"
    tf_to_torch(keras_ckpt, st, optimizer=False)
    bare = tmp_path / "bare"
    ckptfmt.save(load_file(st), bare)
    out = tmp_path / "back" / "ckpt-1"
    torch_to_tf(bare, out, template=keras_ckpt, optimizer=False)
    with TFCheckpointReader(keras_ckpt) as a, TFCheckpointReader(out) as b:
        assert all(np.array_equal(a.get(k), b.get(k)) for k in a.keys())


def test_torch2tf_source_errors_name_the_file(keras_ckpt, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nope"):
        torch_to_tf(tmp_path / "nope.safetensors", tmp_path / "o" / "ckpt-1", template=keras_ckpt, optimizer=False)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 20)
    with pytest.raises(FormatError, match="bad.safetensors"):
        torch_to_tf(bad, tmp_path / "o" / "ckpt-1", template=keras_ckpt, optimizer=False)
    with pytest.raises(ConversionError, match="is a tf checkpoint"):
        torch_to_tf(keras_ckpt, tmp_path / "o" / "ckpt-1", template=keras_ckpt, optimizer=False)
    assert not (tmp_path / "o").exists()


# -- with torch ----------------------------------------------------------------------------------


@pytest.mark.torch
def test_pt_output_unchanged_and_ckptfmt_output_restores_model_and_optimizer(tmp_path):
    torch = pytest.importorskip("torch")
    import ckptfmt.torch
    from ckptfmt.converters.convert import load_factory

    pt, d = tmp_path / "o.pt", tmp_path / "o"
    tf_to_torch(EXAMPLE, pt, model_factory=MODELS + ":cnn")
    tf_to_torch(EXAMPLE, d, model_factory=MODELS + ":cnn")
    saved = torch.load(pt, weights_only=True)
    model, _ = load_factory(MODELS + ":cnn")()
    opt = torch.optim.Adam(model.parameters())
    extra = ckptfmt.torch.restore(d, model=model, optimizer=opt)
    assert extra["optimizer_class"] == saved["optimizer_class"] == "torch.optim.Adam"
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved["model"][k]), k
    assert saved["model"]["norm.num_batches_tracked"].shape == ()  # as torch has it
    got = opt.state_dict()
    assert got["param_groups"] == saved["optimizer"]["param_groups"]
    for i, st in saved["optimizer"]["state"].items():
        for s, v in st.items():
            assert torch.equal(got["state"][i][s], v), (i, s)
    # ...and both come back to the same TF checkpoint
    outs = []
    for src in (pt, d):
        out = tmp_path / f"tf-{src.name}" / "ckpt-1"
        torch_to_tf(src, out, template=EXAMPLE, model_factory=MODELS + ":cnn")
        outs.append(TFCheckpointReader(out))
    assert all(np.array_equal(outs[0].get(k), outs[1].get(k)) for k in outs[0].keys())


@pytest.mark.torch
def test_torch_layout_version_matches_the_adapter():
    pytest.importorskip("torch")
    from ckptfmt.adapters.torch import LAYOUT_VERSION

    assert outputs.TORCH_LAYOUT == LAYOUT_VERSION


def test_docstring_examples(tmp_path, monkeypatch):
    import doctest

    from ckptfmt.converters.sources import safetensors

    monkeypatch.chdir(tmp_path)
    for mod in (outputs, safetensors):
        result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, mod.__name__


def test_atomic_file_refuses_a_link_at_its_temporary_name(tmp_path):
    """Something at this process's own temporary name (a symlink would be followed by open())
    is refused; the link's target and dst are untouched."""
    from ckptfmt.converters.files import atomic_file, temp_path
    from ckptfmt.errors import CheckpointExistsError

    victim = tmp_path / "victim"
    victim.write_text("keep")
    dst = str(tmp_path / "out.pt")
    os.symlink(victim, temp_path(dst))
    with pytest.raises(CheckpointExistsError, match="in the way"):
        atomic_file(dst, lambda tmp: open(tmp, "wb").write(b"new"))
    assert victim.read_text() == "keep" and not os.path.exists(dst)
