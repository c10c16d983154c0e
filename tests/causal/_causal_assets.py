"""Tiny networks and latent shards shared by the causal training tests (test_causal_train, test_causal_sizes)."""

from pathlib import Path

import torch
from torch import nn

from rcm_nets.wan import WanDiT
from rcm_nets.wan.configs import get_config
from rcm_train.data import ShardWriter

C, T, H, W = 16, 5, 4, 4  # tiny latents: 5 frames as c1-2 blocks, 2x2 tokens per frame


def tiny_net(seed: int, **overrides) -> WanDiT:
    """The tiny WanDiT (``overrides`` of its config, e.g. a narrower width) with seeded random weights."""
    net = WanDiT(get_config("tiny", **overrides))
    g = torch.Generator().manual_seed(seed)
    net.init_weights(generator=g)
    nn.init.normal_(net.head.head.weight, std=0.05, generator=g)  # a zero head would output exactly 0
    return net


def write_data(d: Path) -> None:
    """4 samples of [C, T, H, W] latents with 6-row embeddings in ``d/data`` (2 per shard), and a zero negative
    embedding ``d/negative.pt``."""
    g = torch.Generator().manual_seed(0)
    with ShardWriter(d / "data", 4, 2) as w:
        for i in w.pending():
            w.write(i, torch.randn(C, T, H, W, generator=g), torch.randn(6, 32, generator=g), f"prompt {i}")
    torch.save(torch.zeros(16, 32), d / "negative.pt")
