import io

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from rayforge.errors import RayforgeError
from rayforge.models import build_model, model_names, param_count, register_model

PAPER_SHAPES = {
    "lenet5": (1, 32, 32),
    "vgg_mini": (3, 32, 32),
    "resnet_mini": (3, 32, 32),
    "logreg": (3, 32, 32),
    "cnn32_3_max": (1, 32, 32),  # LiRA's MNIST shadows
    "wrn28_2": (3, 32, 32),  # LiRA's CIFAR-10 shadows
}


def test_model_names_sorted_and_complete():
    names = model_names()
    assert names == sorted(names)
    assert {"lenet5", "vgg_mini", "resnet_mini", "logreg", "cnn32_3_max", "wrn28_2"} <= set(names)


@pytest.mark.parametrize(
    "name,in_shape,expected",
    [
        ("lenet5", (1, 32, 32), 61_706),
        ("vgg_mini", (3, 32, 32), 5_747_210),
        ("resnet_mini", (3, 32, 32), 1_488_906),
        ("logreg", (1, 8, 8), 64 * 10 + 10),
        ("cnn32_3_max", (3, 32, 32), 605_226),
        ("cnn32_3_max", (1, 32, 32), 604_650),
        ("wrn28_2", (3, 32, 32), 1_467_610),
    ],
)
def test_exact_param_counts(name, in_shape, expected):
    assert param_count(build_model(name, in_shape, 10)) == expected


def test_param_count_excludes_buffers_and_frozen():
    m = build_model("vgg_mini", (3, 32, 32))
    assert sum(b.numel() for b in m.buffers()) > 0
    n = param_count(m)
    m.classifier[-1].weight.requires_grad_(False)
    assert param_count(m) == n - 64 * 10


