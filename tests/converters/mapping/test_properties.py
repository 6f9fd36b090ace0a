"""Property tests: every built-in layer conversion, for any consistent shapes, is undone
exactly by its inverse plan, for weights and for optimizer slots (no model is run)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptfmt.converters.mapping import KerasLayer, KerasWeight, layer_rules

dim = st.integers(1, 5)


@st.composite
def layers(draw):
    """A Keras layer description with consistent shapes, and a flatten_from for Dense."""
    kind = draw(st.sampled_from(["Dense", "Dense-flat", "Conv1D", "Conv2D", "Conv3D", "Conv2DTranspose", "DepthwiseConv2D",
                                 "SeparableConv2D", "BatchNormalization", "LayerNormalization", "Embedding", "LSTM", "GRU",
                                 "Bidirectional-LSTM", "Bidirectional-GRU", "MultiHeadAttention"]))
    a, b, k, u = draw(dim), draw(dim), draw(dim), draw(dim)
    bias = draw(st.booleans())
    flatten = None
    if kind in ("Dense", "Dense-flat"):
        if kind == "Dense-flat":
            flatten = (draw(dim), draw(dim), a)  # (H, W, C) before the Flatten
            a = flatten[0] * flatten[1] * a
        w = {"kernel": (a, b), **({"bias": (b,)} if bias else {})}
        kind = "Dense"
    elif kind.startswith("Conv") and "Transpose" not in kind:
        n = int(kind[4])
        w = {"kernel": (k,) * n + (a, b), **({"bias": (b,)} if bias else {})}
    elif kind == "Conv2DTranspose":
        w = {"kernel": (k, k, a, b), **({"bias": (a,)} if bias else {})}
    elif kind == "DepthwiseConv2D":
        w = {"kernel": (k, k, a, b), **({"bias": (a * b,)} if bias else {})}
    elif kind == "SeparableConv2D":
        w = {"depthwise_kernel": (k, k, a, b), "pointwise_kernel": (1, 1, a * b, u), **({"bias": (u,)} if bias else {})}
    elif kind == "BatchNormalization":
        w = {n: (a,) for n in ("gamma", "beta", "moving_mean", "moving_variance")}
    elif kind == "LayerNormalization":
        w = {"gamma": (a,), "beta": (a,)}
    elif kind == "Embedding":
        w = {"embeddings": (a, b)}
    elif kind in ("LSTM", "GRU"):
        g = 4 if kind == "LSTM" else 3
        w = {"cell/kernel": (a, g * u), "cell/recurrent_kernel": (u, g * u), "cell/bias": (g * u,) if kind == "LSTM" else (2, g * u)}
    elif kind.startswith("Bidirectional"):
        inner = kind.split("-")[1]
        g = 4 if inner == "LSTM" else 3
        bshape = (g * u,) if inner == "LSTM" else (2, g * u)
        w = {f"{d}_{inner.lower()}/cell/{n}": s for d in ("forward", "backward")
             for n, s in (("kernel", (a, g * u)), ("recurrent_kernel", (u, g * u)), ("bias", bshape))}
        kind = "Bidirectional"
    else:  # MultiHeadAttention: num_heads * key_dim == d
        heads, hd = a, b
        d = heads * hd
        w = {f"{n}/kernel": (d, heads, hd) for n in ("query", "key", "value")}
        w["attention_output/kernel"] = (heads, hd, d)
        if bias:
            w.update({f"{n}/bias": (heads, hd) for n in ("query", "key", "value")})
            w["attention_output/bias"] = (d,)
    weights = tuple(KerasWeight(f"lyr/{n}", s) for n, s in w.items())
    return KerasLayer("lyr", kind, {}, weights), flatten


@settings(max_examples=150, deadline=None)
@given(layers(), st.integers(0, 2**32 - 1))
def test_every_layer_conversion_inverts_exactly(case, seed):
    layer, flatten = case
    rng = np.random.default_rng(seed)
    src = {w.key: rng.standard_normal(w.shape).astype(np.float32) for w in layer.weights}
    plan = layer_rules(layer, "m", flatten_from=flatten).plan(layer.specs())
    torch_side = plan.apply(src)
    assert set(torch_side) == set(plan.target_specs)
    for key, spec in plan.target_specs.items():
        assert torch_side[key].shape == tuple(spec.shape), key
    back = plan.inverse().apply(torch_side)
    assert set(back) == set(src)
    for key, value in src.items():
        np.testing.assert_array_equal(back[key], value, err_msg=f"{layer.class_name} {key}")
    # optimizer slots take the slot variant of every op, both ways
    slots = plan.apply(src, slots=True)
    back = plan.inverse().apply(slots, slots=True)
    for key, value in src.items():
        np.testing.assert_array_equal(back[key], value, err_msg=f"{layer.class_name} {key} (slots)")
