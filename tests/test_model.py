import pytest
import torch
import torch.nn.functional as F

from al.config import make_config
from al.model import build_network


def _net(arch="mlp", method="al", input_shape=(1, 8, 8), **model):
    model_cfg = make_config("paper", {"arch": arch, "widths": [16, 16], "target_width": 8, **model}).model
    return build_network(model_cfg, input_shape, num_classes=3, method=method)


def test_local_losses_send_no_gradient_across_the_boundary():
    net = _net()
    first, second = net.components
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    s1, t1, a1, r1 = first.local_losses(x, F.one_hot(y, 3).float(), y, True, "mse", True)
    s2, t2, a2, r2 = second.local_losses(s1, t1, y, False, "mse", True)
    (a2 + r2).backward()
    assert all(p.grad is None for p in first.parameters())
    assert all(p.grad is not None for p in second.parameters())


def test_detached_target_trains_target_encoder_only_through_the_autoencoder_loss():
    net = _net()
    component = net.components[0]
    y = torch.tensor([0, 1, 2, 0])
    _, _, associated, _ = component.local_losses(torch.randn(4, 1, 8, 8), F.one_hot(y, 3).float(), y, True, "mse", True)
    associated.backward()
    assert all(p.grad is None for p in component.target_encoder.parameters())
    assert all(p.grad is None for p in component.decoder.parameters())
    net.zero_grad(set_to_none=True)
    onehot = F.one_hot(y, 3).float()
    _, _, associated, _ = component.local_losses(torch.randn(4, 1, 8, 8), onehot, y, True, "mse", False)
    associated.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in component.target_encoder.parameters())


def test_inference_at_every_depth_gives_class_probabilities():
    net = _net().eval()
    x = torch.randn(5, 1, 8, 8)
    for depth in (1, 2):
        predictions, probabilities, depths = net.predict(x, depth)
        assert depths.tolist() == [depth] * 5
        assert predictions.shape == (5,)
        assert probabilities.shape == (5, 3)
        assert torch.allclose(probabilities.sum(dim=1), torch.ones(5))
    # Shortcut depth 1 uses b_1 then h_1: a different function from the full path.
    assert not torch.allclose(net(x, 1), net(x, 2))


def test_bp_net_has_the_same_parameters_as_al_and_ends_in_logits():
    al_net, bp_net = _net(method="al"), _net(method="bp")
    assert [n for n, _ in al_net.named_parameters()] == [n for n, _ in bp_net.named_parameters()]
    assert al_net.output == "sigmoid" and bp_net.output == "logits"


