"""The networks' layers over inputs batched over steps run as one Function (nets._Chain): the
same values and gradients as the layers one by one, which autograd differentiates."""

import pytest
import torch

from seqvae import nets
from seqvae.nets import MLP, GaussianNet, MLPHead


def _run(fn, inputs, module, chained: bool):
    """fn's output and the gradients of a fixed random weighting of it, w.r.t. inputs and parameters."""
    with pytest.MonkeyPatch.context() as mp:
        if not chained:
            mp.setattr(nets, "_chained", lambda *a: False)
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        module.zero_grad(set_to_none=True)
        out = fn(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
        loss.backward()
    return [o.detach() for o in outs], [x.grad for x in xs], [p.grad.clone() for p in module.parameters()]


def _chained_and_not(run):
    """run()'s results with the networks as one _Chain, then through the layers' own path."""
    results = []
    for chained in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not chained:
                mp.setattr(nets, "_chained", lambda *a: False)
            results.append(run())
    return results


@pytest.fixture(params=["C++ helpers", "ATen"])
def helpers(request, monkeypatch):
    """_Chain with its C++ bias/ReLU passes (fused.py's build) and with ATen's operations alone."""
    if request.param == "ATen":
        monkeypatch.setattr(nets, "_native", lambda x: None)
    elif nets._native(torch.zeros(1)) is None:
        pytest.skip("the C++ extension could not be built here (see the warning); the ATen case runs")
    return request.param


CASES = {
    "MLP (ReLU after every layer)": (lambda: MLP([7, 5, 6]), lambda m: m, [(4, 3, 7)]),
    "MLPHead, one input": (lambda: MLPHead([7], [5, 6, 3]), lambda m: m, [(4, 3, 7)]),
    "MLPHead, one layer": (lambda: MLPHead([7], [3]), lambda m: m, [(2, 4, 3, 7)]),
    "MLPHead.over, two inputs": (lambda: MLPHead([7, 2], [5, 5, 3]), lambda m: m.over, [(4, 3, 7), (4, 3, 2)]),
    "GaussianNet": (lambda: GaussianNet([6], [5], 2), lambda m: m, [(3, 4, 6)]),
    "MLPHead.over, one tensor twice": (lambda: MLPHead([2, 2], [5, 3]), lambda m: (lambda x: m.over(x, x)), [(4, 3, 2)]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_chain_equals_the_layers_one_by_one(case, dtype, helpers, monkeypatch):
    make, call, shapes = CASES[case]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.manual_seed(0)
    module = make().to(dtype)
    with torch.no_grad():  # biases away from zero and ReLUs both on and off
        for p in module.parameters():
            p.normal_()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    fn = call(module)
    applied = []
    chain_apply = nets._Chain.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nets._Chain, "apply", lambda *a: applied.append(1) or chain_apply(*a))
        got = _run(fn, inputs, module, True)
    assert applied == [1]  # the chained run did run as one Function
    expected = _run(fn, inputs, module, False)
    for a, b in zip(sum(got, []), sum(expected, [])):
        assert torch.allclose(a, b, rtol=tol, atol=tol)
    relu_in = module.layers[0] if isinstance(module, (MLP, MLPHead)) else module.net.layers[0]
    assert relu_in.weight.grad is not None and relu_in.weight.grad.abs().sum() > 0


def test_chain_passes_gradcheck(helpers):
    torch.manual_seed(0)
    net = MLPHead([3, 2], [4, 4, 2]).double()
    xs = (torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True))
    params = [p for layer in net.layers for p in (layer.weight, layer.bias)]
    plan = ((((0, slice(0, 3)), (1, slice(3, 5))), False, 3),)  # one network: its first layer over two inputs
    assert torch.autograd.gradcheck(lambda a, b, *ps: nets._Chain.apply(plan, a, b, *ps), (*xs, *params))
    relu_net = MLP([3, 4, 2]).double()  # ReLU after the last layer too
    params = [p for layer in relu_net.layers for p in (layer.weight, layer.bias)]
    plan = ((((0, slice(None)),), True, 2),)
    assert torch.autograd.gradcheck(lambda a, *ps: nets._Chain.apply(plan, a, *ps), (xs[0], *params))


def test_chain_output_changed_in_place_is_refused_in_backward():
    net = MLP([3, 4]).double()
    y = net(torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True))
    y.mul_(2)  # the saved ReLU output (the last layer's) is this tensor
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_per_step_inputs_keep_the_layers_path(monkeypatch):
    """2-D inputs (one step) are left to the layers (inside a time loop their weight gradients are
    batched by linear.unrolled)."""
    calls = []
    monkeypatch.setattr(nets._Chain, "apply", lambda *a: calls.append(a) or (torch.zeros(5, 2),))
    net = MLPHead([3], [4, 2])
    net(torch.randn(5, 3))
    assert calls == []
    net(torch.randn(1, 5, 3))
    assert len(calls) == 1


