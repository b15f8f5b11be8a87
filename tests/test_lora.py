import pytest
import torch

from amt import lora
from amt.backbones import build_backbone

RANK = 4


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return build_backbone("tiny_vit", None, 32).vit


def _randomise(model):
    with torch.no_grad():
        for a, b in lora.adapter_parameters(model).values():
            a.add_(0.1 * torch.randn_like(a))
            b.add_(0.1 * torch.randn_like(b))


def test_svd_init_leaves_the_network_unchanged(vit):
    x = torch.rand(3, 3, 32, 32)
    before = vit(x)
    weights = {n: m.weight.detach().clone() for n, m in vit.named_modules()
               if isinstance(m, torch.nn.Linear)}
    state = lora.inject_lora(vit, RANK)
    torch.testing.assert_close(vit(x), before, atol=1e-5, rtol=1e-5)
    layer = vit.blocks[0].attn.qkv
    w = weights["blocks.0.attn.qkv"]
    rows = w.shape[0] // 3
    for j, name in enumerate(("q", "k", "v")):
        a, b = state.adapters[f"blocks.0.attn.qkv.{name}"]
        block = w[j * rows:(j + 1) * rows].double()
        u, s, vh = torch.linalg.svd(block, full_matrices=False)
        best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]  # the top-r triplets, and only those
        torch.testing.assert_close((b @ a).double(), best, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.residual[j * rows:(j + 1) * rows] + b @ a,
                                   w[j * rows:(j + 1) * rows], atol=1e-6, rtol=1e-6)
        # A = diag(sqrt S) V^T: its rows are orthogonal with squared norms S
        torch.testing.assert_close((a @ a.T).double(), torch.diag(s[:RANK]), atol=1e-5,
                                   rtol=1e-5)


def test_adapters_named_per_block_and_only_they_train(vit):
    state = lora.inject_lora(vit, RANK)
    assert list(state.adapters)[:6] == [
        "blocks.0.attn.qkv.q", "blocks.0.attn.qkv.k", "blocks.0.attn.qkv.v",
        "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert len(state.adapters) == 6 * len(vit.blocks)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in vit.named_parameters() if ".lora_" in n}
    d, hidden = vit.embed_dim, vit.blocks[0].mlp.fc1.lora_B[0].shape[0]
    per_block = RANK * (3 * 2 * d + 2 * d + 2 * (d + hidden))
    assert state.num_parameters == per_block * len(vit.blocks)


def test_missing_target_is_named(vit):
    with pytest.raises(ValueError, match="'attn.qkvx' matches no nn.Linear.*blocks.0.attn.qkv"):
        lora.inject_lora(vit, RANK, ("attn.qkvx",))
    lora.inject_lora(vit, RANK, ("mlp.fc1",))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.inject_lora(vit, RANK)


def test_rank_too_large_is_refused(vit):
    with pytest.raises(ValueError, match="blocks.0.attn.qkv: cannot give 3 output block"):
        lora.inject_lora(vit, 33)


def test_merge_unmerge_round_trip(vit):
    lora.inject_lora(vit, RANK)
    _randomise(vit)
    x = torch.rand(2, 3, 32, 32)
    residuals = {n: m.residual.clone() for n, m in lora.lora_layers(vit).items()}
    unmerged = vit(x)
    lora.merge(vit)
    assert all(m.merged for m in lora.lora_layers(vit).values())
    torch.testing.assert_close(vit(x), unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge(vit)
    assert torch.equal(vit(x), unmerged)
    for name, layer in lora.lora_layers(vit).items():
        assert torch.equal(layer.residual, residuals[name])


def test_weighted_merge_equals_direct_formula(vit):
    lora.inject_lora(vit, RANK)
    states = []
    for _ in range(3):
        _randomise(vit)
        states.append(lora.get_state(vit))
    weights = [0.5, 0.3, 0.2]
    lora.merge(vit, states, weights)
    for layer in lora.lora_layers(vit).values():
        delta = sum(w * torch.cat([s.adapters[n][1] @ s.adapters[n][0]
                                   for n in layer.adapter_names])
                    for s, w in zip(states, weights, strict=True))
        torch.testing.assert_close(layer.weight, layer.residual + delta, atol=1e-6, rtol=1e-6)
    buffer = vit.blocks[0].mlp.fc2.weight
    lora.merge(vit, states[:1], [1.0])  # the next merge reuses the layer's buffer
    assert vit.blocks[0].mlp.fc2.weight.data_ptr() == buffer.data_ptr()
    # merging one state alone equals loading it
    x = torch.rand(2, 3, 32, 32)
    merged = vit(x)
    lora.unmerge(vit)
    lora.load_state(vit, states[0])
    torch.testing.assert_close(vit(x), merged, atol=1e-5, rtol=1e-5)


def test_state_round_trips_through_flat_tensors(vit):
    lora.inject_lora(vit, RANK)
    _randomise(vit)
    state = lora.get_state(vit)
    back = lora.LoRAState.from_tensors(state.to_tensors())
    assert back.rank == RANK and list(back.adapters) == sorted(state.adapters)
    for name, (a, b) in state.adapters.items():
        assert torch.equal(back.adapters[name][0], a) and torch.equal(back.adapters[name][1], b)
    flat = state.to_tensors()
    del flat["blocks.1.mlp.fc2.B"]
    with pytest.raises(ValueError, match="unpaired: \\['blocks.1.mlp.fc2'\\]"):
        lora.LoRAState.from_tensors(flat)
    bad = lora.LoRAState({k: v for k, v in state.adapters.items() if "fc1" not in k})
    with pytest.raises(ValueError, match="missing \\['blocks.0.mlp.fc1'"):
        lora.load_state(vit, bad)


def _reference_and_layer(dtype=torch.float64, blocks=("q", "k", "v")):
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(6, 9).to(dtype), "attn.qkv", 2, blocks)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    return layer


@pytest.mark.parametrize("blocks", [("q", "k", "v"), ("fc1",)])
def test_hand_written_backward_matches_autograd(blocks):
    layer = _reference_and_layer(blocks=blocks)
    x = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 5, 9, dtype=torch.float64)
    layer(x).backward(grad)
    ref_x = x.detach().clone().requires_grad_(True)
    adapters = [(a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True))
                for a, b in layer.adapters()]
    ref = torch.nn.functional.linear(ref_x, layer.residual, layer.bias) + torch.cat(
        [ref_x @ a.T @ b.T for a, b in adapters], -1)
    ref.backward(grad)
    torch.testing.assert_close(layer(x), ref)
    torch.testing.assert_close(x.grad, ref_x.grad)
    for (a, b), (ref_a, ref_b) in zip(layer.adapters(), adapters, strict=True):
        torch.testing.assert_close(a.grad, ref_a.grad)
        torch.testing.assert_close(b.grad, ref_b.grad)