def test_cnn_and_resnet_build_and_run_on_small_images():
    for arch, widths in (("cnn", [4, 8, 8, 8]), ("resnet", [4, 4, 8, 8])):
        model_cfg = make_config("default", {"arch": arch, "widths": widths, "target_width": 8, "bridge_pool": 1}).model
        net = build_network(model_cfg, (1, 8, 8), num_classes=3, method="al").eval()
        assert net.depth == (4 if arch == "cnn" else 3)
        assert net(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_default_resolves_per_architecture_as_documented():
    """`default` (README, "Presets"): tanh bridges and codes for the conv archs, R1's sigmoid ones for the others and
    in `paper`; lr 3e-3 for texts, 1e-3 for numbers but the cnn's AL (5e-3, with its own network: codes of 64,
    one-layer bridges with a conv, pooled to 2x2, ReLU encoders; BP's cnn keeps R1's); what a caller gives wins.
    The activations reach the network."""
    numbers, texts = ("mlp", "cnn", "resnet"), ("lstm", "transformer")
    resolved = {arch: make_config("default", {"arch": arch}) for arch in numbers + texts}
    codes = {arch: (c.model.bridge_activation, c.model.target_activation) for arch, c in resolved.items()}
    tanh, sigmoid = ("tanh", "tanh"), ("sigmoid", "sigmoid")
    assert codes == {"mlp": sigmoid, "cnn": tanh, "resnet": tanh, "lstm": sigmoid, "transformer": sigmoid}
    assert make_config("paper", {"arch": "cnn"}).model.target_activation == "sigmoid"
    assert make_config("default", {"arch": "cnn", "bridge_activation": "relu"}).model.bridge_activation == "relu"
    assert [resolved[arch].training.lr for arch in numbers] == [1e-3, 5e-3, 1e-3]
    cnn = resolved["cnn"]
    assert (cnn.model.target_width, cnn.model.bridge_convs, cnn.model.bridge_pool, cnn.model.bridge_depth,
            cnn.model.encoder_activation) == (64, 1, 2, 1, "relu")
    assert (cnn.training.target_lr_factor, cnn.training.bridge_lr_factor, cnn.training.target_warmup) == (3, 2, 130)
    assert (resolved["resnet"].model.bridge_convs, resolved["resnet"].model.encoder_activation) == (0, "elu")
    bp_cnn = make_config("default", {"arch": "cnn"}, {"method": "bp"})  # BP keeps R1's network with tanh codes
    assert (bp_cnn.training.lr, bp_cnn.model.target_width, bp_cnn.model.bridge_convs, bp_cnn.model.bridge_depth,
            bp_cnn.model.bridge_activation) == (1e-3, 256, 0, 2, "tanh")
    assert make_config("default", {"arch": "cnn", "bridge_convs": 1}, {"method": "bp", "lr": 2e-3}).training.lr == 2e-3
    assert make_config("lean", {"arch": "cnn"}, {"method": "bp"}).model == make_config("lean", {"arch": "cnn"}).model
    assert [resolved[arch].training.lr for arch in texts] == [3e-3] * 2
    assert make_config("default", {"arch": "lstm"}, {"lr": 5e-3}).training.lr == 5e-3
    assert make_config("lean", {"arch": "transformer"}).training.lr == 2e-3  # other presets keep their own
    assert make_config("paper", {"arch": "transformer"}).training.lr == 1e-4

    def activations(preset, arch):
        model_cfg = make_config(preset, {"arch": arch, "widths": [4, 8], "target_width": 8}).model
        second = build_network(model_cfg, (1, 8, 8), 3, "al").components[1]
        return [type(part[-1]).__name__ for part in (second.bridge, second.target_encoder, second.decoder)]

    assert activations("default", "cnn") == ["Tanh"] * 3
    assert activations("paper", "cnn") == activations("default", "mlp") == ["Sigmoid"] * 3


def test_the_bench_cnn_case_keeps_what_a_preset_chooses():
    """`al bench time-to-accuracy --al-presets default` measures `default` as a user gets it: the case's codes and
    pooling apply only where a preset chooses none (lean, paper, and BP's `default`)."""
    from benchmarks.runs import case_model

    def resolved(preset, method):
        return make_config(preset, case_model("cnn", 2, 512, preset, method), {"method": method}).model

    assert (resolved("default", "al").target_width, resolved("default", "al").bridge_pool) == (64, 2)
    for preset, method in (("default", "bp"), ("lean", "al"), ("lean", "bp")):
        assert (resolved(preset, method).target_width, resolved(preset, method).bridge_pool) == (128, 4)
        assert resolved(preset, method).widths == [16, 32]


def test_paper_bridge_is_two_layers_five_n_wide():
    net = _net()
    linears = [m for m in net.components[0].bridge if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 40), (40, 8)]


def _deep_net():
    model_cfg = make_config("default", {"arch": "mlp", "widths": [16, 16, 16, 16], "target_width": 8}, {}).model
    torch.manual_seed(0)
    return build_network(model_cfg, (1, 8, 8), 3, "al").eval()


def test_early_exit_stops_each_row_at_the_first_confident_depth():
    net, x = _deep_net(), torch.randn(64, 1, 8, 8)
    by_depth = [net.predict(x, k)[1] for k in range(1, 5)]
    threshold = float(by_depth[0].amax(dim=1).median())  # about half the rows are confident at depth 1
    _, probabilities, depths = net.predict(x, exit_confidence=threshold)
    assert 0 < (depths == 1).sum() < 64
    for row in range(64):
        k = int(depths[row])
        assert torch.allclose(probabilities[row], by_depth[k - 1][row], atol=1e-6)
        assert all(by_depth[j][row].max() < threshold for j in range(k - 1))  # no shallower exit was confident
        assert k == 4 or by_depth[k - 1][row].max() >= threshold


