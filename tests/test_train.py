import argparse
import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from builders import Episodes, Killed, train_config
from torch.utils.data import Dataset

import amt.train
from amt import devices
from amt import pretrain as pretrain_command
from amt.attacks import kl_divergence
from amt.backbones import build_backbone
from amt.checkpoints import (
    CHECKPOINT,
    LOG,
    MANIFEST,
    MODEL,
    VALID_LOG,
    CheckpointError,
    TrainingError,
    load_tagged,
)
from amt.errors import UserError
from amt.lora import adapter_delta, adapter_parameters, lora_layers
from amt.models import load_trained
from amt.pretrain import StoreImages, pretrain
from amt.protonet import prototypes
from amt.registry import BACKBONES, SWEEPS, TRAINED
from amt.schedule import cosine_lr, episode_lr, timm_cosine_lr
from amt.specs import PretrainConfig, TrainConfig, spec_from_args
from amt.train import MetaTuner, register, train, validate

CPU = torch.device("cpu")


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    """A tiny_vit backbone file in the flat (DINO-like) layout."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.pth"
    torch.save(build_backbone("tiny_vit", None, 32).vit.state_dict(), path)
    return path


def _step(tuner: MetaTuner, index: int = 0, lr: float = 0.0):
    return tuner.step(Episodes(index + 1)[index], index, lr)


@pytest.mark.parametrize("method", ["pm", "lora", "amt"])
def test_only_intended_parameters_get_gradients(method):
    torch.manual_seed(0)
    tuner = MetaTuner(train_config(None, method=method), CPU)
    _step(tuner)
    graded = {n for n, p in [*tuner.backbone.named_parameters(prefix="backbone"),
                             *tuner.head.named_parameters(prefix="head")] if p.grad is not None}
    if method == "pm":
        everything = {n for n, _ in tuner.backbone.named_parameters(prefix="backbone")}
        assert graded == everything | {"head.scale", "head.bias"}
    else:
        adapters = {n for n, _ in tuner.backbone.named_parameters(prefix="backbone")
                    if ".lora_" in n}
        assert len(adapters) == 2 * 6 * 2  # A and B, 6 adapters a block, 2 blocks
        assert graded == adapters | {"head.scale"}
    assert graded == set(tuner.params)


def _forward_counter(tuner: MetaTuner) -> list[int]:
    calls = []
    tuner.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    return calls


@pytest.mark.parametrize(("loss_support", "detach", "passes"), [
    ("unperturbed", True, [6, 6, 6]),  # the release: support once at w, then query passes
    ("unperturbed", False, [6, 6, 6]),
    ("perturbed", True, [6, 6, 12]),  # support at w, ascent on queries, loss at w + v
    ("perturbed", False, [12, 12]),  # the ascent pass and the training pass, nothing else
])
def test_apsv_restores_adapters_exactly_and_costs_one_forward_backward(loss_support, detach,
                                                                        passes):
    torch.manual_seed(0)
    tuner = MetaTuner(train_config(None, apq=False, apsv_loss_support=loss_support,
                              apsv_detach_support=detach), CPU)
    before = {n: p.detach().clone() for n, p in tuner.params.items()}
    calls = _forward_counter(tuner)
    _step(tuner, lr=0.0)
    assert calls == passes
    assert all(torch.equal(p, before[n]) for n, p in tuner.params.items())
    perturbed_grads = {n: p.grad.clone() for n, p in tuner.params.items()}
    plain = MetaTuner(train_config(None, apq=False, apsv=False), CPU)
    plain.load_trainable_state(before, Path("-"))
    plain_calls = _forward_counter(plain)
    _step(plain, lr=0.0)
    assert plain_calls == [12]
    # the gradient was taken at the perturbed adapters
    assert any(not torch.allclose(p.grad, perturbed_grads[n]) for n, p in plain.params.items())


def _relative_change(now: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    change = torch.stack([(a - b).norm() for a, b in zip(now, before, strict=True)]).norm()
    return (change / torch.stack([b.norm() for b in before]).norm()).item()


def test_apsv_perturbation_is_gamma_times_each_units_norm():
    xs, ys, xq, yq = Episodes(1)[0]
    ratios = {}
    for rescale in ("block", "layer"):
        torch.manual_seed(0)
        tuner = MetaTuner(train_config(None, apq=False, awp_gamma=0.01, apsv_rescale=rescale), CPU)
        saved = dict(tuner.perturb_adapters(xs, ys, xq, yq, None, 3,
                                            tuner.unperturbed_support(xs)))
        layer = tuner.backbone.vit.blocks[0].attn.qkv
        for name in ("lora_A", "lora_B"):
            blocks = list(getattr(layer, name))  # q, k, v
            ratios[rescale, name] = [_relative_change([t], [saved[t]]) for t in blocks]
            fused = _relative_change(blocks, [saved[t] for t in blocks])  # the release's tensor
            assert fused == pytest.approx(0.01, rel=1e-3) or rescale == "block"
        fc1 = tuner.backbone.vit.blocks[0].mlp.fc1.lora_A[0]  # one block: both units agree
        assert _relative_change([fc1], [saved[fc1]]) == pytest.approx(0.01, rel=1e-3)
    assert all(r == pytest.approx(0.01, rel=1e-3) for name in ("lora_A", "lora_B")
               for r in ratios["block", name])
    # one norm over q, k and v: the blocks move by different fractions of their own norms
    assert max(ratios["layer", "lora_A"]) > 1.2 * min(ratios["layer", "lora_A"])


def _direct_gradient(tuner: MetaTuner, episode, x_adv: torch.Tensor) -> dict:
    """The step's gradient written out directly with functional calls, from the release's
    semantics: ascent direction at w (support detached or not), rescaled per unit, final loss
    with the queries at w + v and the support at w (unperturbed) or w + v."""
    from torch.func import functional_call

    cfg, (xs, ys, xq, yq) = tuner.config, episode
    w = {n: p.detach().clone().requires_grad_(True)
         for n, p in tuner.backbone.named_parameters() if p.requires_grad}
    scale = tuner.head.scale.detach().clone().requires_grad_(True)

    def embed(x, weights):
        return functional_call(tuner.backbone, weights, (x,))

    def loss(support, weights):
        queries, attacked = embed(torch.cat([xq, x_adv]), weights).split(len(xq))
        protos = prototypes(support, ys, int(ys.max()) + 1)
        head = {"scale": scale, "bias": tuner.head.bias}
        clean, adv = (functional_call(tuner.head, head, (q, protos)) for q in (queries, attacked))
        kl = F.kl_div(F.log_softmax(adv, -1), F.softmax(clean, -1), reduction="batchmean")
        return F.cross_entropy(clean, yq) + cfg.lambda_adv * kl

    at_w = embed(xs, w)
    ascent = loss(at_w.detach() if cfg.apsv_detach_support else at_w, w)
    direction = dict(zip(w, torch.autograd.grad(ascent, list(w.values()), retain_graph=True),
                         strict=True))
    units: dict[str, list[str]] = {}
    for n in w:  # 'vit.blocks.0.attn.qkv.lora_A.1' is block 1 of the layer's lora_A
        units.setdefault(n.rsplit(".", 1)[0] if cfg.apsv_rescale == "layer" else n, []).append(n)
    perturbed = {}
    for unit in units.values():
        ratio = torch.stack([w[n].detach().norm() for n in unit]).norm() / \
            torch.stack([direction[n].norm() for n in unit]).norm()
        perturbed |= {n: w[n] + (cfg.awp_gamma * ratio * direction[n]).detach() for n in unit}
    support = at_w if cfg.apsv_loss_support == "unperturbed" else embed(xs, perturbed)
    grads = torch.autograd.grad(loss(support, perturbed), [*w.values(), scale])
    return {**{f"backbone.{n}": g for n, g in zip(w, grads, strict=False)},
            "head.scale": grads[-1]}


@pytest.mark.parametrize("rescale", ["layer", "block"])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("loss_support", ["unperturbed", "perturbed"])
def test_apsv_gradient_equals_a_direct_computation(rescale, detach, loss_support, monkeypatch):
    torch.manual_seed(0)
    tuner = MetaTuner(train_config(None, awp_gamma=0.2, apsv_rescale=rescale,
                              apsv_detach_support=detach, apsv_loss_support=loss_support), CPU)
    episode = Episodes(1)[0]
    x_adv = (episode[2] + 0.05 * torch.rand(episode[2].shape)).clamp(0, 1)
    monkeypatch.setattr(tuner, "adversarial_queries", lambda *args: x_adv)
    expected = _direct_gradient(tuner, episode, x_adv)
    tuner.step(episode, 0, 0.0)  # float32 throughout: the release's recipe needs fp16 to run
    assert set(expected) == set(tuner.params)
    # float32 rounding in another order: ~1e-5 of each tensor's largest entry; the eight
    # variants' gradients differ from each other by more than that largest entry
    for name, p in tuner.params.items():
        assert (p.grad - expected[name]).abs().max() <= 1e-3 * expected[name].abs().max(), name


@pytest.mark.parametrize("direction", ["clean_adv", "adv_clean"])
def test_apq_the_loss_and_the_apsv_ascent_use_the_configured_kl(direction, monkeypatch):
    import amt.attacks
    import amt.train

    used = []

    def spy(adv, clean, which):
        used.append(which)
        return kl_divergence(adv, clean, which)

    monkeypatch.setattr(amt.attacks, "kl_divergence", spy)  # APQ's objective
    monkeypatch.setattr(amt.train, "kl_divergence", spy)  # the ascent's and the final loss
    torch.manual_seed(0)
    tuner = MetaTuner(train_config(None, attack_steps=3, kl_direction=direction), CPU)
    _step(tuner)
    assert used == [direction] * (3 + 2)  # 3 attack steps, the ascent, the final loss


def test_kl_direction_defaults_to_the_releases():
    assert TrainConfig().kl_direction == "clean_adv"


@pytest.mark.parametrize(("loss_support", "passes"), [
    # support at w once; clean logits once, 3 attack steps; ascent and training passes
    ("unperturbed", [6, 6, 6, 6, 6, 12, 12]),
    ("perturbed", [6, 6, 6, 6, 6, 18, 18]),
])
def test_amt_step_attacks_the_queries(loss_support, passes):
    torch.manual_seed(0)
    tuner = MetaTuner(train_config(None, attack_steps=3, apsv_loss_support=loss_support,
                              apsv_detach_support=loss_support == "unperturbed"), CPU)
    calls = _forward_counter(tuner)
    metrics = _step(tuner, lr=0.05)
    assert calls == passes
    assert metrics.kl > 0 and metrics.adv_acc is not None
    assert metrics.loss == pytest.approx(metrics.ce + 6.0 * metrics.kl, rel=1e-5)


def test_random_pool_budget_is_drawn_per_episode_and_bounds_the_attack():
    choices = (1 / 255, 4 / 255, 16 / 255)
    config = train_config(None, budgets=choices, attack_steps=2)
    drawn = [config.episode_budget(i) for i in range(40)]
    assert set(drawn) == set(choices)  # every choice appears, nothing else
    assert drawn == [config.episode_budget(i) for i in range(40)]  # resumption draws the same
    assert drawn != [train_config(None, budgets=choices, seed=1).episode_budget(i)
                     for i in range(40)]  # pool members with their own seeds differ
    assert train_config(None, budgets=[2 / 255]).episode_budget(7) == 2 / 255
    torch.manual_seed(0)
    tuner = MetaTuner(config, CPU)
    for index in (drawn.index(choices[0]), drawn.index(choices[2])):
        xs, ys, xq, _ = Episodes(index + 1)[index]
        attacked = tuner.adversarial_queries(ys, xq, int(ys.max()) + 1, index,
                                             tuner.unperturbed_support(xs))
        size = (attacked - xq).abs().max()
        assert choices[0] / 2 < size <= config.episode_budget(index) + 1e-6
        assert size > config.episode_budget(index) / 2  # the episode's own budget, not another


def _read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class ScriptedValidation:
    """Stands for ``validate``: the scripted scores in call order; remembers the trainable
    tensors of each call."""

    def __init__(self, scores: list[float]) -> None:
        self.scores, self.snapshots = scores, []

    def __call__(self, tuner: MetaTuner, sets, workers: int) -> dict[str, float]:
        self.snapshots.append(tuner.trainable_state())
        score = self.scores[len(self.snapshots) - 1]
        return {"acc": score, "acc_synthetic": score}


VALID_SETS = {"synthetic": Episodes(2)}


@pytest.mark.parametrize(("optimizer", "schedule"), [("sgd", "cosine_episode"),
                                                     ("adamw", "cosine_epoch_timm")])
def test_resume_equals_uninterrupted(tmp_path, tiny_file, monkeypatch, optimizer, schedule):
    # drop path draws from the global torch RNG, so its state must be restored too
    spec = BACKBONES["tiny_vit"]
    monkeypatch.setitem(BACKBONES, "tiny_vit", dataclasses.replace(
        spec, kwargs={**spec.kwargs, "drop_path_rate": 0.3}))
    config = train_config(tiny_file, episodes_per_epoch=2, optimizer=optimizer, schedule=schedule,
                     keep="best")
    # epoch 1 is the best: a resumed run has its tensors from the checkpoint only
    monkeypatch.setattr(amt.train, "validate", ScriptedValidation([0.2, 0.9, 0.5]))
    whole = train(config, Episodes(4), tmp_path / "whole", VALID_SETS)
    interrupted = ScriptedValidation([0.2, 0.9, 0.5])
    monkeypatch.setattr(amt.train, "validate", interrupted)
    with pytest.raises(Killed):  # after episode 2, one past the checkpoint at 2 episodes
        train(config, Episodes(4, kill_at=3), tmp_path / "killed", VALID_SETS)
    ckpt = load_tagged(tmp_path / "killed" / CHECKPOINT, "amt-checkpoint")
    assert ckpt["episode"] == 2 and ckpt["validation"]["best"]["epoch"] == 1
    with pytest.raises(CheckpointError, match="another configuration.*'lr': \\(0.05, 0.1\\)"):
        train(dataclasses.replace(config, lr=0.1), Episodes(4), tmp_path / "killed", VALID_SETS)
    resumed = train(config, Episodes(4), tmp_path / "killed", VALID_SETS)
    assert len(interrupted.snapshots) == 3  # before training and epoch 1, then epoch 2

    a, b = load_tagged(whole, "amt-model"), load_tagged(resumed, "amt-model")
    assert a["kept_epoch"] == b["kept_epoch"] == 1 and a["validation"] == b["validation"]
    assert list(a["lora"]) == list(b["lora"])
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert torch.equal(a["head"]["scale"], b["head"]["scale"])
    assert torch.equal(b["head"]["scale"], interrupted.snapshots[1]["head.scale"])
    assert not torch.equal(a["head"]["scale"], torch.tensor(10.0))  # it did train
    rows_a, rows_b = _read_log(tmp_path / "whole" / LOG), _read_log(tmp_path / "killed" / LOG)
    assert [r["episode"] for r in rows_b] == [str(i) for i in range(4)]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r["lr"] for r in rows_a] == [r["lr"] for r in rows_b]
    assert (tmp_path / "whole" / VALID_LOG).read_text() == \
        (tmp_path / "killed" / VALID_LOG).read_text()
    assert not (tmp_path / "killed" / CHECKPOINT).exists()
    manifest = json.loads((tmp_path / "killed" / MANIFEST).read_text())
    assert manifest["resumed_from_episode"] == 2 and manifest["backbone_sha256"]
    assert manifest["kept_epoch"] == 1
    assert {"torch", "timm", "python"} <= set(manifest["environment"])
    assert manifest["peak_memory"]["peak_rss_mib"] > 0


@pytest.mark.parametrize(("keep", "kept"), [("best", 2), ("last", 4)])
def test_the_kept_epochs_weights_are_written_and_recorded(tmp_path, tiny_file, monkeypatch,
                                                           keep, kept):
    # before training scores highest (never kept); epochs 2 and 3 tie: the first is best
    scores = [0.95, 0.5, 0.9, 0.9, 0.6]
    scripted = ScriptedValidation(scores)
    monkeypatch.setattr(amt.train, "validate", scripted)
    config = train_config(tiny_file, method="lora", epochs=4, episodes_per_epoch=1, keep=keep)
    path = train(config, Episodes(4), tmp_path / "run", VALID_SETS)
    stored = load_tagged(path, "amt-model")
    assert stored["kept_epoch"] == kept
    assert [(r["epoch"], r["episode"], r["acc"]) for r in stored["validation"]] == \
        [(e, e, s) for e, s in enumerate(scores)]
    backbone, head = load_trained(path)
    expected = scripted.snapshots[kept]
    live = dict(backbone.named_parameters())
    assert all(torch.equal(live[n.removeprefix("backbone.")], t)
               for n, t in expected.items() if n.startswith("backbone."))
    assert torch.equal(head.scale.detach(), expected["head.scale"])
    assert not torch.equal(scripted.snapshots[2]["head.scale"], scripted.snapshots[4]["head.scale"])
    rows = _read_log(tmp_path / "run" / VALID_LOG)
    assert [r["kept"] for r in rows] == ["1" if e == kept else "0" for e in range(5)]
    assert rows[3]["acc_synthetic"] == "0.9"
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    assert manifest["kept_epoch"] == kept and len(manifest["validation"]) == 5


def test_keep_best_needs_validation_episodes(tmp_path, tiny_file):
    with pytest.raises(UserError, match="keep='best' needs validation episodes"):
        train(train_config(tiny_file, keep="best"), Episodes(6), tmp_path / "run")
    path = train(train_config(tiny_file, method="lora", epochs=1), Episodes(3), tmp_path / "last")
    assert load_tagged(path, "amt-model")["kept_epoch"] == 1  # no validation: the last
    assert _read_log(tmp_path / "last" / VALID_LOG) == []


def test_validation_is_clean_protonet_accuracy_and_draws_no_random_numbers(monkeypatch):
    spec = BACKBONES["tiny_vit"]  # drop path would draw random numbers in train mode
    monkeypatch.setitem(BACKBONES, "tiny_vit", dataclasses.replace(
        spec, kwargs={**spec.kwargs, "drop_path_rate": 0.3}))
    torch.manual_seed(0)
    tuner = MetaTuner(train_config(None, method="lora"), CPU)
    # faint colours: the classes overlap, so the accuracies are neither 0 nor 1
    sets = {"three": Episodes(3, ways=3, queries=4, colour=0.05),
            "two": Episodes(2, ways=2, queries=4, colour=0.05)}
    state = torch.get_rng_state()
    scores = validate(tuner, sets, workers=0)
    assert torch.equal(torch.get_rng_state(), state) and tuner.backbone.training
    tuner.backbone.eval()
    expected = {}
    with torch.no_grad():
        for domain, episodes in sets.items():
            accuracies = []
            for xs, ys, xq, yq in map(episodes.__getitem__, range(len(episodes))):
                # the nearest prototype by cosine
                support, query = tuner.backbone(xs), tuner.backbone(xq)
                protos = torch.stack([support[ys == k].mean(0) for k in range(int(ys.max()) + 1)])
                cosine = F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).T
                accuracies.append((cosine.argmax(-1) == yq).float().mean().item())
            expected[f"acc_{domain}"] = np.mean(accuracies)
    assert scores == pytest.approx({"acc": np.mean(list(expected.values())), **expected})
    assert min(expected.values()) > 0 and max(expected.values()) < 1  # a telling case
    assert validate(tuner, sets, workers=0) == scores


def test_train_command_validates_on_stored_episodes(tmp_path, tiny_file):
    from builders import split_domain

    from amt.episode_files import episode_meta, save_episodes
    from amt.episodes import FixedSampler, draw_episodes
    from data_prep.store import DomainStore

    store_path = split_domain(tmp_path / "d.h5", {"train": 4, "valid": 3, "test": 1}, 6)
    store, sampler = DomainStore(store_path), FixedSampler(3, 1, 2)
    episodes = draw_episodes(store, "valid", sampler, 2, seed=2)
    save_episodes(tmp_path / "valid.json", episodes,
                  episode_meta(store, domain="synth", split="valid", sampler=sampler, seed=2,
                               count=2))
    common = ("--stores", str(store_path), "--method", "lora", "--backbone", "tiny_vit",
              "--backbone-checkpoint", str(tiny_file), "--rank", "2", "--epochs", "2",
              "--episodes-per-epoch", "2", "--device", "cpu", "--setting",
              json.dumps(sampler.setting()))
    args = _parse("train", *common, "--keep", "best", "--valid-stores", str(store_path),
                  "--valid-episodes", str(tmp_path / "valid.json"), "--out", str(tmp_path / "o"))
    assert args.func(args) == 0
    rows = _read_log(tmp_path / "o" / VALID_LOG)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] and "acc_synth" in rows[0]
    kept = load_tagged(tmp_path / "o" / MODEL, "amt-model")["kept_epoch"]
    assert kept in (1, 2) and [r["kept"] for r in rows].count("1") == 1
    assert rows[kept]["kept"] == "1"
    unpaired = _parse("train", *common, "--valid-stores", str(store_path), "--out", "o2")
    with pytest.raises(UserError, match="--valid-stores gives 1 files and --valid-episodes 0"):
        unpaired.func(unpaired)


def test_load_trained_applies_adapters_to_the_recorded_backbone(tmp_path, tiny_file):
    path = train(train_config(tiny_file, method="lora", epochs=1), Episodes(3), tmp_path / "run")
    backbone, head = load_trained(path)
    stored = load_tagged(path, "amt-model")
    live = adapter_parameters(backbone.vit)
    assert all(torch.equal(live[n][0], stored["lora"][f"{n}.A"]) for n in live)
    assert torch.equal(head.scale.detach(), stored["head"]["scale"])
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 for k, v in torch.load(tiny_file, weights_only=True).items()}, other)
    with pytest.raises(CheckpointError, match="trained on a backbone file with SHA-256"):
        load_trained(path, other)


def test_pm_model_file_holds_the_backbone(tmp_path):
    torch.manual_seed(0)
    path = train(train_config(None, method="pm", epochs=1), Episodes(3), tmp_path / "pm")
    backbone, _ = load_trained(path)
    stored = load_tagged(path, "amt-model")["backbone_state"]
    assert all(torch.equal(v, stored[k]) for k, v in backbone.vit.state_dict().items())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_file):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="episode 3: non-finite loss.*checkpoint.pt kept"):
        train(train_config(tiny_file, method="lora"), Episodes(6, nan_at=3), out)
    ckpt = load_tagged(out / CHECKPOINT, "amt-checkpoint")
    assert ckpt["episode"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["trainable"].values())
    assert not (out / MODEL).exists()


def test_checkpoint_with_pickled_code_is_refused(tmp_path, tiny_file, pickled_code):
    payload, marker = pickled_code
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"format": "amt-checkpoint", "format_version": 1, "x": payload},
               out / CHECKPOINT)
    with pytest.raises(CheckpointError, match="checkpoint.pt: refused"):
        train(train_config(tiny_file), Episodes(6), out)
    assert not marker.exists()


def test_bad_episode_and_config_are_named(tmp_path, tiny_file):
    with pytest.raises(TrainingError, match="episode 0: support images \\(6, 3, 48, 48\\)"):
        train(train_config(tiny_file, method="lora"), Episodes(6, size=48), tmp_path / "a")
    with pytest.raises(ValueError, match="the run needs 2 epochs x 3 = 6"):
        train(train_config(tiny_file), Episodes(5), tmp_path / "b")
    with pytest.raises(ValueError, match="needs backbone_checkpoint"):
        train(train_config(None), Episodes(6), tmp_path / "c")
    with pytest.raises(ValueError, match="method='adv': expected one of"):
        train_config(tiny_file, method="adv")


def test_vits16_in_dino_layout_lora_adapts_and_trains_one_step(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")  # 14x14 grid
    del vit
    config = TrainConfig(method="lora", backbone="dino_vits16", epochs=1, episodes_per_epoch=1,
                         warmup_epochs=0, lr=0.01,
                         backbone_checkpoint=str(tmp_path / "dino_deitsmall16_pretrain.pth"))
    assert config.image_size == 128
    path = train(config, Episodes(1, ways=2, shots=1, queries=1, size=128), tmp_path / "run")
    stored = load_tagged(path, "amt-model")
    assert len(stored["lora"]) == 2 * 6 * 12
    assert sum(t.numel() for t in stored["lora"].values()) == 663_552  # ~0.66 M, as the paper
    assert stored["lora"]["blocks.0.attn.qkv.k.A"].shape == (8, 384)
    row = _read_log(tmp_path / "run" / LOG)[0]
    assert np.isfinite(float(row["loss"]))


def test_cosine_schedule():
    lrs = [cosine_lr(i, 10, 2, 1.0) for i in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert lrs[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)))
    config = train_config(None, epochs=5, episodes_per_epoch=2, warmup_epochs=1, lr=1.0)
    assert [episode_lr(config, i) for i in range(10)] == lrs


def _timm_lrs(epochs: int, warmup: int, lr: float, stepped: str) -> list[float]:
    """Per-epoch lrs of timm's own scheduler, built by create_scheduler from the release's
    arguments (utils/args.py:139-162) and stepped before (AMT) or after (PMF) each epoch."""
    from timm.scheduler import create_scheduler

    args = argparse.Namespace(sched="cosine", epochs=epochs, warmup_epochs=warmup,
                              warmup_lr=1e-6, min_lr=1e-6, cooldown_epochs=10, decay_epochs=30,
                              decay_rate=0.1, patience_epochs=10, lr_noise=None,
                              lr_noise_pct=0.67, lr_noise_std=1.0, seed=0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    scheduler, _ = create_scheduler(args, optimizer)
    lrs = []
    for epoch in range(epochs):
        if stepped == "before":
            scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
        if stepped == "after":
            scheduler.step(epoch)
    return lrs


@pytest.mark.parametrize(("schedule", "stepped"), [("cosine_epoch_timm", "before"),
                                                   ("cosine_epoch_timm_after", "after")])
@pytest.mark.parametrize(("epochs", "warmup", "lr"), [(30, 5, 5e-4), (100, 5, 2.5e-5),
                                                      (7, 0, 0.1)])
def test_epoch_schedules_equal_timms_scheduler(schedule, stepped, epochs, warmup, lr):
    config = TrainConfig(epochs=epochs, episodes_per_epoch=3, warmup_epochs=warmup, lr=lr,
                         schedule=schedule)
    ours = [episode_lr(config, i) for i in range(config.total_episodes)]
    per_epoch = [ours[3 * e:3 * e + 3] for e in range(epochs)]
    assert all(len(set(lrs)) == 1 for lrs in per_epoch)  # constant within an epoch
    assert [lrs[0] for lrs in per_epoch] == pytest.approx(_timm_lrs(epochs, warmup, lr, stepped),
                                                          rel=1e-12)


def test_the_releases_schedule_for_lr_5e4_over_30_epochs():
    """release_facts: 1e-6, 1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4, then 4.67e-4 (the cosine at 5 of
    30, never 5e-4 itself), down to 2.4e-6 in epoch 29."""
    lrs = [timm_cosine_lr(e, 30, 5, 5e-4, 1e-6, 1e-6) for e in range(30)]
    assert lrs[:6] == pytest.approx([1e-6, 1.008e-4, 2.006e-4, 3.004e-4, 4.002e-4, 4.6657e-4],
                                    rel=1e-4)
    assert max(lrs) < 5e-4 and lrs[29] == pytest.approx(2.37e-6, rel=1e-2)


def test_optimizer_choice():
    sgd = MetaTuner(train_config(None, method="lora"), CPU).optimizer
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    adamw = MetaTuner(train_config(None, method="lora", optimizer="adamw", weight_decay=0.05),
                      CPU).optimizer
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.05
    with pytest.raises(UserError, match="optimizer='adam': expected one of"):
        train_config(None, optimizer="adam")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    register(subparsers)
    pretrain_command.register(subparsers)
    return parser.parse_args(argv)


def test_several_budgets_are_the_random_pool_and_one_is_fixed():
    args = _parse("train", "--method", "amt", "--backbone", "small_vit", "--backbone-checkpoint",
                  "w.pt", "--stores", "a.h5", "--budgets", "1/255", "4/255", "--out", "o")
    assert spec_from_args(TrainConfig, args).budgets == (1 / 255, 4 / 255)


def test_cli_flags_override_the_spec_and_the_defaults():
    spec = json.dumps({"method": "lora", "backbone": "dino_vits16", "lr": 0.01,
                       "setting": {"ways": 5, "shots": 5, "queries": 15}})
    args = _parse("train", "--spec", spec, "--method", "amt", "--backbone-checkpoint", "w.pth",
                  "--stores", "a.h5", "b.h5", "--budgets", "4/255", "--no-apsv",
                  "--attack-steps", "7", "--out", "o")
    config = spec_from_args(TrainConfig, args)
    defaults = TrainConfig()
    assert config.budgets == (pytest.approx(4 / 255),) and \
        config.alpha(config.episode_budget(0)) == pytest.approx(1 / 255)
    assert config.setting == {"ways": 5, "shots": 5, "queries": 15}
    assert (config.method, config.lr) == ("amt", 0.01)  # the flag over the spec, the spec's lr
    assert (config.apsv, config.apq, config.attack_steps) == (False, True, 7)
    assert (config.epochs, config.image_size) == (defaults.epochs, 128)
    assert args.func.__name__ == "cmd_train" and args.stores == [Path("a.h5"), Path("b.h5")]
    variable = _parse("train", "--method", "pm", "--backbone", "small_vit",
                      "--backbone-checkpoint", "w.pt", "--stores", "a.h5", "--setting",
                      '{"variable": true}', "--out", "o")
    assert spec_from_args(TrainConfig, variable).setting == {"variable": True}
    assert spec_from_args(TrainConfig, variable).image_size == 32
    eight = _parse("train", "--method", "amt", "--budgets", "eight", "--stores", "a.h5",
                   "--out", "o")
    with pytest.raises(UserError, match="budgets\\[0\\]: budget 'eight' is not a number"):
        spec_from_args(TrainConfig, eight)


class _Colours(Dataset):
    """Four classes, each a colour plus noise."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        label = i % 4
        return (0.25 * label + 0.2 * torch.rand(3, 32, 32, generator=g)).clamp(0, 1), label