def test_frozen_adapters_get_no_gradient_but_inputs_do():
    layer = _reference_and_layer()
    layer.requires_grad_(False)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    assert grad.shape == x.shape and all(p.grad is None for p in layer.parameters())


def test_autocast_runs_in_bfloat16_and_returns_parameter_dtypes():
    layer = _reference_and_layer(torch.float32)
    x = torch.randn(8, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())
    expected = layer(x.detach())
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_grouped_weights_apply_one_weight_per_consecutive_group():
    layer = _reference_and_layer()
    weights = torch.randn(3, *layer.residual.shape, dtype=layer.residual.dtype)
    x = torch.randn(6, 5, 6, dtype=layer.residual.dtype)  # 3 groups of 2 images x 5 tokens
    layer.weight = weights
    out = layer(x)
    for g in range(3):
        expected = torch.nn.functional.linear(x[2 * g:2 * g + 2], weights[g], layer.bias)
        torch.testing.assert_close(out[2 * g:2 * g + 2], expected)
    with pytest.raises(ValueError, match="7 cannot be split into 3 groups"):
        layer(torch.randn(7, 5, 6, dtype=layer.residual.dtype))


@pytest.mark.parametrize("blocks", [("q", "k", "v"), ("fc1",)])
def test_the_residual_gets_dl_dw_when_it_requires_grad(blocks):
    """Weight-space APSV's gradient: dL/dW of W = W_res + blockdiag(B_j A_j), through the
    hand-written backward."""
    layer = _reference_and_layer(blocks=blocks)
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    grad = torch.randn(4, 5, 9, dtype=torch.float64)
    weight = (layer.residual + lora.adapter_delta(layer)).detach().requires_grad_(True)
    torch.nn.functional.linear(x, weight, layer.bias).backward(grad)
    layer.residual.requires_grad_(True)
    (residual_grad,) = torch.autograd.grad(layer(x), layer.residual, grad)
    torch.testing.assert_close(residual_grad, weight.grad)


def test_standard_init_is_kaiming_a_zero_b_on_the_unchanged_weight(vit):
    weights = {n: m.weight.detach().clone() for n, m in vit.named_modules()
               if isinstance(m, torch.nn.Linear)}
    x = torch.rand(2, 3, 32, 32)
    before = vit(x)
    lora.inject_lora(vit, rank=2, residual=lora.RESIDUAL_OF_INIT["standard"])
    torch.manual_seed(0)
    lora.standard_init(vit)
    for name, layer in lora.lora_layers(vit).items():
        assert torch.equal(layer.residual, weights[name])  # W_res = W
        for a, b in layer.adapters():
            bound = 1 / a.shape[1] ** 0.5  # Kaiming-uniform with a = sqrt(5): 1 / sqrt(fan_in)
            assert not b.any() and a.abs().max() <= bound and a.abs().max() > bound / 2
    torch.testing.assert_close(vit(x), before)  # B = 0: the network starts as the frozen one
