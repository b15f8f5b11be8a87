"""Test-time methods against direct computations from docs/method.md's formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import colour_episode

from amt import methods
from amt.attacks import pgd
from amt.augment import augment_support, diff_augment
from amt.backbones import build_backbone
from amt.checkpoints import CheckpointError
from amt.devices import torch_generator
from amt.lora import lora_layers, merge
from amt.methods import (
    EmbeddingCache,
    FineTuned,
    FrozenMethod,
    Merge,
    PoolMethod,
    load_method,
    merged_spectra,
)
from amt.models import load_trained
from amt.pool import load_pool
from amt.registry import FINETUNE_PARAMS, METHODS
from amt.specs import Hyper

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
WAYS, SHOTS, QUERIES = 3, 2, 4


def _pool_method(folder: Path, name: str = "amt", **hyper) -> PoolMethod:
    return PoolMethod(load_pool(folder / "pool.pt"), name, Hyper(**hyper), CPU, True, seed=0)


def _member_model(folder: Path, p: int):
    """Member p alone, built the way training builds it, its adapter merged."""
    backbone, head = load_trained(folder / f"member{p}.pt")
    merge(backbone.vit)
    return backbone.eval(), head


def _direct_scores(folder: Path, xs, ys, z) -> np.ndarray:
    rows = []
    for p in range(3):
        backbone, _ = _member_model(folder, p)
        with torch.no_grad():
            support, augmented = backbone(xs), backbone(z)
        protos = [support[ys == c].mean(0) for c in range(WAYS)]
        intra, inter = [], []
        for c in range(WAYS):
            own = [F.cosine_similarity(e, protos[c], dim=0) for e in augmented[ys == c]]
            other = [F.cosine_similarity(e, protos[d], dim=0) for e in augmented[ys == c]
                     for d in range(WAYS) if d != c]
            intra.append(torch.stack(own).mean())
            inter.append(torch.stack(other).mean())
        rows.append([torch.stack(intra).mean().item(), torch.stack(inter).mean().item()])
    return np.array(rows)


def _direct_merge(pool, layer_name: str, plan: Merge) -> torch.Tensor:
    layer = lora_layers(pool.backbone.vit)[layer_name]
    blocks = []
    for block_name, block in zip(layer.adapter_names, layer.residual.split(layer.rows),
                                 strict=True):
        total = block.clone().double()
        for p, w in zip(plan.members, plan.weights, strict=True):
            a, b = pool.members[p].adapters[block_name]
            total += w * (b.double() @ a.double())
        blocks.append(total)
    return torch.cat(blocks)


def test_ttm_scores_weights_merge_and_head_follow_the_formulas(pool_dir):
    beta, gamma = 3.0, 0.7
    method = _pool_method(pool_dir, beta=beta, gamma=gamma, top_k=2)
    xs, ys, _, _ = colour_episode()
    scores = method.scores(xs, ys, index=5).double().numpy()
    z = augment_support(method.backbone, xs, torch_generator(0, 5, "ttm"))
    np.testing.assert_allclose(scores, _direct_scores(pool_dir, xs, ys, z), atol=1e-5)

    score = gamma * scores[:, 0] - (1 - gamma) * scores[:, 1]
    top = np.argsort(-score)[:2]
    w = np.exp(beta * (score[top] - 1))
    plan = method.plan(torch.from_numpy(scores))
    assert plan.members == tuple(top) and len(set(score)) == 3
    np.testing.assert_allclose(plan.weights, w / w.sum(), rtol=1e-12)

    with method.setup(xs, ys, 5, plan=plan) as head:
        for name, layer in method.layers.items():
            torch.testing.assert_close(layer.weight.double(),
                                       _direct_merge(method.pool, name, plan), atol=1e-6,
                                       rtol=1e-6)
        scales = [float(method.pool.heads[p].scale) for p in plan.members]
        assert float(head.scale) == pytest.approx(sum(np.array(plan.weights) * scales))
    assert all(layer.weight is None for layer in method.layers.values())


def test_ablation_recipes_choose_their_members(pool_dir):
    xs, ys, _, _ = colour_episode()
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.4], [0.95, 0.05]])  # scores .50, .14, .55
    assert _pool_method(pool_dir, "amt_single_best").plan(scores) == Merge((2,), (1.0,))
    for name in ("amt_weight_avg", "amt_no_ttm"):
        assert _pool_method(pool_dir, name).plan(None) == Merge((0, 1, 2), (1 / 3,) * 3)
    with pytest.raises(ValueError, match="top_k=4 but the pool has 3"):
        _pool_method(pool_dir, top_k=4)
    with pytest.raises(ValueError, match="no merged model"):
        _pool_method(pool_dir, "amt_logit_avg").setup(xs, ys, 0).__enter__()


@pytest.mark.parametrize("layers", ["fc1", "all"])
def test_str_trims_only_the_selected_layers(pool_dir, layers):
    method = _pool_method(pool_dir, str_layers=layers, str_ratio=0.5)
    xs, ys, _, _ = colour_episode()
    plan = method.plan(method.scores(xs, ys, 0))
    with method.setup(xs, ys, 0, plan=plan):
        for name, layer in method.layers.items():
            merged = _direct_merge(method.pool, name, plan)
            if layers == "all" or name.endswith("mlp.fc1"):
                u, s, vh = torch.linalg.svd(merged, full_matrices=False)
                keep = min(merged.shape) // 2
                expected = (u[:, :keep] * s[:keep]) @ vh[:keep]
                assert torch.linalg.matrix_rank(layer.weight.double(), rtol=1e-5) == keep
            else:
                expected = merged
            torch.testing.assert_close(layer.weight.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("solver", ["exact", "lowrank"])
def test_str_trims_the_fused_qkv_as_one_matrix(pool_dir, solver):
    """The release trims the whole [3D, D] qkv weight to rank floor(rho D): not q, k and v
    apart (which would leave rank up to 3 floor(rho D)). lowrank: the release's randomised
    solver, its draws fixed by (seed, episode)."""
    method = _pool_method(pool_dir, str_layers="all", str_ratio=0.25, str_solver=solver)
    xs, ys, _, _ = colour_episode()
    plan = method.plan(method.scores(xs, ys, 0))
    weights = []
    for _ in range(2):
        with method.setup(xs, ys, 3, plan=plan):
            qkv = method.layers["blocks.0.attn.qkv"].weight
            assert qkv.shape == (96, 32)
            assert torch.linalg.matrix_rank(qkv.double(), rtol=1e-5) == 8  # floor(0.25 * 32)
            weights.append(qkv.clone())
    assert torch.equal(*weights)  # the same episode: the same draws
    merged = _direct_merge(method.pool, "blocks.0.attn.qkv", plan)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    error = torch.linalg.norm(weights[0].double() - best) / torch.linalg.norm(best)
    assert (error < 1e-5) if solver == "exact" else (error > 1e-4)


def test_member_scores_run_in_float32_unless_told_otherwise(pool_dir, monkeypatch):
    """On CUDA the job's amp is bfloat16; TTM's scoring stays in float32 (the release's
    autocast(False)) unless score_precision is 'amp'. CPU bf16 autocast stands in."""
    xs, ys, _, _ = colour_episode()
    plain = _pool_method(pool_dir).scores(xs, ys, 0)
    monkeypatch.setattr(methods.devices, "autocast", lambda device, enabled=True: torch.autocast(
        "cpu", dtype=torch.bfloat16, enabled=enabled))
    assert torch.equal(_pool_method(pool_dir).scores(xs, ys, 0), plain)
    amp = _pool_method(pool_dir, score_precision="amp").scores(xs, ys, 0)
    assert not torch.equal(amp, plain)
    torch.testing.assert_close(amp, plain, atol=0.05, rtol=0.05)  # bfloat16 rounding only
    no_amp = PoolMethod(load_pool(pool_dir / "pool.pt"), "amt", Hyper(score_precision="amp"),
                        CPU, False, seed=0)
    assert torch.equal(no_amp.scores(xs, ys, 0), plain)  # amp off: float32 either way


def _count_forwards(backbone) -> list[int]:
    sizes: list[int] = []
    backbone.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    return sizes


def test_amt_scores_every_member_in_one_forward_and_classifies_in_one(pool_dir, monkeypatch):
    method = _pool_method(pool_dir, str_layers="fc1", str_ratio=0.5)
    xs, ys, xq, yq = colour_episode()
    sizes = _count_forwards(method.backbone)
    together = method.scores(xs, ys, 0)
    assert sizes == [3 * 2 * len(xs)]  # 3 members x [support; Z]
    monkeypatch.setitem(methods.SCORING_IMAGES, "cpu", 2 * 2 * len(xs))  # 2 members a call
    del sizes[:]
    torch.testing.assert_close(method.scores(xs, ys, 0), together)
    assert sizes == [2 * 2 * len(xs), 2 * len(xs)]
    monkeypatch.undo()
    del sizes[:]
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        assert sizes == [3 * 2 * len(xs), len(xs) + len(xq)]
        protos = adapted.classifier.protos.clone()
        del sizes[:]
        adv = pgd(lambda x: F.cross_entropy(adapted.classifier(x), yq, reduction="none"), xq,
                  8 / 255, 2 / 255, steps=4)
        assert sizes == [len(xq)] * 4  # the attack never embeds the support again
        assert torch.equal(adapted.classifier.protos, protos)
        assert float((adv - xq).abs().max()) <= 8 / 255 + 1e-6


@pytest.mark.parametrize("name", ["pmf", "amt_ft"])
def test_finetuning_restores_the_weights_exactly(pool_dir, name):
    model = pool_dir / ("pm.pt" if name == "pmf" else "pool.pt")
    method = load_method(name, model, Hyper(lr=1e-2, ft_steps=3), CPU, seed=0)
    assert isinstance(method, FineTuned)
    xs, ys, xq, _ = colour_episode()
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        tuned = adapted.clean_logits
        changed = [k for k, v in method.backbone.state_dict().items()
                   if k in before and not torch.equal(v, before[k])]
        assert changed  # fine-tuning moved the weights
    after = method.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in method.backbone.parameters())
    method.set_hyper(Hyper(lr=0.0))
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        assert not torch.allclose(adapted.clean_logits, tuned)
    method.set_hyper(Hyper(lr=1e-2, ft_steps=3))
    with method.adapt(xs, ys, 0, queries=xq) as adapted:  # same episode, same result
        torch.testing.assert_close(adapted.clean_logits, tuned, rtol=0, atol=0)


def test_embedding_cache_gives_the_logits_of_a_direct_forward(pool_dir):
    method = load_method("pm", pool_dir / "pm.pt", Hyper(), CPU)
    assert isinstance(method, FrozenMethod)
    xs, ys, xq, _ = colour_episode()
    images = torch.cat([xs, xq])
    ids = np.arange(100, 100 + len(images)) * 3
    order = np.random.default_rng(0).permutation(len(ids))
    batches = [(ids[order[i:i + 4]], images[order[i:i + 4]]) for i in range(0, len(ids), 4)]
    cache = EmbeddingCache.build(method, batches)
    support_ids, query_ids = ids[:len(xs)], ids[len(xs):]
    # two episodes in one batched call: the same episode, and one with its classes relabelled
    perm = torch.tensor([2, 0, 1, 4, 3])[:WAYS]
    protos, logits = method.cached_logits(
        torch.stack([ys, perm[ys]]), torch.stack([cache(support_ids)] * 2),
        torch.stack([cache(query_ids)] * 2), WAYS)
    torch.testing.assert_close(logits[1][:, perm], logits[0])
    cached = method.adapted(protos[0], logits[0])
    with method.adapt(xs, ys, 0, queries=xq) as direct:
        torch.testing.assert_close(cached.clean_logits, direct.clean_logits, atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(cached.classifier(xq), direct.classifier(xq))
    with pytest.raises(KeyError, match=r"\[7\]"):
        cache(np.array([7]))


def _members_logits(folder: Path, xs, ys, x) -> torch.Tensor:
    """[P, n, N]: each member alone, its prototypes from the clean support."""
    logits = []
    for p in range(3):
        backbone, head = _member_model(folder, p)
        with torch.no_grad():
            protos = torch.stack([backbone(xs)[ys == c].mean(0) for c in range(WAYS)])
            logits.append(head(backbone(x), protos))
    return torch.stack(logits)


def test_logit_average_is_the_mean_of_the_members_alone(pool_dir):
    method = _pool_method(pool_dir, "amt_logit_avg")
    xs, ys, xq, yq = colour_episode()
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        mean = _members_logits(pool_dir, xs, ys, xq).mean(0)
        torch.testing.assert_close(adapted.clean_logits, mean, atol=1e-5, rtol=1e-5)
        x = xq.clone().requires_grad_(True)
        F.cross_entropy(adapted.classifier(x), yq).backward()  # members swap by pointer
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_diff_augment_is_pmfs_colour_and_translation():
    x = torch.full((6, 3, 16, 16), 0.3)
    out = diff_augment(x, torch.Generator().manual_seed(3), prob=1.0)
    torch.testing.assert_close(out, diff_augment(x, torch.Generator().manual_seed(3), prob=1.0))
    assert diff_augment(x, torch.Generator().manual_seed(3), prob=0.0) is x
    for image in out:  # a flat image stays flat except for the zero band shifted in
        values = image[image != 0]
        assert torch.allclose(values, values[0]) and -0.2 <= float(values[0]) <= 0.8
        zero_rows = int((image[0] == 0).all(1).sum())
        zero_cols = int((image[0] == 0).all(0).sum())
        assert zero_rows <= 2 and zero_cols <= 2  # at most 12.5% of 16 px
    assert (out == 0).any()


def test_merged_spectra_rows(pool_dir):
    method = _pool_method(pool_dir, str_layers="fc1", str_ratio=0.5)
    xs, ys, _, _ = colour_episode()
    frame = merged_spectra(method, xs, ys, 0, "dom", "amt", layers=["mlp.fc1"])
    assert set(frame.layer) == {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    values = frame[frame.layer == "blocks.0.mlp.fc1"].singular_value.to_numpy()
    assert len(values) == 32 and np.all(np.diff(values) <= 1e-9)
    assert np.all(values[16:] < 1e-4 * values[0]) and values[15] > 1e-3  # trimmed to rank 16


@pytest.mark.parametrize("name", ["pm", "pmf", "lora", "amt", "amt_ft", "amt_logit_avg",
                                  "pmf_adv", "amt_ft_adv", "attnscale", "attnscale_amt_ft"])
def test_mixed_precision_adapts_and_attacks(pool_dir, monkeypatch, name):
    """The CUDA path (bfloat16 autocast) on the CPU: every method adapts, classifies and is
    attacked; logits stay float32, agree with the float32 run, and the attack keeps its budget."""
    files = {"pm": "pm.pt", "lora": "member0.pt"}
    model = pool_dir / files.get(METHODS[name].trained, "pool.pt")
    hyper = Hyper(lr=1e-2, ft_steps=2, str_layers="all", str_ratio=0.5)
    xs, ys, xq, yq = colour_episode()
    with load_method(name, model, hyper, CPU, amp=True, seed=0).adapt(xs, ys, 0, xq) as plain:
        expected = plain.clean_logits
    monkeypatch.setattr(methods.devices, "autocast", lambda device, enabled=True: torch.autocast(
        "cpu", dtype=torch.bfloat16, enabled=enabled))
    method = load_method(name, model, hyper, CPU, amp=True, seed=0)
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        assert adapted.clean_logits.dtype == torch.float32
        assert torch.isfinite(adapted.clean_logits).all()
        if not isinstance(method, FineTuned):
            # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-8 ~ 0.4%): logits of
            # scale ~10 agree to ~0.25 after a few layers of such rounding. Fine-tuned logits
            # are not compared: each SGD step feeds the rounding back into the weights, so how
            # far they drift depends on the CPU's bfloat16 kernels (seen: 2.0 with oneDNN
            # limited to AVX2), not on the code.
            torch.testing.assert_close(adapted.clean_logits, expected, atol=0.25, rtol=0.05)
        adv = pgd(lambda x: F.cross_entropy(adapted.classifier(x), yq, reduction="none"), xq,
                  8 / 255, 2 / 255, steps=3)
        assert float((adv - xq).abs().max()) <= 8 / 255 + 1e-6
        assert 0 <= float(adv.min()) <= float(adv.max()) <= 1
        assert adapted.classifier(adv).dtype == torch.float32


def test_amt_linear_weighs_the_members_logits_by_weights_fitted_on_the_augmented_support(
        pool_dir):
    xs, ys, xq, yq = colour_episode()
    method = _pool_method(pool_dir, "amt_linear", linear_steps=30, linear_lr=0.05)
    with method.adapt(xs, ys, 4, queries=xq) as adapted:
        weights = adapted.classifier.weights
        expected = torch.tensordot(weights, _members_logits(pool_dir, xs, ys, xq), dims=1)
        torch.testing.assert_close(adapted.clean_logits, expected, atol=1e-5, rtol=1e-5)
        x = xq.clone().requires_grad_(True)
        F.cross_entropy(adapted.classifier(x), yq).backward()  # attacks go through the sum
        assert x.grad is not None and x.grad.abs().sum() > 0
    # the fit: on the augmented support's copies (seeded per episode), from uniform weights
    generator = torch_generator(0, 4, "linear")
    copies = torch.cat([augment_support(method.backbone, xs, generator) for _ in range(4)])
    members = _members_logits(pool_dir, xs, ys, copies)

    def loss(w: torch.Tensor) -> float:
        return F.cross_entropy(torch.tensordot(w, members, dims=1), ys.repeat(4)).item()

    uniform = torch.full((3,), 1 / 3)
    assert not torch.allclose(weights, uniform) and loss(weights) < loss(uniform) - 1e-3
    # no test information: the weights do not depend on the queries
    with method.adapt(xs, ys, 4) as alone:
        torch.testing.assert_close(alone.classifier.weights, weights)
    # no steps: the logit average
    average = _pool_method(pool_dir, "amt_linear", linear_steps=0)
    with average.adapt(xs, ys, 4, queries=xq) as adapted:
        torch.testing.assert_close(adapted.clean_logits,
                                   _members_logits(pool_dir, xs, ys, xq).mean(0), atol=1e-5,
                                   rtol=1e-5)


def test_amt_single_is_its_one_lora_frozen_without_a_per_episode_merge(pool_dir, monkeypatch):
    """amt_single reads an amt model file (one adversarial LoRA) and merges it once, at load."""
    method = load_method("amt_single", pool_dir / "member1.pt", Hyper(), CPU)
    assert isinstance(method, FrozenMethod)
    monkeypatch.setattr(methods, "merge", lambda *a: pytest.fail("merged per episode"))
    xs, ys, xq, _ = colour_episode()
    expected = _members_logits(pool_dir, xs, ys, xq)[1]
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        torch.testing.assert_close(adapted.clean_logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="needs a amt model file"):
        load_method("amt_single", pool_dir / "pm.pt", Hyper(), CPU)


def test_every_fine_tuning_kind_is_built():
    assert set(methods.TUNINGS) == set(FINETUNE_PARAMS)
    assert {e.ft_params for e in METHODS.values()} <= set(FINETUNE_PARAMS)


@pytest.mark.parametrize("name", ["attnscale", "attnscale_amt_ft"])
def test_attnscale_trains_only_its_scaling_and_residual_vectors(pool_dir, name):
    """Every backbone tensor is the same during and after the fine-tuning; what changes the
    logits are ATTNSCALE's vectors (scalings from 1, DRA offsets from 0), gone after the
    episode."""
    model = pool_dir / ("pm.pt" if name == "attnscale" else "pool.pt")
    hyper = Hyper(lr=5e-2, ft_steps=3)
    method = load_method(name, model, hyper, CPU, seed=0)
    xs, ys, xq, _ = colour_episode()
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        plain = adapted.clean_logits
    method.set_hyper(Hyper(lr=0.0))
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        untuned = adapted.clean_logits
    method.set_hyper(hyper)
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    vectors = method.tuning.vectors
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        during = method.backbone.state_dict()
        assert all(torch.equal(before[k], during[k]) for k in before)
        assert not torch.allclose(adapted.clean_logits, untuned)
        torch.testing.assert_close(adapted.clean_logits, plain, rtol=0, atol=0)
        blocks = len(method.backbone.vit.blocks)
        assert len(vectors) == 4 * blocks  # q/k/v (fused), o, DRA after attention and MLP
        scalings, offsets = vectors[0::4] + vectors[1::4], vectors[2::4] + vectors[3::4]
        assert all(not torch.equal(v, torch.ones_like(v)) for v in scalings)
        assert all(not torch.equal(v, torch.zeros_like(v)) for v in offsets)
        assert not any(p.requires_grad for p in method.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in method.backbone.state_dict().items())
    with method.adapt(xs, ys, 0, queries=xq) as adapted:  # hooks gone, vectors reset
        torch.testing.assert_close(adapted.clean_logits, plain, rtol=0, atol=0)


def test_attnscale_scales_the_attention_matrices_rows_and_offsets_the_branches():
    """With given vectors, block 0's qkv computes s * (W x) + b and its attention branch gets
    the DRA offset added; outside the context the layers are timm's again."""
    backbone = build_backbone("tiny_vit", None, 32)
    attn = backbone.vit.blocks[0].attn
    x = torch.randn(2, 5, attn.qkv.in_features)
    plain = attn(x)
    with methods.AttentionScaling(backbone)() as vectors, torch.no_grad():
        vectors[0].copy_(torch.linspace(0.5, 2.0, len(vectors[0])))  # block 0: qkv's scaling
        torch.testing.assert_close(attn.qkv(x),
                                   F.linear(x, attn.qkv.weight) * vectors[0] + attn.qkv.bias)
        vectors[0].fill_(1.0)
        vectors[2].fill_(0.25)  # block 0: DRA after the attention branch
        torch.testing.assert_close(attn(x), plain + 0.25)
    torch.testing.assert_close(attn(x), plain, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["pmf", "pmf_adv", "amt_ft", "amt_ft_adv"])