def test_pretrain_writes_a_backbone_that_build_backbone_loads(tmp_path):
    config = PretrainConfig(arch="tiny_vit", epochs=4, batch_size=8, lr=3e-3, warmup_epochs=1,
                            device="cpu")
    path = pretrain(config, _Colours(), 4, tmp_path / "pre")
    rows = _read_log(tmp_path / "pre" / LOG)
    assert len(rows) == 4 and float(rows[-1]["loss"]) < float(rows[0]["loss"])
    backbone = build_backbone("tiny_vit", path, 32)
    stored = load_tagged(path, "amt-model")
    assert torch.equal(backbone.vit.pos_embed, stored["backbone_state"]["pos_embed"])
    assert json.loads((tmp_path / "pre" / MANIFEST).read_text())["classes"] == 4
    with pytest.raises(CheckpointError, match="holds backbone 'tiny_vit', not 'small_vit'"):
        build_backbone("small_vit", path, 32)


def test_store_images_are_deterministic_per_epoch(tiny_domain):
    from amt.transforms import train_transform
    from data_prep.store import DomainStore

    images = StoreImages(DomainStore(tiny_domain), "train", train_transform(32), seed=0)
    assert len(images) == 16 and images.num_classes == 4
    assert sorted(set(images.labels.tolist())) == [0, 1, 2, 3]
    first, label = images[5]
    assert first.shape == (3, 32, 32) and label == 1
    assert torch.equal(images[5][0], first)
    images.set_epoch(1)
    assert not torch.equal(images[5][0], first)


