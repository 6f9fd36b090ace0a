"""Rules as data: planning (dry run), applying, inverting, printing, mapping files, strictness."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ckptfmt.converters.mapping import (
    AppendZeros,
    Cast,
    Concat,
    Convert,
    Drop,
    Fill,
    GateReorder,
    Mapping,
    Rename,
    Reshape,
    Split,
    TensorSpec,
    Transpose,
)
from ckptfmt.errors import ConversionError, FormatError, UnmappedKeyError

rng = np.random.default_rng(0)


def _mapping() -> Mapping:
    return Mapping(
        (
            Convert(("*/kernel",), ("*.weight",), (Transpose((1, 0)),)),
            Convert(("re:(?P<l>.+)/lstm/bias",), (r"\g<l>.bias_ih", r"\g<l>.bias_hh"), (AppendZeros(1),)),
            Rename("*/bias", "*.bias"),
            Convert(("att/q", "att/k", "att/v"), ("att.in_proj",), (Reshape((4, 4)), Transpose((1, 0)), Concat(0))),
            Convert(("gru/b",), ("gru.bih", "gru.bhh"), (Split(0, (1, 1)), Reshape((6,)), GateReorder(("z", "r", "h"), ("r", "z", "h"), 0))),
            Convert(("half",), ("half16",), (Cast("float16"),)),
            Convert((), ("bn.num_batches_tracked",), (Fill((), "int64", 0),)),
            Drop("*/seed_generator_state"),
        ),
        notes=("a note",),
    )


def _sources() -> dict[str, np.ndarray]:
    return {
        "fc/kernel": rng.normal(size=(3, 2)).astype("float32"),
        "fc/bias": rng.normal(size=2).astype("float32"),
        "enc/lstm/bias": rng.normal(size=8).astype("float32"),
        "att/q": rng.normal(size=(4, 2, 2)).astype("float32"),
        "att/k": rng.normal(size=(4, 2, 2)).astype("float32"),
        "att/v": rng.normal(size=(4, 2, 2)).astype("float32"),
        "gru/b": rng.normal(size=(2, 6)).astype("float32"),
        "half": rng.normal(size=3).astype("float32"),
        "drop/seed_generator_state": np.zeros(2, "uint32"),
    }


def test_dry_run_needs_only_shapes():
    shapes = {k: v.shape for k, v in _sources().items()}
    specs = _mapping().plan(shapes).target_specs
    assert specs["fc.weight"] == TensorSpec((2, 3))
    assert specs["att.in_proj"].shape == (12, 4)
    assert specs["enc.bias_ih"].shape == specs["enc.bias_hh"].shape == (8,)
    assert specs["gru.bih"].shape == (6,)
    assert specs["bn.num_batches_tracked"] == TensorSpec((), "int64")
    assert specs["half16"].dtype == "float16"


def test_apply_values():
    src = _sources()
    out = _mapping().apply(src)
    np.testing.assert_array_equal(out["fc.weight"], src["fc/kernel"].T)
    np.testing.assert_array_equal(out["enc.bias_hh"], np.zeros(8, "float32"))
    np.testing.assert_array_equal(out["att.in_proj"][4:8], src["att/k"].reshape(4, 4).T)
    z, r, h = np.split(src["gru/b"][1], 3)
    np.testing.assert_array_equal(out["gru.bhh"], np.concatenate([r, z, h]))
    assert out["half16"].dtype == np.float16
    assert "drop/seed_generator_state" not in out and len(out) == 9
    assert all(v.flags.c_contiguous for v in out.values())


def test_inverse_is_bit_identical():
    src = _sources()
    plan = _mapping().plan(src)
    back = plan.inverse().apply(plan.apply(src))
    src.pop("drop/seed_generator_state")
    src["half"] = src["half"].astype("float16").astype("float32")  # the cast itself is lossy
    assert back.keys() == src.keys()
    for k in src:
        assert back[k].dtype == src[k].dtype
        np.testing.assert_array_equal(back[k], src[k], err_msg=k)


def test_slots_go_through_layout_ops_and_repeat_instead_of_zeros():
    src = _sources()
    plan = _mapping().plan(src)
    slots = plan.apply(src, slots=True)
    np.testing.assert_array_equal(slots["enc.bias_hh"], src["enc/lstm/bias"])
    np.testing.assert_array_equal(slots["fc.weight"], src["fc/kernel"].T)
    back = plan.inverse().apply(slots, slots=True)
    np.testing.assert_array_equal(back["enc/lstm/bias"], src["enc/lstm/bias"])


def test_table_lists_keys_transforms_and_shapes():
    table = str(_mapping().plan(_sources()))
    lines = table.splitlines()
    assert lines[0].split() == ["source", "target", "transforms", "shapes"]
    row = next(l for l in lines if l.startswith("fc/kernel"))
    assert "fc.weight" in row and "Transpose((1, 0))" in row and "(3, 2) -> (2, 3)" in row
    assert any("att/k" in l and "att.in_proj" not in l for l in lines)  # one row per source
    assert any("(dropped)" in l for l in lines)
    assert lines[-1] == "note: a note"


def test_mapping_file_round_trip(tmp_path):
    m = _mapping()
    path = tmp_path / "map.json"
    m.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "ckptfmt-mapping" and doc["version"] == 1
    assert doc["rules"][0] == {"rule": "Convert", "sources": ["*/kernel"], "targets": ["*.weight"], "ops": [{"op": "Transpose", "axes": [1, 0]}]}
    loaded = Mapping.load(path)
    assert loaded == m
    src = _sources()
    a, b = m.apply(src), loaded.apply(src)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_inverse_mapping_file(tmp_path):
    src = _sources()
    m = _mapping()
    back = m.inverse(src)
    assert Mapping.from_json(back.to_json()) == back
    torch_side = m.apply(src)
    restored = Mapping.from_json(back.to_json()).apply(torch_side)
    np.testing.assert_array_equal(restored["att/v"], src["att/v"])


@pytest.mark.parametrize(
    "text, match",
    [
        ("not json", "not valid JSON"),
        ('{"format": "other"}', "not a mapping file"),
        ('{"format": "ckptfmt-mapping", "version": 99}', "version 99"),
        ('{"format": "ckptfmt-mapping", "version": 1, "rules": [{"rule": "Explode"}]}', "rule #0.*Explode"),
        ('{"format": "ckptfmt-mapping", "version": 1, "rules": [{"rule": "Convert", "sources": ["a"], "targets": ["b"], "ops": [{"op": "Nope"}]}]}', "Nope"),
    ],
)
def test_bad_mapping_files(text, match):
    with pytest.raises(FormatError, match=match):
        Mapping.from_json(text)


def test_strict_lists_every_unmapped_key():
    m = Mapping((Rename("a", "x"), Convert(("q",), ("qk",), (Concat(0),))))
    sources = {"a": (2,), "b": (2,), "c/d": (3,), "q": (1,)}
    with pytest.raises(UnmappedKeyError) as e:
        m.plan(sources, {"x": (2,), "qk": (1,), "y": (4,), "z": (1,)})
    err = e.value
    assert isinstance(err, ConversionError) and isinstance(err, ValueError)
    assert err.unmapped_sources == ["b", "c/d"]
    assert err.missing_targets == ["y", "z"]
    for key in ("b", "c/d", "y", "z"):
        assert key in str(err)
    plan = m.plan(sources, {"x": (2,), "qk": (1,), "y": (4,)}, strict=False)
    assert sorted(plan.target_specs) == ["qk", "x"]


def test_missing_sibling_and_unexpected_target_are_listed():
    m = Mapping((Convert(("*/q",), ("*.qkv",), (Concat(0),)),))
    with pytest.raises(UnmappedKeyError) as e:
        Mapping((Convert(("*/q", "*/k"), ("*.qk",), (Concat(0),)),)).plan({"l/q": (2,)})
    assert "l/k (needed with l/q)" in str(e.value)
    with pytest.raises(UnmappedKeyError, match="target does not have"):
        m.plan({"l/q": (2,)}, {"other": (2,)})


def test_shape_errors_are_conversion_errors_listing_all():
    m = Mapping((Convert(("*",), ("*",), (Transpose((1, 0)),)),))
    with pytest.raises(ConversionError) as e:
        m.plan({"a": (2, 3), "b": (4,), "c": (5,)})
    assert "b:" in str(e.value) and "c:" in str(e.value)
    with pytest.raises(ConversionError, match="expects"):
        m.plan({"a": (2, 3)}, {"a": (2, 3)})


def test_roles_from_object_graph_keys():
    """Layer descriptions built from a TF checkpoint's object graph resolve the same roles."""
    from ckptfmt.converters.mapping import KerasLayer, KerasWeight, layer_rules

    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    bn = KerasLayer("bn", "BatchNormalization", {}, tuple(
        KerasWeight(f"model/_operations/2/{n}{suffix}", (4,)) for n in ("gamma", "beta", "moving_mean", "moving_variance")))
    assert sorted(bn.roles()) == ["beta", "gamma", "moving_mean", "moving_variance"]
    mha = KerasLayer("att", "MultiHeadAttention", {}, tuple(
        KerasWeight(f"model/_operations/1/_{n}_dense/_{w}{suffix}", s)
        for n in ("query", "key", "value") for w, s in (("kernel", (4, 2, 2)), ("bias", (2, 2)))
    ) + (KerasWeight(f"model/_operations/1/_output_dense/_kernel{suffix}", (2, 2, 4)), KerasWeight(f"model/_operations/1/_output_dense/_bias{suffix}", (4,))))
    plan = layer_rules(mha, "att").plan(mha.specs())
    assert plan.target_specs["att.in_proj_weight"].shape == (12, 4)