def test_inputs_with_different_leading_dimensions_keep_the_layers_path(monkeypatch):
    """over() broadcasts its inputs like the layers do (the chain flattens each to rows: it would
    pair rows wrongly or fail), and a network without layers passes its input through."""
    calls = []
    chain_apply = nets._Chain.apply
    monkeypatch.setattr(nets._Chain, "apply", lambda *a: calls.append(1) or chain_apply(*a))
    torch.manual_seed(0)
    net = MLPHead([4, 3], [5, 2]).double()
    x, h = torch.randn(6, 5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    expected = net(torch.cat([x, h.expand(6, 5, 3)], -1))
    assert torch.allclose(net.over(x, h), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError):  # (6, 5) against (5, 6): no broadcast, as with the layers
        net.over(x, torch.randn(5, 6, 3, dtype=torch.float64))
    y = torch.randn(2, 3, 4)
    assert MLP([4])(y) is y
    assert calls == [1]  # only the concatenated forward above ran as one Function


@pytest.mark.parametrize("frozen", ["input", "input and first layer", "everything but the last layer"])
def test_frozen_layers_and_inputs_get_no_gradient_and_the_rest_the_right_one(frozen, helpers):
    torch.manual_seed(0)
    net = MLPHead([7, 2], [5, 5, 3]).double()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 7, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, generator=g, dtype=torch.float64)]
    frozen_params = {"input": [], "input and first layer": list(net.layers[0].parameters()),
                     "everything but the last layer": list(net.layers[0].parameters()) + list(net.layers[1].parameters())}[frozen]
    for p in frozen_params:
        p.requires_grad_(False)

    def run():
        net.zero_grad(set_to_none=True)
        out = net.over(*xs)  # the inputs need no gradient
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)).sum().backward()
        return [None if p.grad is None else p.grad.clone() for p in net.parameters()]

    results = _chained_and_not(run)
    for got, expected, p in zip(*results, net.parameters()):
        assert (got is None) == (expected is None) == (not p.requires_grad)
        if got is not None:
            assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_second_derivatives_through_the_fast_path_raise_and_the_step_loop_gives_them(monkeypatch):
    """Gradients from the hand-written backwards (_Chain, the fused pass) taken with
    create_graph=True are right but refuse a second differentiation, rather than being taken for
    constants; with SEQVAE_FUSED=0 autograd's own step loop runs and gives second derivatives."""
    import seqvae

    torch.manual_seed(0)
    model = seqvae.VRNN(x_dim=3, hidden_size=4, z_size=2, feature_size=4).double()
    x = (torch.rand(2, 3, 3, dtype=torch.float64) > 0.5).double()
    weight = model.decoder.layers[-1].weight
    monkeypatch.setenv("SEQVAE_FUSED", "1")
    (g,) = torch.autograd.grad(seqvae.elbo(model, x).sum(), weight, create_graph=True)  # first order: fine
    with pytest.raises(RuntimeError, match="differentiate twice.*SEQVAE_FUSED=0"):
        g.pow(2).sum().backward()
    net = MLP([3, 4]).double()  # the chain alone, under a plain sum (incoming gradients need no grad)
    (g,) = torch.autograd.grad(net(torch.randn(2, 5, 3, dtype=torch.float64)).sum(), net.layers[0].weight,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.pow(2).sum().backward()
    monkeypatch.setenv("SEQVAE_FUSED", "0")
    (g,) = torch.autograd.grad(seqvae.elbo(model, x).sum(), weight, create_graph=True)
    g.pow(2).sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def _heads(layout: str, dtype):
    """Heads and the inputs each reads, by name: x (b, t, 7), h (b, t, 2), y (b, t, 3)."""
    torch.manual_seed(0)
    make = {  # name: (head, its inputs)
        "A": (lambda: MLPHead([7, 2], [5, 5, 3]), ("x", "h")),  # a decoder: over [x, h]
        "B": (lambda: MLPHead([2], [4, 6]), ("h",)),  # a prior: over h
        "C": (lambda: MLPHead([2, 3], [3]), ("h", "y")),  # one layer, over [h, y]
        "D": (lambda: MLPHead([3], [4, 2]), ("y",)),
    }
    heads = torch.nn.ModuleList(make[name][0]().to(dtype) for name in layout)
    with torch.no_grad():  # biases away from zero and ReLUs both on and off
        for p in heads.parameters():
            p.normal_()
    return heads, [make[name][1] for name in layout]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["AB", "ABC", "ADB", "CA", "DCB"])