def test_device_choice():
    assert devices.pick_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert devices.pick_device("auto") == CPU
        with pytest.raises(ValueError, match="'cuda:0': CUDA is not available"):
            devices.pick_device("cuda:0")
    with pytest.raises(ValueError, match="device 'gpu'"):
        devices.pick_device("gpu")


def test_pretrain_command_on_a_store(tmp_path, tiny_domain):
    args = _parse("pretrain", "--store", str(tiny_domain), "--arch", "tiny_vit", "--epochs", "1",
                  "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "pre"))
    assert args.func(args) == 0
    manifest = json.loads((tmp_path / "pre" / MANIFEST).read_text())
    assert manifest["classes"] == 4 and manifest["images"] == 16
    assert manifest["config"]["flip_p"] == 0.0 and manifest["config"]["crop_scale"] == [0.5, 1.0]
    assert build_backbone("tiny_vit", tmp_path / "pre" / MODEL, 32).embed_dim == 32


@pytest.fixture
def bf16_autocast(monkeypatch):
    """The CUDA mixed-precision path (bfloat16 autocast) run on the CPU, where the pipeline
    itself never enables it: the same contexts, the same dtype mixing."""
    monkeypatch.setattr(devices, "autocast",
                        lambda device, enabled=True: torch.autocast("cpu", dtype=torch.bfloat16,
                                                                    enabled=enabled))


@pytest.mark.parametrize("method", ["pm", "lora", "amt"])
def test_mixed_precision_step_trains_float32_parameters(bf16_autocast, method):
    torch.manual_seed(0)
    mixed = MetaTuner(train_config(None, method=method), CPU)
    reference = MetaTuner(train_config(None, method=method, amp=False), CPU)
    reference.load_trainable_state({n: p.detach().clone() for n, p in mixed.params.items()},
                                   Path("-"))
    before = {n: p.detach().clone() for n, p in mixed.params.items()}
    got, expected = _step(mixed, lr=0.05), _step(reference, lr=0.05)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in mixed.params.values())
    # bfloat16 keeps 8 bits of mantissa: features agree to ~0.3%, the scaled cosine logits
    # and so the loss (and the attack built on them) to within about 10% on this tiny model
    assert math.isfinite(got.loss) and got.loss == pytest.approx(expected.loss, rel=0.15)
    assert all(torch.isfinite(p.grad).all() for p in mixed.params.values())
    # Every trainable tensor gets a gradient and moves. head.bias (a shift of every logit) has
    # none in exact arithmetic; under bfloat16 its gradient is rounding noise, zero where
    # bfloat16 is emulated and not on CPUs with native bfloat16 (AMX-BF16), so it is left out.
    learning = set(mixed.params) - {"head.bias"}
    assert all(mixed.params[n].grad.abs().sum() > 0 for n in learning)
    assert all(not torch.equal(mixed.params[n], before[n]) for n in learning)