@pytest.mark.parametrize("module", ["ckptfmt.converters.mapping.rules", "ckptfmt.converters.mapping.ops", "ckptfmt.converters.mapping._rule_types",
                                    "ckptfmt.converters.mapping._resolve", "ckptfmt.converters.mapping._mapfile",
                                    "ckptfmt.converters.mapping.layers", "ckptfmt.converters.optim.convert"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_scalar_targets_keep_their_shape():
    from ckptfmt.converters.mapping import Mapping
    from ckptfmt.converters.mapping.rules import Convert, Fill

    plan = Mapping((Convert((), ("bn.num_batches_tracked",), (Fill((), "int64", 0),)),)).plan({})
    out = plan.apply({})
    assert out["bn.num_batches_tracked"].shape == () and out["bn.num_batches_tracked"].dtype == np.int64


def test_one_pattern_rule_fills_num_batches_tracked_for_every_batchnorm(tmp_path):
    """AppendFill: the 121 literal Fill rules a DenseNet mapping file needed are one rule."""
    from ckptfmt.converters.mapping import AppendFill

    src = {f"bn{i}/moving_mean": rng.standard_normal(3).astype(np.float32) for i in range(4)}
    m = Mapping((Convert(("re:(.*)/moving_mean",), (r"\1.running_mean", r"\1.num_batches_tracked"), (AppendFill((), "int64"),)),))
    m.save(tmp_path / "m.json")
    m = Mapping.load(tmp_path / "m.json")
    out = m.apply(src)
    assert sorted(out) == sorted([f"bn{i}.{k}" for i in range(4) for k in ("running_mean", "num_batches_tracked")])
    assert out["bn2.num_batches_tracked"].dtype == np.int64 and out["bn2.num_batches_tracked"].shape == ()
    np.testing.assert_array_equal(out["bn3.running_mean"], src["bn3/moving_mean"])
    back = m.plan(src).inverse().apply(out)
    assert set(back) == set(src) and all(np.array_equal(back[k], src[k]) for k in src)


def test_subtract_folds_a_conv_bias_into_the_running_mean_and_back_is_equivalent():
    from ckptfmt.converters.mapping import Subtract

    mean, bias = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    m = Mapping((Convert(("bn/moving_mean", "conv/bias"), ("bn.running_mean",), (Subtract(),)),))
    out = m.apply({"bn/moving_mean": mean, "conv/bias": bias})
    np.testing.assert_array_equal(out["bn.running_mean"], mean - bias)
    back = m.plan({"bn/moving_mean": mean, "conv/bias": bias}).inverse().apply(out)
    # the way back: the folded mean and a zero bias, which compute what mean and bias did
    np.testing.assert_array_equal(back["bn/moving_mean"] - back["conv/bias"], mean - bias)
    assert not back["conv/bias"].any()
    with pytest.raises(ConversionError, match="one shape"):
        m.plan({"bn/moving_mean": (4,), "conv/bias": (3,)})
