"""Shapes, output ranges, train/eval behaviour and initialisation of G, D and T."""

from __future__ import annotations

import torch

from conftest import compose_config
from pixelda.model import Classifier, Discriminator, Generator, MaxPool2x2, build_networks


def test_shapes_and_ranges():
    torch.manual_seed(0)
    G, D, T = Generator(blocks=2, filters=16, noise_dim=10), Discriminator(filters=8), Classifier()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    z = torch.rand(4, 10) * 2 - 1
    fake = G(x, z)
    assert fake.shape == (4, 3, 32, 32)
    assert fake.abs().max() <= 1.0
    assert D(fake).shape == (4,)
    assert T(fake).shape == (4, 10)


def test_outputs_are_logits_not_probabilities():
    torch.manual_seed(0)
    T = Classifier()
    T.eval()
    logits = T(torch.randn(8, 3, 32, 32) * 3)
    # a softmax output would sum to 1 per row
    assert not torch.allclose(logits.sum(dim=1), torch.ones(8))


def test_discriminator_noise_only_in_training():
    torch.manual_seed(0)
    D = Discriminator(filters=8, noise_std=0.2, dropout=0.1)
    x = torch.randn(4, 3, 32, 32)
    D.eval()
    assert torch.equal(D(x), D(x))
    D.train()
    assert not torch.equal(D(x), D(x))


def test_discriminator_batchnorm_option():
    with_bn = Discriminator(filters=8, batchnorm=True)
    without = Discriminator(filters=8, batchnorm=False)
    count = lambda net: sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # noqa: E731
    assert count(with_bn) == 3
    assert count(without) == 0


def test_generator_follows_config():
    cfg = compose_config(["model=resnet3", "model.generator.filters=16", "model.generator.noise_dim=10"])
    G = build_networks(cfg.model)["G"]
    assert len(G.blocks) == 3
    assert G.stem[0].out_channels == 16
    assert G.noise_to_plane.in_features == 10


def test_init_normal_002_zero_bias():
    torch.manual_seed(0)
    nets = build_networks(compose_config([]).model)
    conv = nets["G"].blocks[0].body[0]
    assert abs(conv.weight.std().item() - 0.02) < 0.002
    linear = nets["T"].head[0]
    assert torch.count_nonzero(linear.bias) == 0
    bn = nets["G"].stem[1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))


def test_discriminator_compiles_without_graph_breaks():
    # In eager mode D's noise and dropout fill large CPU tensors from a thread pool. Under
    # torch.compile they must stay inside the graph, or Dynamo recompiles for every shape.
    torch._dynamo.reset()
    D = Discriminator(filters=64).train()
    explanation = torch._dynamo.explain(D)(torch.randn(64, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_pool_without_autograd_matches_max_pool2d():
    pool = MaxPool2x2()
    for shape, layout, dtype in (((4, 8, 32, 32), torch.channels_last, torch.bfloat16),
                                 ((3, 5, 17, 15), torch.contiguous_format, torch.float32)):
        x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
        x[0, 0, :2, :2] = 1.0  # a window of ties
        with torch.inference_mode():
            fast = pool(x)
        assert torch.equal(fast, torch.nn.functional.max_pool2d(x, 2))

    # with autograd the indices of max_pool2d route the gradient to one element per window
    x = torch.ones(1, 1, 2, 2, requires_grad=True)
    pool(x).sum().backward()
    assert x.grad.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


def test_classifier_relu_after_pool_unchanged():
    torch.manual_seed(0)
    T = Classifier(dropout=0.0)
    x = torch.randn(6, 3, 32, 32, requires_grad=True)
    reference = torch.nn.functional.max_pool2d(torch.relu(T.first(x)), 2)
    reference = torch.nn.functional.max_pool2d(torch.relu(T.features[2](reference)), 2)
    reference = T.head(reference.flatten(1))
    grad_reference = torch.autograd.grad(reference.square().sum(), x)[0]
    out = T(x)
    assert torch.equal(out, reference)
    assert torch.equal(torch.autograd.grad(out.square().sum(), x)[0], grad_reference)
    T.eval()
    with torch.inference_mode():
        assert torch.equal(T(x.detach()), reference.detach())