def test_heads_sharing_an_input_equal_the_heads_one_by_one(layout, dtype, helpers):
    """nets.heads_over: heads given the same tensor share its products in one _Chain (ABC: h read
    by three heads side by side; ADB: by two heads with another between, whose products are then
    made separately; CA: a one-layer head first; DCB: y's product writes D's and C's columns, then
    h's finds C's written and B's not); values and every gradient as each head alone."""
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    heads, reads = _heads(layout, dtype)
    g = torch.Generator().manual_seed(0)
    names = ["x", "h", "y"]
    inputs = [torch.randn(4, 3, width, generator=g, dtype=dtype) for width in (7, 2, 3)]

    def fn(*xs):
        tensors = dict(zip(names, xs))
        return tuple(nets.heads_over(*((head, tuple(tensors[n] for n in r)) for head, r in zip(heads, reads))))

    applied = []
    chain_apply = nets._Chain.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nets._Chain, "apply", lambda *a: applied.append(1) or chain_apply(*a))
        got = _run(fn, inputs, heads, True)
    assert applied == [1]  # all heads as one Function
    expected = _run(fn, inputs, heads, False)
    for a, b in zip(sum(got, []), sum(expected, [])):
        assert (a is None) == (b is None)  # (an input no head reads: none)
        assert a is None or (a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol))


def test_heads_sharing_an_input_pass_gradcheck(helpers):
    heads, reads = _heads("ADB", torch.float64)
    plan = ((((0, slice(0, 7)), (1, slice(7, 9))), False, 3), (((2, slice(None)),), True, 2), (((1, slice(None)),), False, 2))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, w, generator=g, dtype=torch.float64, requires_grad=True) for w in (7, 2, 3)]
    params = [p for head in heads for layer in head.layers for p in (layer.weight, layer.bias)]
    assert torch.autograd.gradcheck(lambda *a: nets._Chain.apply(plan, *a), (*xs, *params))


def test_a_head_whose_output_is_unused_or_frozen_gets_no_gradient_and_the_others_the_right_one(helpers):
    """Of two heads sharing h: the prior's output unused (its parameters get no gradient, h the
    decoder's alone), then the decoder's first layer frozen and h needing none."""
    heads, _ = _heads("AB", torch.float64)
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(4, 3, 7, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    for case in ("prior unused", "decoder's first layer frozen"):
        if case != "prior unused":
            for p in heads[0].layers[0].parameters():
                p.requires_grad_(False)

        def run():
            heads.zero_grad(set_to_none=True)
            hx = h.clone().requires_grad_(case == "prior unused")
            dec, prior = nets.heads_over((heads[0], (x, hx)), (heads[1], (hx,)))
            loss = (dec * torch.randn(dec.shape, generator=torch.Generator().manual_seed(1), dtype=dec.dtype)).sum()
            if case != "prior unused":
                loss = loss + prior.square().sum()
            loss.backward()
            return [None if p.grad is None else p.grad.clone() for p in heads.parameters()] + [hx.grad]

        results = _chained_and_not(run)
        for got, expected in zip(*results):
            assert (got is None) == (expected is None)
            if got is not None:
                assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
        if case == "prior unused":
            assert all(p.grad is None for p in heads[1].parameters()) and results[0][-1] is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows, units", [(37, 5), (301, 60), (8, 100)])  # tiles of 8 rows, part tiles; 301 x 60: a block per thread
def test_grad_colsum_is_relus_gradient_and_its_column_sums(rows, units, dtype):
    """The C++ ReLU backward with the bias's gradient, in place or into a new tensor, against
    threshold_backward and a sum in double."""
    lib = nets._native(torch.zeros(1))
    if lib is None:
        pytest.skip("the C++ extension could not be built here (see the warning)")
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(rows, units, generator=g, dtype=dtype)
    act = torch.randn(rows, units, generator=g, dtype=dtype).relu()
    want = torch.ops.aten.threshold_backward(grad, act, 0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    out = torch.full_like(grad, float("nan"))
    kept = grad.clone()
    sums = lib.grad_colsum(grad, act, out)
    assert torch.equal(out, want) and torch.equal(grad, kept)  # into out; the gradient untouched
    torch.testing.assert_close(sums.double(), want.double().sum(0), rtol=tol, atol=tol)
    sums = lib.grad_colsum(grad, act)
    assert torch.equal(grad, want)  # in place
    torch.testing.assert_close(sums.double(), want.double().sum(0), rtol=tol, atol=tol)
    torch.testing.assert_close(lib.grad_colsum(kept, None).double(), kept.double().sum(0), rtol=tol, atol=tol)