def test_early_exit_at_threshold_zero_is_exactly_depth_one_and_unreached_is_exactly_the_full_path():
    net, x = _deep_net(), torch.randn(32, 1, 8, 8)
    first, full = net.predict(x, 1), net.predict(x)
    at_zero = net.predict(x, exit_confidence=0.0)
    assert torch.equal(at_zero[0], first[0]) and torch.equal(at_zero[1], first[1])
    assert at_zero[2].tolist() == [1] * 32
    highest = max(float(net.predict(x, k)[1].amax()) for k in range(1, 4))
    never = net.predict(x, exit_confidence=highest + 1e-6)
    assert torch.equal(never[0], full[0]) and torch.equal(never[1], full[1])
    assert never[2].tolist() == [4] * 32
    capped = net.predict(x, depth=2, exit_confidence=highest + 1e-6)  # depth caps the exits
    assert torch.equal(capped[1], net.predict(x, 2)[1]) and capped[2].tolist() == [2] * 32


# --- conv components and initialisation (issue 22) ---------------------------------------


def _first_weight(init: str) -> torch.nn.Linear:
    """f_1's linear layer, 64 -> 256: fan-in 64, fan-out 256."""
    torch.manual_seed(0)
    model_cfg = make_config("default", {"arch": "mlp", "widths": [256], "target_width": 8, "init": init}).model
    return build_network(model_cfg, (1, 8, 8), 3, "al").components[0].encoder[1]


def test_init_draws_the_weights_it_names():
    expected_std = {"he_normal": (2 / 64) ** 0.5, "he_fan_out": (2 / 256) ** 0.5, "xavier_normal": (2 / 320) ** 0.5,
                    "xavier_uniform": (2 / 320) ** 0.5}
    for init, std in expected_std.items():
        layer = _first_weight(init)
        assert abs(layer.weight.std().item() - std) < 0.05 * std, init
        assert torch.count_nonzero(layer.bias) == 0
    assert _first_weight("xavier_uniform").weight.abs().max() <= (6 / 320) ** 0.5
    assert _first_weight("xavier_normal").weight.abs().max() > (6 / 320) ** 0.5  # normal, not uniform
    orthogonal = _first_weight("orthogonal").weight  # 256 x 64: orthonormal columns
    assert torch.allclose(orthogonal.T @ orthogonal, torch.eye(64), atol=1e-4)
    torch_default = _first_weight("torch")  # PyTorch's own: uniform within 1/sqrt(fan_in), biases too
    assert torch_default.weight.abs().max() <= 64 ** -0.5 and torch.count_nonzero(torch_default.bias) > 0


def test_bridge_convs_put_conv_layers_before_the_pooling_for_al_and_bp():
    for method in ("al", "bp"):
        for convs in (0, 1, 2):
            net = _net("cnn", method, bridge_convs=convs, bridge_pool=2)
            for component in net.components:
                kinds = [type(m).__name__ for m in component.bridge]
                assert kinds.count("Conv2d") == convs and kinds.count("BatchNorm2d") == convs
                assert kinds.index("AdaptiveAvgPool2d") == 3 * convs
            assert net.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="bridge_convs apply to conv maps"):
        _net("mlp", bridge_convs=1)


def test_target_widths_set_each_components_code_width():
    net = _net(target_widths=[12, 5])
    assert [c.bridge[-2].out_features for c in net.components] == [12, 5]
    assert [(c.target_encoder[0].in_features, c.target_encoder[0].out_features) for c in net.components] == [
        (3, 12), (12, 5)]
    assert [(c.decoder[0].in_features, c.decoder[0].out_features) for c in net.components] == [(12, 3), (5, 12)]
    with pytest.raises(ValueError, match="target_widths names 3 widths for 2 components"):
        _net(target_widths=[4, 4, 4])
