"""The Associated Learning network: components of four modules and their local losses.

Component i (paper letters in brackets):
    encoder        [f_i]  s_{i-1} -> s_i,   s_0 = x
    bridge         [b_i]  s_i     -> ~t_i
    target_encoder [g_i]  t_{i-1} -> t_i,   t_0 = onehot(y)
    decoder        [h_i]  t_i     -> ~t_{i-1}; h_1 ends in class scores

Inference: h_1(...h_k(b_k(f_k(...f_1(x))))) for depth k (k = L is the full path).
The encoders of text models (arch lstm, transformer) are in al/sequence.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from al.config import TEXT_ARCHS, ModelConfig
from al.sequence import MaskedMeanPool, text_encoders

_ACTIVATIONS = {
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


class Component(nn.Module):
    def __init__(self, encoder: nn.Module, bridge: nn.Module, target_encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.bridge = bridge
        self.target_encoder = target_encoder
        self.decoder = decoder

    def local_losses(
        self,
        s_prev: torch.Tensor,
        t_prev: torch.Tensor,
        labels: torch.Tensor,
        first: bool,
        h1_loss: str,
        detach_target: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s_i, t_i, associated loss A_i, autoencoder loss R_i).

        Inputs are detached here, so no gradient can cross a component boundary.
        """
        s_prev, t_prev = s_prev.detach(), t_prev.detach()
        s = self.encoder(s_prev)
        t = self.target_encoder(t_prev)
        target = t.detach() if detach_target else t
        associated = F.mse_loss(self.bridge(s), target)
        reconstruction = self.decoder(t)
        if first and h1_loss == "ce":
            autoencoder = F.cross_entropy(reconstruction, labels)
        else:
            autoencoder = F.mse_loss(reconstruction, t_prev)
        return s, t, associated, autoencoder


class ALNet(nn.Module):
    """L components; the same modules serve AL training, BP training and inference."""

    def __init__(self, components: list[Component], num_classes: int, output: str):
        super().__init__()
        self.components = nn.ModuleList(components)
        self.num_classes = num_classes
        self.output = output  # "sigmoid" (scores in [0, 1]) or "logits"

    @property
    def depth(self) -> int:
        return len(self.components)

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Class scores through f_1..f_k -> b_k -> h_k..h_1."""
        k = self.check_depth(depth)
        s = x
        for component in self.components[:k]:
            s = component.encoder(s)
        return self.head(s, k)

    def head(self, s: torch.Tensor, k: int) -> torch.Tensor:
        """Class scores from s_k: the bridge b_k, then the decoders h_k..h_1."""
        t = self.components[k - 1].bridge(s)
        for component in reversed(self.components[:k]):
            t = component.decoder(t)
        return t

    def check_depth(self, depth: int | None) -> int:
        k = self.depth if depth is None else depth
        if not 1 <= k <= self.depth:
            raise ValueError(f"depth must be between 1 and {self.depth}, got {k}")
        return k

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        if self.output == "logits":
            return scores.softmax(dim=1)
        # Sigmoid scores approximate a one-hot vector; normalise them to sum to one.
        scores = scores.clamp_min(1e-12)
        return scores / scores.sum(dim=1, keepdim=True)

    @torch.inference_mode()
    def predict(
        self, x: torch.Tensor, depth: int | None = None, exit_confidence: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(predicted class indices, class probabilities, the depth each row used).

        With `exit_confidence`, each row stops at the first depth k (up to `depth`) whose top
        probability reaches it: every shallower path is a classifier too. s_k is computed once,
        and only for the rows still going, so no encoder runs twice.
        """
        k_max = self.check_depth(depth)
        if exit_confidence is None:
            probabilities = self.probabilities(self(x, k_max))
            return probabilities.argmax(dim=1), probabilities, torch.full((len(x),), k_max, device=x.device)
        probabilities = torch.empty(len(x), self.num_classes, device=x.device)  # x may be token ids
        depths = torch.full((len(x),), k_max, device=x.device)
        rows, s = torch.arange(len(x), device=x.device), x
        for k in range(1, k_max + 1):
            s = self.components[k - 1].encoder(s)
            scores = self.probabilities(self.head(s, k))
            done = scores.amax(dim=1) >= exit_confidence if k < k_max else torch.ones_like(rows, dtype=torch.bool)
            probabilities[rows[done]] = scores[done]
            depths[rows[done]] = k
            rows, s = rows[~done], s[~done]
            if len(rows) == 0:
                break
        return probabilities.argmax(dim=1), probabilities, depths


# --- backbones: the encoders f_1..f_L and the shape of each s_i ---------------------


def _conv_block(in_ch: int, out_ch: int, act: str, pool: bool) -> nn.Sequential:
    layers = [
        nn.Conv2d(in_ch, out_ch, 3, padding=1),
        nn.BatchNorm2d(out_ch),
        activation(act),
        nn.Conv2d(out_ch, out_ch, 3, padding=1),
        nn.BatchNorm2d(out_ch),
        activation(act),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs and a shortcut)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = activation(act)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