def test_identical_runs_write_byte_identical_model_files(tmp_path, tiny_file, monkeypatch):
    # torch.save on a path named the zip records after the temporary file, whose name holds
    # the process id: the second run stands for another process
    paths = []
    for i in range(2):
        monkeypatch.setattr(os, "getpid", lambda i=i: 1000 + i)
        paths.append(train(train_config(tiny_file, method="lora", epochs=1), Episodes(3),
                           tmp_path / f"run{i}"))
    assert paths[0].read_bytes() == paths[1].read_bytes()


# -- the trained ablations ------------------------------------------------------------------------
def _variant(trained: str, tiny_file: Path | None = None, **overrides) -> TrainConfig:
    """The tiny config with a trained ablation's registry switches (as the plan sets them)."""
    return train_config(tiny_file, **dict(TRAINED[trained].switches), **overrides)


def test_apq_off_attacks_no_query(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the query attack ran")

    monkeypatch.setattr(amt.train, "kl_query_attack", refuse)
    torch.manual_seed(0)
    metrics = _step(MetaTuner(_variant("amt_no_apq"), CPU))
    assert metrics.kl is None and metrics.adv_acc is None and metrics.loss == metrics.ce
    with pytest.raises(AssertionError, match="the query attack ran"):
        _step(MetaTuner(train_config(None), CPU))  # amt's own pool attacks


def test_apsv_off_perturbs_nothing(monkeypatch):
    monkeypatch.setattr(MetaTuner, "perturb_adapters", lambda *a: pytest.fail("APSV ran"))
    torch.manual_seed(0)
    assert _step(MetaTuner(_variant("amt_no_apsv"), CPU)).kl is not None  # APQ still on


@pytest.mark.parametrize("lambda_adv", [1.0, 3.0])
def test_the_loss_weighs_the_kl_by_each_swept_lambda(lambda_adv):
    torch.manual_seed(0)
    config = train_config(None, **dict(TRAINED[SWEEPS["amt_lambda"].name(lambda_adv)].switches))
    assert config.lambda_adv == lambda_adv
    metrics = _step(MetaTuner(config, CPU))
    assert metrics.loss == pytest.approx(metrics.ce + lambda_adv * metrics.kl, rel=1e-5)


def test_standard_init_starts_from_zero_b_on_the_frozen_weight_and_is_reloaded_so(
        tmp_path, tiny_file):
    frozen = build_backbone("tiny_vit", tiny_file, 32).vit
    torch.manual_seed(0)
    tuner = MetaTuner(_variant("amt_standard_init", tiny_file), CPU)
    for name, layer in lora_layers(tuner.backbone.vit).items():
        assert torch.equal(layer.residual, frozen.get_submodule(name).weight)
        assert all(not b.any() and a.any() for a, b in layer.adapters())
    svd = MetaTuner(train_config(tiny_file), CPU)  # AMT's own: W_res = W - B A
    assert not torch.equal(svd.backbone.vit.blocks[0].mlp.fc1.residual,
                           frozen.blocks[0].mlp.fc1.weight)
    path = train(_variant("amt_standard_init", tiny_file, epochs=1), Episodes(3),
                 tmp_path / "run")
    backbone, _ = load_trained(path)
    assert torch.equal(backbone.vit.blocks[0].mlp.fc1.residual, frozen.blocks[0].mlp.fc1.weight)
    assert load_tagged(path, "amt-model")["residual"] == "stored"


@pytest.mark.parametrize("rescale", ["layer", "block"])
def test_weight_space_apsv_moves_w_along_dl_dw_by_gamma_times_the_delta_norm(rescale,
                                                                             tiny_file):
    xs, ys, xq, yq = Episodes(1)[0]
    config = _variant("amt_weight_space", tiny_file, apq=False, awp_gamma=0.01,
                      apsv_rescale=rescale)
    tuner = MetaTuner(config, CPU)
    reference = MetaTuner(config, CPU)
    reference.load_trainable_state(tuner.trainable_state(), Path("-"))
    adapters = tuner.trainable_state()
    support = tuner.unperturbed_support(xs)
    saved = dict(tuner.perturb_adapters(xs, ys, xq, yq, None, 3, support))
    assert all(torch.equal(p, adapters[n]) for n, p in tuner.params.items())  # A, B untouched
    fc1 = tuner.backbone.vit.blocks[1].mlp.fc1
    qkv = tuner.backbone.vit.blocks[0].attn.qkv
    for layer in (fc1, qkv):
        v, delta = layer.residual - saved[layer.residual], adapter_delta(layer).detach()
        if rescale == "layer":
            assert v.norm().item() == pytest.approx(0.01 * delta.norm().item(), rel=1e-4)
        for rows_v, rows_delta in zip(v.split(layer.rows), delta.split(layer.rows),
                                      strict=True):
            assert rescale == "layer" or \
                rows_v.norm().item() == pytest.approx(0.01 * rows_delta.norm().item(), rel=1e-4)
    # along dL/dW: B^T v is parallel to dL/dA = B^T dL/dW (at the unperturbed weights, the
    # ascent's support detached as the release's)
    loss, _ = reference.loss(xs, ys, xq, yq, None, 3,
                             reference.unperturbed_support(xs).detach())
    ref_fc1 = reference.backbone.vit.blocks[1].mlp.fc1
    (grad_a,) = torch.autograd.grad(loss, ref_fc1.lora_A[0])
    projected = fc1.lora_B[0].T @ (fc1.residual - saved[fc1.residual])
    assert F.cosine_similarity(projected.flatten(), grad_a.flatten(), dim=0) > 1 - 1e-4


def test_weight_space_apsv_restores_w_exactly_and_trains_at_the_perturbed_weight():
    torch.manual_seed(0)
    tuner = MetaTuner(_variant("amt_weight_space", apq=False), CPU)
    residuals = [layer.residual.clone() for layer in lora_layers(tuner.backbone.vit).values()]
    before = tuner.trainable_state()
    _step(tuner, lr=0.0)
    assert all(torch.equal(layer.residual, r) and not layer.residual.requires_grad for layer, r
               in zip(lora_layers(tuner.backbone.vit).values(), residuals, strict=True))
    plain = MetaTuner(train_config(None, apq=False, apsv=False), CPU)
    plain.load_trainable_state(before, Path("-"))
    _step(plain, lr=0.0)
    assert any(not torch.allclose(p.grad, tuner.params[n].grad) for n, p in plain.params.items())