def test_adversarial_ttf_trains_on_attacked_copies_and_prototypes_stay_clean(pool_dir, name,
                                                                            monkeypatch):
    """Adv. TTF: each fine-tuning step attacks its augmented support copies within ft_eps, and
    the step's forward holds the clean support (the prototypes) and the attacked copies; the
    non-adversarial variants never attack."""
    model = pool_dir / ("pm.pt" if name.startswith("pmf") else "pool.pt")
    eps = 8 / 255
    method = load_method(name, model, Hyper(lr=1e-2, ft_steps=2, ft_eps=eps), CPU, seed=0)
    xs, ys, xq, _ = colour_episode()
    attacked, batches = [], []
    original = FineTuned.attack_copies

    def spy(self, tensors, head, xs_, ys_, z, generator):
        out = original(self, tensors, head, xs_, ys_, z, generator)
        attacked.append((z.clamp(0, 1), out))
        return out

    monkeypatch.setattr(FineTuned, "attack_copies", spy)
    hook = method.backbone.register_forward_pre_hook(
        lambda module, args: batches.append(args[0].detach().clone())
        if torch.is_grad_enabled() and len(args[0]) == 2 * len(xs) else None)
    with method.adapt(xs, ys, 0, queries=xq):
        pass
    hook.remove()
    steps = [b for b in batches if torch.equal(b[:len(xs)], xs)]
    if not name.endswith("_adv"):
        assert attacked == [] and len(steps) == 2
        return
    assert len(attacked) == 2
    for (z, adv), step in zip(attacked, steps[-2:], strict=True):
        gap = (adv - z).abs()
        assert float(gap.max()) <= eps + 1e-6 and float(gap.max()) > eps / 2
        assert torch.equal(step[:len(xs)], xs)  # the clean support, for the prototypes
        assert torch.equal(step[len(xs):], adv)  # trained on the attacked copies
