"""Every layer conversion: a live Keras layer and its torch module give the same outputs."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.torch, pytest.mark.tensorflow]

ATOL = 1e-5
rng = np.random.default_rng(1)


def _x(*shape):
    return rng.normal(size=shape).astype("float32")


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=0)


def _run_torch(torch, module, x):
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def test_dense(keras, torch, randomize, copy_layer):
    k = keras.layers.Dense(5)
    x = _x(4, 6)
    k(x)
    randomize(k)
    t = torch.nn.Linear(6, 5)
    copy_layer(k, t)
    _close(k(x), _run_torch(torch, t, x))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv(keras, torch, randomize, copy_layer, dims):
    kcls = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[dims]
    tcls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims]
    k = kcls(4, 3, dilation_rate=1 if dims == 3 else 2)
    x = _x(2, *([9] * dims), 3)
    k(x)
    randomize(k)
    t = tcls(3, 4, 3, dilation=k.dilation_rate)
    copy_layer(k, t)
    channels_first = np.moveaxis(x, -1, 1)
    _close(k(x), np.moveaxis(_run_torch(torch, t, np.ascontiguousarray(channels_first)), 1, -1))


def test_grouped_conv(keras, torch, randomize, copy_layer):
    k = keras.layers.Conv2D(6, 3, groups=2)
    x = _x(2, 7, 7, 4)
    k(x)
    randomize(k)
    t = torch.nn.Conv2d(4, 6, 3, groups=2)
    copy_layer(k, t)
    _close(k(x), _nchw_run(torch, t, x))


def _nchw_run(torch, t, x):
    return np.moveaxis(_run_torch(torch, t, np.ascontiguousarray(np.moveaxis(x, -1, 1))), 1, -1)


def test_depthwise(keras, torch, randomize, copy_layer):
    k = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)
    x = _x(2, 7, 7, 3)
    k(x)
    randomize(k)
    t = torch.nn.Conv2d(3, 6, 3, groups=3)
    copy_layer(k, t)
    _close(k(x), _nchw_run(torch, t, x))


def test_separable(keras, torch, randomize, copy_layer):
    k = keras.layers.SeparableConv2D(5, 3, depth_multiplier=2)
    x = _x(2, 7, 7, 3)
    k(x)
    randomize(k)

    class Sep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.depthwise = torch.nn.Conv2d(3, 6, 3, groups=3, bias=False)
            self.pointwise = torch.nn.Conv2d(6, 5, 1)

        def forward(self, x):
            return self.pointwise(self.depthwise(x))

    t = Sep()
    copy_layer(k, t)
    _close(k(x), _nchw_run(torch, t, x))


def test_conv2d_transpose_stride2_same(keras, torch, randomize, copy_layer):
    # TF 'same' crops the full transposed output at [pad_before, pad_before + n*s) with
    # pad_before = (k - s) // 2 = 0 here; torch's padding= crops both sides equally, so the
    # torch model uses padding=0 and crops the same window.
    k = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same")
    n = 5
    x = _x(2, n, n, 3)
    k(x)
    randomize(k)
    t = torch.nn.ConvTranspose2d(3, 4, 3, stride=2, padding=0)
    copy_layer(k, t)
    full = _nchw_run(torch, t, x)
    assert full.shape[1:3] == (2 * n + 1, 2 * n + 1)
    _close(k(x), full[:, : 2 * n, : 2 * n])


def test_batchnorm_eval(keras, torch, randomize, copy_layer):
    k = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.9)
    x = _x(4, 5, 5, 3)
    k(x)
    randomize(k)
    t = torch.nn.BatchNorm2d(3, eps=1e-3, momentum=0.1)
    plan = copy_layer(k, t)
    assert "momentum=0.1" in str(plan)
    _close(k(x, training=False), _nchw_run(torch, t, x))


def test_layernorm_custom_eps(keras, torch, randomize, copy_layer):
    k = keras.layers.LayerNormalization(epsilon=1e-2)
    x = _x(3, 4, 6)
    k(x)
    randomize(k)
    t = torch.nn.LayerNorm(6, eps=1e-2)
    copy_layer(k, t)
    _close(k(x), _run_torch(torch, t, x))


def test_embedding(keras, torch, randomize, copy_layer):
    k = keras.layers.Embedding(11, 4)
    ids = rng.integers(0, 11, size=(3, 5))
    k(ids)
    randomize(k)
    t = torch.nn.Embedding(11, 4)
    copy_layer(k, t)
    with torch.no_grad():
        _close(k(ids), t(torch.from_numpy(ids)).numpy())


def test_lstm(keras, torch, randomize, copy_layer):
    k = keras.layers.LSTM(5, return_sequences=True)
    x = _x(2, 6, 3)
    k(x)
    randomize(k)
    t = torch.nn.LSTM(3, 5, batch_first=True)
    copy_layer(k, t)
    with torch.no_grad():
        _close(k(x), t(torch.from_numpy(x))[0].numpy())


def test_gru_reset_after(keras, torch, randomize, copy_layer):
    k = keras.layers.GRU(5, return_sequences=True)
    x = _x(2, 6, 3)
    k(x)
    randomize(k)
    t = torch.nn.GRU(3, 5, batch_first=True)
    copy_layer(k, t)
    with torch.no_grad():
        _close(k(x), t(torch.from_numpy(x))[0].numpy())


def test_gru_reset_before_is_refused(keras, torch):
    from ckptfmt.converters.mapping import describe_keras_layer, layer_rules
    from ckptfmt.errors import ConversionError

    k = keras.layers.GRU(5, reset_after=False)
    k(_x(2, 6, 3))
    with pytest.raises(ConversionError, match="reset_after=False"):
        layer_rules(describe_keras_layer(k), "gru")


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_bidirectional(keras, torch, randomize, copy_layer, cell):
    k = keras.layers.Bidirectional(getattr(keras.layers, cell)(4, return_sequences=True))
    x = _x(2, 6, 3)
    k(x)
    randomize(k)
    t = getattr(torch.nn, cell)(3, 4, batch_first=True, bidirectional=True)
    copy_layer(k, t)
    with torch.no_grad():
        _close(k(x), t(torch.from_numpy(x))[0].numpy())


def test_multi_head_attention(keras, torch, randomize, copy_layer):
    d, heads = 8, 2
    k = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=d // heads)
    q, v = _x(2, 5, d), _x(2, 7, d)
    k(q, v)
    randomize(k)
    t = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    plan = copy_layer(k, t)
    assert plan.target_specs["in_proj_weight"].shape == (3 * d, d)
    t.eval()
    with torch.no_grad():
        out, _ = t(torch.from_numpy(q), torch.from_numpy(v), torch.from_numpy(v))
    _close(k(q, v), out.numpy())


def test_keras_torch_keras_is_bit_identical(keras, torch, randomize, kweights):
    """Every conversion inverts exactly on Keras weights (the LSTM bias comes back as b + 0)."""
    from ckptfmt.converters.mapping import describe_keras_layer, layer_rules

    layers = [
        (keras.layers.Dense(3), (2, 4)),
        (keras.layers.Conv2D(4, 3, groups=2), (1, 6, 6, 2)),
        (keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (1, 6, 6, 2)),
        (keras.layers.SeparableConv2D(3, 3), (1, 6, 6, 2)),
        (keras.layers.Conv2DTranspose(3, 3, strides=2), (1, 4, 4, 2)),
        (keras.layers.BatchNormalization(), (2, 3)),
        (keras.layers.LSTM(3), (1, 2, 4)),
        (keras.layers.GRU(3), (1, 2, 4)),
        (keras.layers.Bidirectional(keras.layers.GRU(3)), (1, 2, 4)),
    ]
    for k, shape in layers:
        k(_x(*shape))
        randomize(k)
        arrays = kweights(k)
        plan = layer_rules(describe_keras_layer(k), "m").plan(arrays)
        back = plan.inverse().apply(plan.apply(arrays))
        assert back.keys() == arrays.keys()
        for key in arrays:
            assert back[key].dtype == arrays[key].dtype
            np.testing.assert_array_equal(back[key], arrays[key], err_msg=key)
