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
    assert torch.autograd.gradcheck(lambda a, b, *ps: nets._Chain.apply((slice(0, 3), slice(3, 5)), False, a, b, *ps), (*xs, *params))
    relu_net = MLP([3, 4, 2]).double()  # ReLU after the last layer too
    params = [p for layer in relu_net.layers for p in (layer.weight, layer.bias)]
    assert torch.autograd.gradcheck(lambda a, *ps: nets._Chain.apply((slice(None),), True, a, *ps), (xs[0], *params))


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
    monkeypatch.setattr(nets._Chain, "apply", lambda *a: calls.append(a) or torch.zeros(5, 2))
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
    results = []
    for chained in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not chained:
                mp.setattr(nets, "_chained", lambda *a: False)
            net.zero_grad(set_to_none=True)
            out = net.over(*xs)  # the inputs need no gradient
            (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)).sum().backward()
            results.append([None if p.grad is None else p.grad.clone() for p in net.parameters()])
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
