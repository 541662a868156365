"""Multiply-accumulates per sample of each AL module, counted on one sample with forward hooks.

Only Linear, Conv2d, LSTM and multi-head attention count: activations, pooling, embedding lookups and
normalisation are a few per element, well under 1 % of these models' work. A text's MACs grow with its
length: a text model is counted on its training text of median length. A training step costs about 3x
the forward MACs (forward, then the gradients of the inputs and of the weights), for AL's local losses
as for BP's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from al.model import ALNet

TRAIN_FACTOR = 3  # forward + backward (input and weight gradients)


@dataclass
class ComponentMacs:
    encoder: int  # f_i
    bridge: int  # b_i
    target_encoder: int  # g_i
    decoder: int  # h_i


def module_macs(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(MACs of one forward of `module` on x, its output)."""
    total = 0

    def count(layer, inputs, output):
        nonlocal total
        if isinstance(layer, nn.Linear):
            total += output.numel() * layer.in_features
        elif isinstance(layer, nn.Conv2d):
            total += output.numel() * (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, nn.LSTM):  # per step and direction: four gates from the input and the state
            steps = output[0].numel() // (layer.hidden_size * (2 if layer.bidirectional else 1))
            total += steps * 4 * layer.hidden_size * (layer.input_size + layer.hidden_size)
        elif isinstance(layer, nn.MultiheadAttention):  # q, k, v and output projections; scores and their sum
            rows, length = inputs[0].shape[:2]
            total += rows * length * (4 * layer.embed_dim**2 + 2 * length * layer.embed_dim)

    counted = (nn.Linear, nn.Conv2d, nn.LSTM, nn.MultiheadAttention)
    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, counted)]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel would run no module the hooks see
    try:
        with torch.no_grad():
            out = module(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for hook in hooks:
            hook.remove()
    return total, out


def typical_sample(x: torch.Tensor) -> torch.Tensor:
    """One input that stands for `x`'s: zeros of its shape, or for token ids the text of median length."""
    if x.dtype == torch.long:
        lengths = (x != 0).sum(dim=1)
        return x[lengths.argsort()[len(lengths) // 2]].unsqueeze(0)
    return torch.zeros(1, *x.shape[1:], device=x.device)


def component_macs(net: ALNet, sample: torch.Tensor) -> list[ComponentMacs]:
    """MACs per sample of f_i, b_i, g_i and h_i for every component (the net in eval mode, on `sample`: one input,
    as typical_sample gives)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    s = sample.to(device)
    t = torch.zeros(1, net.num_classes, device=device)
    counts = []
    for component in net.components:
        encoder, s = module_macs(component.encoder, s)
        bridge, _ = module_macs(component.bridge, s)
        target_encoder, t_next = module_macs(component.target_encoder, t)
        decoder, _ = module_macs(component.decoder, t_next)
        counts.append(ComponentMacs(encoder, bridge, target_encoder, decoder))
        t = t_next
    net.train(was_training)
    return counts


def path_macs(counts: list[ComponentMacs], depth: int) -> int:
    """Inference through f_1..f_k -> b_k -> h_k..h_1."""
    return sum(c.encoder + c.decoder for c in counts[:depth]) + counts[depth - 1].bridge


def early_exit_macs(counts: list[ComponentMacs], depth: int) -> int:
    """A row that exits at `depth`: every encoder once, and the head (b_j, h_j..h_1) of every depth tried."""
    return sum(c.encoder for c in counts[:depth]) + sum(
        counts[j - 1].bridge + sum(c.decoder for c in counts[:j]) for j in range(1, depth + 1)
    )


def training_macs(counts: list[ComponentMacs], method: str) -> int:
    """MACs per training sample: AL trains every module of every component; BP the inference path."""
    if method == "bp":
        return TRAIN_FACTOR * path_macs(counts, len(counts))
    return TRAIN_FACTOR * sum(c.encoder + c.bridge + c.target_encoder + c.decoder for c in counts)