def _encoders(cfg: ModelConfig, input_shape: tuple[int, ...]) -> list[nn.Module]:
    act = cfg.encoder_activation
    if cfg.arch == "mlp":
        widths = [math.prod(input_shape), *cfg.widths]
        encoders = []
        for i, (w_in, w_out) in enumerate(zip(widths, widths[1:])):
            layers = [nn.Flatten()] if i == 0 else []
            encoders.append(nn.Sequential(*layers, nn.Linear(w_in, w_out), activation(act)))
        return encoders
    if len(input_shape) != 3:
        raise ValueError(
            f"arch {cfg.arch!r} needs image input (channels, height, width); "
            f"this dataset's samples have shape {tuple(input_shape)}"
        )
    channels, size = input_shape[0], min(input_shape[1:])
    if cfg.arch == "cnn":
        encoders = []
        for w_out in cfg.widths:
            pool = size >= 2  # halve the map while it is at least 2x2
            encoders.append(_conv_block(channels, w_out, act, pool))
            channels, size = w_out, size // 2 if pool else size
        return encoders
    # resnet: the stem with the first stage is component 1, later stages follow (ResNet-20: 3 blocks each).
    stem = nn.Sequential(
        nn.Conv2d(channels, cfg.widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(cfg.widths[0]), activation(act)
    )
    encoders = []
    channels = cfg.widths[0]
    for i, w_out in enumerate(cfg.widths[1:]):
        stride = 1 if i == 0 or size < 2 else 2
        blocks = [BasicBlock(channels if j == 0 else w_out, w_out, stride if j == 0 else 1, act) for j in range(3)]
        encoders.append(nn.Sequential(stem, *blocks) if i == 0 else nn.Sequential(*blocks))
        channels, size = w_out, (size + 1) // 2 if stride == 2 else size
    return encoders


def _bridge(features_in: int, cfg: ModelConfig, pool: list[nn.Module], n: int) -> nn.Module:
    """b_i to a code of width n: `pool` (what makes s_i one vector per sample), then the dense layers."""
    widths = [features_in] + [cfg.bridge_hidden_factor * n] * (cfg.bridge_depth - 1) + [n]
    layers = list(pool)
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Linear(w_in, w_out), activation(cfg.bridge_activation)]
    return nn.Sequential(*layers)


def _conv_pool(s_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, list[nn.Module]]:
    """What a bridge does to s_i before its dense layers: on conv maps, `bridge_convs` conv layers, then the
    pooling; then one vector per sample. Returns its width and the layers."""
    layers: list[nn.Module] = []
    if len(s_shape) == 3:
        channels = s_shape[0]
        for _ in range(cfg.bridge_convs):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                       activation(cfg.encoder_activation)]
        if cfg.bridge_pool is not None:
            layers.append(nn.AdaptiveAvgPool2d(cfg.bridge_pool))
            s_shape = (channels, cfg.bridge_pool, cfg.bridge_pool)
    return math.prod(s_shape), [*layers, nn.Flatten()]


def _encoders_and_pools(cfg: ModelConfig, input_shape: tuple[int, ...]) -> list[tuple[nn.Module, int, list]]:
    """(f_i, the features its bridge reads, the pooling in front of that bridge) of each component."""
    if cfg.arch in TEXT_ARCHS:
        encoders, features = text_encoders(cfg)
        return [(encoder, width, [MaskedMeanPool()]) for encoder, width in zip(encoders, features)]
    made = []
    with torch.no_grad():
        s = torch.zeros(1, *input_shape)
        for encoder in _encoders(cfg, input_shape):
            encoder.eval()
            s = encoder(s)
            encoder.train()
            made.append((encoder, *_conv_pool(tuple(s.shape[1:]), cfg)))
    return made


def build_network(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, method: str) -> ALNet:
    """The network for `cfg`; h_1 ends in a sigmoid for AL with MSE, in logits otherwise. `input_shape` is that of
    one sample (text models: of its token ids, which they do not need)."""
    made = _encoders_and_pools(cfg, tuple(input_shape))
    code_widths = cfg.target_widths or [cfg.target_width] * len(made)  # validate() checked their count
    output = "sigmoid" if method == "al" and cfg.h1_loss == "mse" else "logits"
    components = []
    for i, ((encoder, features, pool), n) in enumerate(zip(made, code_widths)):
        t_prev_width = num_classes if i == 0 else code_widths[i - 1]
        decoder_act = ("identity" if output == "logits" else "sigmoid") if i == 0 else cfg.target_activation
        components.append(
            Component(
                encoder=encoder,
                bridge=_bridge(features, cfg, pool, n),
                target_encoder=nn.Sequential(nn.Linear(t_prev_width, n), activation(cfg.target_activation)),
                decoder=nn.Sequential(nn.Linear(n, t_prev_width), activation(decoder_act)),
            )
        )
    net = ALNet(components, num_classes, output)
    # The LSTM and Transformer layers keep PyTorch's own initialisation (as the reference code's text models).
    text = cfg.arch in TEXT_ARCHS
    initialise([part for c in components for part in ([] if text else [c.encoder]) + [c.bridge, c.target_encoder,
                                                                                        c.decoder]], cfg.init)
    return net


# Weight initialisations (`init`); each draws the weights of every linear and conv layer and zeroes the biases.
_INITS = {
    "he_normal": nn.init.kaiming_normal_,  # R1
    "he_fan_out": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "orthogonal": nn.init.orthogonal_,
}


def initialise(parts: list[nn.Module], init: str) -> None:
    """`init`'s weights and zero biases in `parts`; "torch" keeps what PyTorch's layers drew when they were made."""
    if init == "torch":
        return
    for module in (m for part in parts for m in part.modules()):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            _INITS[init](module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def count_parameters(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, method: str) -> int:
    """The parameters build_network would make, counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_network(cfg, input_shape, num_classes, method).parameters())
