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
from builders import Episodes, Killed, train_config
from torch.utils.data import Dataset

from amt import devices
from amt import pretrain as pretrain_command
from amt.backbones import build_backbone
from amt.checkpoints import (
    CHECKPOINT,
    LOG,
    MANIFEST,
    MODEL,
    CheckpointError,
    TrainingError,
    load_tagged,
)
from amt.errors import UserError
from amt.lora import adapter_parameters
from amt.models import load_trained
from amt.pretrain import StoreImages, pretrain
from amt.registry import BACKBONES
from amt.schedule import cosine_lr
from amt.specs import PretrainConfig, TrainConfig, spec_from_args
from amt.train import MetaTuner, register, train

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


def test_apsv_restores_adapters_exactly_and_costs_one_forward_backward():
    torch.manual_seed(0)
    tuner = MetaTuner(train_config(None, apq=False), CPU)
    before = {n: p.detach().clone() for n, p in tuner.params.items()}
    calls = _forward_counter(tuner)
    _step(tuner, lr=0.0)
    assert calls == [12, 12]  # the ascent pass and the training pass, nothing else
    assert all(torch.equal(p, before[n]) for n, p in tuner.params.items())
    perturbed_grads = {n: p.grad.clone() for n, p in tuner.params.items()}
    plain = MetaTuner(train_config(None, apq=False, apsv=False), CPU)
    plain.load_trainable_state(before, Path("-"))
    plain_calls = _forward_counter(plain)
    _step(plain, lr=0.0)
    assert plain_calls == [12]
    # the gradient was taken at the perturbed adapters
    assert any(not torch.allclose(p.grad, perturbed_grads[n]) for n, p in plain.params.items())


def test_apsv_perturbation_is_gamma_times_each_tensors_norm():
    torch.manual_seed(0)
    tuner = MetaTuner(train_config(None, apq=False, awp_gamma=0.01), CPU)
    xs, ys, xq, yq = Episodes(1)[0]
    saved = tuner.perturb_adapters(xs, ys, xq, yq, None, 3)
    tensors = [t for pair in adapter_parameters(tuner.backbone.vit).values() for t in pair]
    for t, original in zip(tensors, saved, strict=True):
        ratio = (t - original).norm() / original.norm()
        assert abs(ratio.item() - 0.01) < 1e-4


def test_amt_step_attacks_the_queries():
    torch.manual_seed(0)
    tuner = MetaTuner(train_config(None, attack_steps=3), CPU)
    calls = _forward_counter(tuner)
    metrics = _step(tuner, lr=0.05)
    # support prototypes once, clean logits once, 3 attack steps, ascent and training passes
    assert calls == [6, 6, 6, 6, 6, 18, 18]
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
        size = (tuner.adversarial_queries(xs, ys, xq, int(ys.max()) + 1, index) - xq).abs().max()
        assert choices[0] / 2 < size <= config.episode_budget(index) + 1e-6
        assert size > config.episode_budget(index) / 2  # the episode's own budget, not another


def _read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_equals_uninterrupted(tmp_path, tiny_file, monkeypatch):
    # drop path draws from the global torch RNG, so its state must be restored too
    spec = BACKBONES["tiny_vit"]
    monkeypatch.setitem(BACKBONES, "tiny_vit", dataclasses.replace(
        spec, kwargs={**spec.kwargs, "drop_path_rate": 0.3}))
    config = train_config(tiny_file, episodes_per_epoch=2)
    whole = train(config, Episodes(4), tmp_path / "whole")
    with pytest.raises(Killed):  # after episode 2, one past the checkpoint at 2 episodes
        train(config, Episodes(4, kill_at=3), tmp_path / "killed")
    assert load_tagged(tmp_path / "killed" / CHECKPOINT, "amt-checkpoint")["episode"] == 2
    with pytest.raises(CheckpointError, match="another configuration.*'lr': \\(0.05, 0.1\\)"):
        train(dataclasses.replace(config, lr=0.1), Episodes(4), tmp_path / "killed")
    resumed = train(config, Episodes(4), tmp_path / "killed")

    a, b = load_tagged(whole, "amt-model"), load_tagged(resumed, "amt-model")
    assert list(a["lora"]) == list(b["lora"])
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert torch.equal(a["head"]["scale"], b["head"]["scale"])
    assert not torch.equal(a["head"]["scale"], torch.tensor(10.0))  # it did train
    rows_a, rows_b = _read_log(tmp_path / "whole" / LOG), _read_log(tmp_path / "killed" / LOG)
    assert [r["episode"] for r in rows_b] == [str(i) for i in range(4)]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert not (tmp_path / "killed" / CHECKPOINT).exists()
    manifest = json.loads((tmp_path / "killed" / MANIFEST).read_text())
    assert manifest["resumed_from_episode"] == 2 and manifest["backbone_sha256"]
    assert {"torch", "timm", "python"} <= set(manifest["environment"])
    assert manifest["peak_memory"]["peak_rss_mib"] > 0


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
