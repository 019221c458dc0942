"""Residual-MLP denoiser and random Fourier feature embedding (seed B.2, eq. 3; Table 8)."""

from __future__ import annotations

import pytest
import torch

from synther_buffer.denoiser import (RandomFourierFeatures, ResidualBlock, ResidualMLPDenoiser,
                                     count_parameters)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def expected_params(dim, width, depth, rff_dim, time_dim):
    """Closed-form parameter count of ResidualMLPDenoiser (the RFF frequencies are a buffer)."""
    proj = dim * time_dim + time_dim
    time_mlp = (rff_dim + 1) * time_dim + time_dim + time_dim * time_dim + time_dim
    linear_in = time_dim * width + width
    block = width * width + width + 2 * width           # linear + layernorm
    norm_out = 2 * width
    linear_out = width * dim + dim
    return proj + time_mlp + linear_in + depth * block + norm_out + linear_out


@pytest.mark.parametrize("batch", [1, 7])
def test_output_shape_and_dtype(batch):
    torch.manual_seed(0)
    net = ResidualMLPDenoiser(dim=5, width=32, depth=2, rff_dim=8, time_dim=16)
    out = net(torch.randn(batch, 5), torch.randn(batch))
    assert out.shape == (batch, 5)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_rff_embedding_shape_and_values():
    torch.manual_seed(0)
    rff = RandomFourierFeatures(16)
    t = torch.linspace(-2, 2, 11)
    emb = rff(t)
    assert emb.shape == (11, 17)                       # [t, sin x8, cos x8]
    torch.testing.assert_close(emb[:, 0], t)
    torch.testing.assert_close(emb[:, 1:9] ** 2 + emb[:, 9:] ** 2, torch.ones(11, 8))
    # Frequencies are a fixed buffer, not trained.
    assert "weights" in dict(rff.named_buffers())
    assert count_parameters(rff) == 0
    # Accepts [B, 1] as well as [B].
    assert rff(t[:, None]).shape == (11, 17)


def test_rff_odd_dim_raises():
    with pytest.raises(ValueError):
        RandomFourierFeatures(7)


@pytest.mark.parametrize("dim,width,depth,rff_dim,time_dim", [
    (3, 16, 1, 4, 8), (41, 128, 2, 16, 32), (41, 1024, 6, 16, 128),
])
def test_param_count_formula(dim, width, depth, rff_dim, time_dim):
    net = ResidualMLPDenoiser(dim, width, depth, rff_dim, time_dim)
    assert count_parameters(net) == expected_params(dim, width, depth, rff_dim, time_dim)


def test_paper_size_is_about_6m():
    n = expected_params(41, 1024, 6, 16, 128)
    assert 5_500_000 <= n <= 7_000_000
    # Width 2048 option (Table 8) is ~25M.
    assert 20_000_000 <= expected_params(41, 2048, 6, 16, 128) <= 30_000_000


def test_residual_blocks_present_and_residual():
    net = ResidualMLPDenoiser(4, width=32, depth=3, rff_dim=8, time_dim=16)
    assert len(net.blocks) == 3
    assert all(isinstance(b, ResidualBlock) for b in net.blocks)
    block = net.blocks[0]
    x = torch.randn(5, 32)
    # x_{L+1} = x_L + linear(relu(norm(x_L))): zeroing the linear makes the block the identity.
    with torch.no_grad():
        block.linear.weight.zero_()
        block.linear.bias.zero_()
    torch.testing.assert_close(block(x), x)
    with torch.no_grad():
        block.linear.bias.fill_(1.0)
    torch.testing.assert_close(block(x), x + 1.0)


def test_output_depends_on_noise_level():
    torch.manual_seed(0)
    net = ResidualMLPDenoiser(4, width=32, depth=2, rff_dim=8, time_dim=16)
    x = torch.randn(3, 4)
    a = net(x, torch.full((3,), -1.0))
    b = net(x, torch.full((3,), 1.0))
    assert not torch.allclose(a, b)


def test_gradients_flow_to_all_parameters():
    torch.manual_seed(0)
    net = ResidualMLPDenoiser(4, width=32, depth=2, rff_dim=8, time_dim=16)
    net(torch.randn(8, 4), torch.randn(8)).pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
