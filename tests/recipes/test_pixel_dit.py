"""PositionalDiT: WanDiT on x + a learned position map; its JVP path agrees with torch.func.jvp."""

import torch

from rcm_nets.wan import WanDiT, get_config
from rcm_recipes.pixel_dit import PositionalDiT


def _net(dtype=torch.float64):
    dit = WanDiT(get_config("tiny-pixel", dim=32, ffn_dim=64, num_heads=2, num_layers=1, freq_dim=16, text_dim=8,
                            text_len=4, patch_size=(1, 4, 4)))
    dit.init_weights(torch.Generator().manual_seed(0))
    torch.nn.init.normal_(dit.head.head.weight, std=0.1, generator=torch.Generator().manual_seed(1))  # non-zero out
    return PositionalDiT(dit, frames=2, height=8, width=8, scale=0.5).to(dtype)


def test_position_map_is_added_to_the_input():
    net = _net()
    pos = net.position.detach()
    assert torch.allclose(pos[0, 0, 0], torch.linspace(-0.5, 0.5, 8, dtype=pos.dtype))  # x ramp along width
    assert torch.allclose(pos[2, :, 0, 0], torch.tensor([-0.5, 0.5], dtype=pos.dtype))  # time ramp
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 3, 2, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([100.0, 700.0], dtype=torch.float64)
    torch.testing.assert_close(net(x, t, ctx), net.dit(x + pos, t, ctx), rtol=0, atol=0)


def test_jvp_matches_torch_func_jvp():
    """float64 throughout, so the hand-written JVP and forward-mode AD agree to round-off (1e-10)."""
    net = _net()
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 3, 2, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([300.0, 900.0], dtype=torch.float64)
    tx, tt = torch.randn_like(x, dtype=torch.float64), torch.tensor([5.0, -2.0], dtype=torch.float64)
    with torch.no_grad():
        out, tout = net.forward_jvp(x, t, ctx, tx, tt)
        ref_out, ref_tout = torch.func.jvp(lambda a, b: net(a, b, ctx), (x, t), (tx, tt))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tout, ref_tout, rtol=1e-8, atol=1e-10)
    assert tout.abs().max() > 1e-3  # a real tangent, not zeros
