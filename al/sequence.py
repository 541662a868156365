"""The encoders of text models (arch lstm, transformer) and the pooling in front of their bridges.

Component 1's encoder f_1 is the token embedding; each later component's is one bidirectional LSTM layer
or one Transformer encoder layer, as in the AL papers' text models (Wu et al., ICLR 2022). A sequence s_i
travels between components (and pipeline stages) as one tensor (N, T, 1 + d): channel 0 is the mask (1 for
a token, 0 for padding), channels 1.. the features. Padding never enters anything a token sees: each LSTM
direction meets it only after a text's last token, attention ignores padded keys, and the bridges pool
with a masked mean.

Unlike the reference code (Hibb-bb/AL), no LSTM state is handed from one layer to the next: every layer
starts from a zero state, the same in training and at inference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from al.config import ModelConfig
from al.data.text import PAD_ID


def with_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, T) mask and (N, T, d) features -> s of shape (N, T, 1 + d)."""
    return torch.cat([mask.unsqueeze(-1).to(x.dtype), x], dim=-1)


def split_mask(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s -> (mask as bool (N, T), features (N, T, d))."""
    return s[..., 0] > 0, s[..., 1:]


def sinusoids(positions: int, dim: int) -> torch.Tensor:
    """The Transformer's fixed position signal (Vaswani et al. 2017), (positions, dim)."""
    position = torch.arange(positions, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(positions, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return table


class TokenEmbedding(nn.Module):
    """f_1: token ids (N, max_tokens), padded after the tokens with PAD_ID, -> s_1. With `crop`, the columns after
    the batch's longest text are dropped first: they hold padding only, which enters nothing. (An exported graph,
    whose shapes may not depend on the data, keeps them all, and answers the same.)"""

    def __init__(self, vocab_size: int, dim: int, max_tokens: int, positions: bool):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        # Not a parameter and not saved: a function of the shape alone.
        self.register_buffer("positions", sinusoids(max_tokens, dim) if positions else None, persistent=False)
        self.crop = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != PAD_ID
        if self.crop:
            length = max(1, int(mask.sum(dim=1).max())) if len(ids) else 1
            ids, mask = ids[:, :length], mask[:, :length]
        x = self.embedding(ids)
        if self.positions is not None:
            x = x + self.positions[: ids.shape[1]]
        return with_mask(mask, x)


class LSTMLayer(nn.Module):
    """One bidirectional LSTM layer, from a zero state: s -> s with 2 x hidden features.

    The backward direction reads each text reversed within its own length, so that both directions meet the
    padding only after a text's last token: no token's output, and no direction's state at a text's end, sees
    padding. (Packed sequences give the same outputs; padded input runs the LSTM as one fused kernel where a
    packed one runs a step at a time, about twice as fast on a CPU.) The tokens of a text come first, its
    padding after them, as TokenEmbedding makes s_1.
    """

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.ahead = nn.LSTM(features, hidden, batch_first=True)
        self.back = nn.LSTM(features, hidden, batch_first=True)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        mask, x = split_mask(s)
        rows, length = mask.shape
        position = torch.arange(length, device=s.device).expand(rows, length)
        # Position p of a text of n tokens <-> n - 1 - p; padding stays where it is. Its own inverse.
        reverse = torch.where(mask, mask.sum(dim=1, keepdim=True) - 1 - position, position).unsqueeze(-1)
        ahead, _ = self.ahead(x)
        back, _ = self.back(x.gather(1, reverse.expand_as(x)))
        back = back.gather(1, reverse.expand_as(back))
        return with_mask(mask, torch.cat([ahead, back], dim=-1))


class TransformerLayer(nn.Module):
    """One Transformer encoder layer (post-norm, no dropout) whose attention ignores padded positions."""

    def __init__(self, dim: int, heads: int, feedforward: int):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, heads, feedforward, dropout=0.0, batch_first=True)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        mask, x = split_mask(s)
        return with_mask(mask, self.layer(x, src_key_padding_mask=~mask))


class MaskedMeanPool(nn.Module):
    """s (N, T, 1 + d) -> the mean of each text's token features (N, d); padding counts for nothing."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        mask, x = split_mask(s)
        total = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
        return total / mask.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)


def text_encoders(cfg: ModelConfig) -> tuple[list[nn.Module], list[int]]:
    """f_1..f_L of a text model and the features of each s_i (what its bridge pools)."""
    dim = cfg.embedding_dim
    encoders = [TokenEmbedding(cfg.vocab_size, dim, cfg.max_tokens, positions=cfg.arch == "transformer")]
    features = [dim]
    for width in cfg.widths:
        if cfg.arch == "lstm":
            encoders.append(LSTMLayer(features[-1], width))
            features.append(2 * width)
        else:
            encoders.append(TransformerLayer(dim, cfg.heads, width))
            features.append(dim)
    return encoders, features
