"""StyleAdv's meta-training (amt.styleadv): the style attack, the loss, the run and its file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import Episodes, Killed, backbone_file, split_domain, train_config

from amt import devices
from amt.backbones import build_backbone
from amt.episodes import FixedSampler
from amt.methods import FrozenMethod, load_method
from amt.models import load_trained
from amt.specs import Hyper
from amt.styleadv import (
    GlobalClassEpisodes,
    StyleAdvTuner,
    adain,
    group_ends,
    restyled,
    style_of,
)
from amt.train import train
from amt.transforms import train_transform
from data_prep.store import DomainStore

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
CLASSES = 6


class GlobalEpisodes(Episodes):
    """Synthetic episodes with global labels: label k is global class (k + i) % CLASSES."""

    num_classes = CLASSES

    def __getitem__(self, i: int):
        return (*super().__getitem__(i), (torch.arange(self.ways) + i) % CLASSES)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return backbone_file(tmp_path_factory.mktemp("styleadv"))


def _tuner(tiny_file: Path, **overrides) -> StyleAdvTuner:
    torch.manual_seed(0)
    return StyleAdvTuner(train_config(tiny_file, method="styleadv", **overrides), CPU, CLASSES)


def _episode(tuner: StyleAdvTuner, index: int = 0):
    xs, ys, xq, yq, classes = GlobalEpisodes(index + 1)[index]
    return torch.cat([xs, xq]), classes[torch.cat([ys, yq])], ys, yq


def test_groups_are_the_first_three_quarters_of_the_blocks():
    assert group_ends(build_backbone("dino_vits16", None, 32)) == [2, 5, 8]  # SA: block123
    assert group_ends(build_backbone("small_vit", None, 32)) == [0, 1, 2]
    assert group_ends(build_backbone("tiny_vit", None, 32)) == [0]  # 2 blocks: 2 groups


def test_the_style_step_is_an_fgsm_on_the_statistics_within_its_budget(tiny_file):
    """The adversarial mean and std are the clean statistics of the block's patch tokens plus
    eps * sign of the global classifier's gradient with respect to them, computed here by
    restyling the block to leaf statistics (AdaIN, an identity at the clean style)."""
    tuner = _tuner(tiny_file)
    images, labels, _, _ = _episode(tuner)
    end = group_ends(tuner.backbone)[0]
    eps = 0.08
    tuner.backbone.eval()
    adv_mean, adv_std = tuner.attack_group(images, labels, [], [], end, eps)

    captured = {}

    def restyle(patches):
        mean, std = style_of(patches)
        captured["leaves"] = [s.detach().requires_grad_(True) for s in (mean, std)]
        return adain(patches, tuple(captured["leaves"]))

    with restyled(tuner.backbone, {end: restyle}):
        loss = F.cross_entropy(tuner.classifier(tuner.backbone(images)), labels)
    grads = torch.autograd.grad(loss, captured["leaves"])
    clean = [s.detach() for s in captured["leaves"]]
    for adv, base, grad in zip((adv_mean, adv_std), clean, grads, strict=True):
        assert (grad != 0).all()
        torch.testing.assert_close(adv, base + eps * grad.sign(), rtol=0, atol=1e-6)
        torch.testing.assert_close((adv - base).abs(), torch.full_like(adv, eps), rtol=0,
                                   atol=1e-6)
    assert not any(p.grad is not None for p in tuner.params.values())  # nothing accumulated


def test_each_group_draws_its_eps_from_the_list_and_zero_skips_the_attack(tiny_file):
    tuner = _tuner(tiny_file, styleadv_epsilons=[0.5])
    images, labels, _, _ = _episode(tuner)
    (mean, std), = tuner.attack_styles(images, labels, np.random.default_rng(0))
    captured = []
    with restyled(tuner.backbone, {0: lambda p: captured.append(style_of(p)) or p}):
        tuner.backbone(images)
    torch.testing.assert_close((mean - captured[0][0]).abs(), torch.full_like(mean, 0.5),
                               rtol=0, atol=1e-5)
    tuner = _tuner(tiny_file, styleadv_epsilons=[0.0])
    assert tuner.attack_styles(images, labels, np.random.default_rng(0)) == [None]


def test_the_adversarial_pass_restyles_the_groups_unless_skipped(tiny_file):
    tuner = _tuner(tiny_file, styleadv_epsilons=[0.8], styleadv_skip=0.0)
    images, labels, ys, yq = _episode(tuner)
    styles = tuner.attack_styles(images, labels, np.random.default_rng(0))
    loss, metrics = tuner.styleadv_loss(images, ys, yq, labels, 3, styles,
                                        np.random.default_rng(0))
    assert metrics.kl > 0  # the adversarial pass saw other styles
    clean = F.cross_entropy(tuner.classifier(tuner.backbone(images)), labels).item()
    assert loss.item() > metrics.ce + clean  # L_fsl + L_fsl_adv + KL + L_cls
    skipping = _tuner(tiny_file, styleadv_epsilons=[0.8], styleadv_skip=1.0)
    loss, metrics = skipping.styleadv_loss(images, ys, yq, labels, 3, styles,
                                           np.random.default_rng(0))
    assert metrics.kl == 0 and metrics.adv_acc == metrics.acc
    torch.testing.assert_close(loss.item(), 2 * metrics.ce + clean, rtol=1e-5, atol=1e-5)


def test_styleadv_trains_the_whole_backbone_and_writes_a_full_model(tmp_path, tiny_file):
    config = train_config(tiny_file, method="styleadv")
    episodes = GlobalEpisodes(config.total_episodes)
    tuner = StyleAdvTuner(config, CPU, CLASSES)
    before = {n: p.detach().clone() for n, p in tuner.params.items()}
    tuner.step(episodes[0], 0, 0.05)
    moved = {n for n, p in tuner.params.items() if not torch.equal(p, before[n])}
    blocks = {n for n in before if n.startswith("backbone.vit.blocks.")}
    assert blocks and blocks <= moved  # every block tensor, as pm (SA's quirk: only one)
    assert {"classifier.weight", "head.scale"} <= moved
    assert tuner.optimizer.param_groups[1]["lr"] == pytest.approx(0.05 * 1e-3 / config.lr)
    model = train(config, episodes, tmp_path / "run")
    stored = torch.load(model, weights_only=True)
    assert stored["method"] == "styleadv" and "backbone_state" in stored
    assert not any(k.startswith("classifier") for k in stored["head"])
    backbone, _ = load_trained(model)
    method = load_method("styleadv", model, Hyper(), CPU)
    assert isinstance(method, FrozenMethod)
    torch.testing.assert_close(method.backbone.vit.state_dict(), backbone.vit.state_dict())


def test_global_labels_index_every_stores_split_classes(tmp_path):
    stores = [DomainStore(split_domain(tmp_path / f"d{i}.h5", {"train": 5 + i, "test": 3},
                                       seed=i)) for i in range(2)]
    dataset = GlobalClassEpisodes(stores, "train", FixedSampler(3, 1, 1), train_transform(32),
                                  seed=0, length=20)
    assert dataset.num_classes == 11
    for i in range(20):
        source, episode = dataset.episode(i)
        *_, classes = dataset[i]
        train_ids = stores[source].classes_in_split("train")
        expected = np.searchsorted(train_ids, episode.classes) + 5 * source
        assert classes.tolist() == expected.tolist()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_mixed_precision_step_trains_float32_parameters(monkeypatch, tiny_file, device):
    """The CUDA path (bfloat16 autocast): on the CPU with the autocast patched in, as
    test_train does, and on a GPU where there is one."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if device == "cpu":
        monkeypatch.setattr(devices, "autocast", lambda where, enabled=True: torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=enabled))
    torch.manual_seed(0)
    where = torch.device(device)
    config = train_config(tiny_file, method="styleadv", styleadv_skip=0.0)
    tuner = StyleAdvTuner(config, where, CLASSES)
    metrics = tuner.step(GlobalEpisodes(1)[0], 0, 0.05)
    assert np.isfinite(metrics.loss) and metrics.kl is not None
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
               for p in tuner.params.values())


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_file):
    """The checkpoint holds the global classifier and its optimiser group, and the episode's
    draws (epsilons, skips) depend on the episode index only."""
    config = train_config(tiny_file, method="styleadv", episodes_per_epoch=2, epochs=2)
    whole = train(config, GlobalEpisodes(4), tmp_path / "whole")
    with pytest.raises(Killed):  # after the checkpoint at 2 episodes
        train(config, GlobalEpisodes(4, kill_at=3), tmp_path / "killed")
    resumed = train(config, GlobalEpisodes(4), tmp_path / "killed")
    a, b = (torch.load(p, weights_only=True) for p in (whole, resumed))
    assert all(torch.equal(a["backbone_state"][k], b["backbone_state"][k])
               for k in a["backbone_state"])
    assert torch.equal(a["head"]["scale"], b["head"]["scale"])