@pytest.mark.parametrize("name", sorted(PAPER_SHAPES))
def test_output_shape(name):
    torch.manual_seed(0)
    in_shape = PAPER_SHAPES[name]
    m = build_model(name, in_shape, 10)
    out = m(torch.randn(2, *in_shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_every_registered_model_outputs_batch_by_classes():
    for name in model_names():
        in_shape = PAPER_SHAPES.get(name, (3, 32, 32))
        out = build_model(name, in_shape, 10)(torch.randn(2, *in_shape))
        assert out.shape == (2, 10), name


@pytest.mark.parametrize(
    "name,in_shape",
    [("lenet5", (3, 32, 32)), ("vgg_mini", (1, 16, 24)), ("resnet_mini", (1, 28, 28)), ("logreg", (1, 8, 8)),
     ("cnn32_3_max", (3, 28, 20)), ("wrn28_2", (1, 28, 28))],
)
def test_other_input_shapes_and_class_counts(name, in_shape):
    m = build_model(name, in_shape, num_classes=7)
    assert m(torch.randn(2, *in_shape)).shape == (2, 7)


def test_shadow_model_counts_from_their_layer_lists():
    """The LiRA shadows' counts recomputed from objax's layer lists (3x3 convs unless noted)."""
    widths = [32, 64, 128, 256]
    conv = lambda cin, cout, k=3, bias=True: cin * cout * k * k + (cout if bias else 0)  # noqa: E731
    cnn = conv(3, 32) + sum(conv(widths[s], widths[s]) + conv(widths[s], widths[s + 1]) for s in range(3))
    assert param_count(build_model("cnn32_3_max", (3, 32, 32))) == cnn + conv(256, 10)
    total, cin = conv(3, 16, bias=False), 16
    for cout in (32, 64, 128):  # 4 pre-activation blocks per group: BN, conv, BN, conv (+ 1x1 projection)
        for b in range(4):
            total += 2 * cin + conv(cin, cout, bias=False) + 2 * cout + conv(cout, cout, bias=False)
            total += conv(cin, cout, k=1, bias=False) if b == 0 else 0
            cin = cout
    assert param_count(build_model("wrn28_2", (3, 32, 32))) == total + 2 * 128 + 128 * 10 + 10


def test_wrn_stride_two_pads_like_tensorflow_same():
    """A stride-2 3x3 'SAME' conv on an even input pads nothing before and one pixel after: the output at (0, 0)
    sees input rows/columns 0..2, not the zero border."""
    from rayforge.models.wrn import ConvSame

    conv = ConvSame(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    out = conv(torch.ones(1, 1, 8, 8))
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0] == 9.0 and out[0, 0, -1, -1] == 4.0


def test_lenet5_first_conv_takes_in_channels():
    assert param_count(build_model("lenet5", (3, 32, 32))) == 61_706 + 2 * 6 * 25


def test_unknown_model():
    with pytest.raises(RayforgeError, match=r"unknown model 'nope' \(known: .*lenet5"):
        build_model("nope")


@pytest.mark.parametrize(
    "name,in_shape", [("lenet5", (1, 28, 28)), ("vgg_mini", (3, 4, 4)), ("resnet_mini", (3, 2, 2)),
                      ("cnn32_3_max", (3, 4, 4)), ("wrn28_2", (3, 2, 2))]
)
def test_bad_spatial_size(name, in_shape):
    with pytest.raises(RayforgeError, match=name):
        build_model(name, in_shape)


@pytest.mark.parametrize("in_shape", [(1, 32), (0, 8, 8), (1, -8, 8), "abc", None])
def test_bad_in_shape(in_shape):
    with pytest.raises(RayforgeError, match="in_shape"):
        build_model("logreg", in_shape)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(RayforgeError, match="num_classes"):
        build_model("logreg", (1, 8, 8), num_classes)


def test_register_model_decorator():
    @register_model("_test_tiny")
    def tiny(in_shape, num_classes):
        return nn.Linear(in_shape[0], num_classes)

    try:
        assert "_test_tiny" in model_names()
        m = build_model("_test_tiny", (4, 1, 1), 3)
        assert isinstance(m, nn.Linear) and m.out_features == 3
        with pytest.raises(ValueError, match="already registered"):
            register_model("_test_tiny")(lambda s, k: nn.Identity())
    finally:
        from rayforge.models import registry

        registry._REGISTRY.pop("_test_tiny", None)


def _state_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    for k, v in model.state_dict().items():
        buf.write(k.encode())
        buf.write(v.detach().cpu().contiguous().numpy().tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(PAPER_SHAPES))
def test_deterministic_init(name):
    in_shape = PAPER_SHAPES[name]
    torch.manual_seed(1234)
    a = _state_bytes(build_model(name, in_shape))
    torch.manual_seed(1234)
    b = _state_bytes(build_model(name, in_shape))
    torch.manual_seed(4321)
    c = _state_bytes(build_model(name, in_shape))
    assert a == b
    assert a != c


@pytest.mark.parametrize("name", sorted(PAPER_SHAPES))
def test_functional_call_matches_module(name):
    torch.manual_seed(0)
    in_shape = PAPER_SHAPES[name]
    m = build_model(name, in_shape).eval()
    x = torch.randn(2, *in_shape)
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    with torch.no_grad():
        expected = m(x)
    got = functional_call(m, (params, buffers), (x,))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,in_shape", [("lenet5", (1, 32, 32)), ("logreg", (1, 8, 8))])
def test_per_sample_grads_match_loop(name, in_shape, dtype):
    """vmap(grad(.)) through functional_call == a loop of single-sample .backward() calls."""
    torch.manual_seed(0)
    m = build_model(name, in_shape).to(dtype)
    n = 3
    x = torch.randn(n, *in_shape, dtype=dtype)
    y = torch.tensor([0, 3, 9])
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss_one(p, xi, yi):
        out = functional_call(m, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)

    for i in range(n):
        m.zero_grad()
        nn.functional.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in m.named_parameters():
            assert per_sample[k].shape == (n, *p.shape)
            torch.testing.assert_close(per_sample[k][i], p.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["vgg_mini", "resnet_mini"])
def test_batchnorm_models_vmap_over_params_eval(name):
    """vmap over a stack of parameter sets (an ensemble) in eval mode: matches running each copy."""
    torch.manual_seed(0)
    in_shape = (3, 16, 16)  # small input keeps this fast; the architecture is otherwise the paper's
    models = [build_model(name, in_shape).eval() for _ in range(2)]
    x = torch.randn(2, *in_shape)
    stacked = {k: torch.stack([dict(mm.named_parameters())[k].detach() for mm in models]) for k, _ in models[0].named_parameters()}
    buffers = {k: v for k, v in models[0].named_buffers()}
    out = vmap(lambda p: functional_call(models[0], (p, buffers), (x,)))(stacked)
    with torch.no_grad():
        for i, mm in enumerate(models):
            torch.testing.assert_close(out[i], mm(x), atol=1e-5, rtol=1e-4)
