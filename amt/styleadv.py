"""StyleAdv (Fu, Xie, Fu, Jiang, CVPR 2023): meta style adversarial training, its ViT version.

SA = the official code, lovelyqian/StyleAdv-CDFSL @ d74ba1ce (methods/StyleAdv_ViT_protonet.py
unless named). The backbone's blocks form 4 groups (SA methods/ViT.py:213-243); after each of
the first 3 (``blocklist = 'block123'``, line 134) the patch tokens' style, their mean and std
per sample and channel, is attacked and re-applied AdaIN-style; the CLS token is left as it is
(lines 9-22). Per episode:

1. The attack (lines 134-274, 304-310): for group k = 1, 2, 3 in turn, with the groups before
   it already restyled adversarially, (mu_k, sigma_k) of the patch tokens become leaves of the
   graph (x -> (x - mu) / sigma * sigma_k + mu_k, an identity); one forward and backward of the
   global classifier's cross-entropy (all support and query images, their global labels) gives
   their gradients, and one signed step of size eps_k, drawn per group from
   ``styleadv_epsilons`` (engine_StyleAdv_ViT.py:53, lines 177-181), makes the adversarial
   style: mu_k + eps_k sign(grad mu_k), sigma_k + eps_k sign(grad sigma_k). The input pixels
   are never perturbed (line 304).
2. The loss (lines 313-353; engine_StyleAdv_ViT.py:58-68): a clean pass gives the ProtoNet
   loss L_fsl and the global classifier's L_cls; an adversarial pass restyles each group with
   its adversarial style unless skipped (probability ``styleadv_skip``, per group, lines 29-31,
   338-342) and gives L_fsl_adv; L = L_fsl + L_fsl_adv + KL(p_clean || p_adv) (mean over
   queries; 0 when every group was skipped) + L_cls.

Deliberate differences from SA (docs: /work/notes/doc_baselines.md): statistics per embedding
channel over the patch tokens (SA's ``view(B, dim, 14, 14)`` of a [B, 196, dim] tensor
reinterprets memory, mixing tokens and channels: line 14); no constant +16/255 shift of the
statistics before the step (SA's ``uniform_(START_EPS, START_EPS)``, tool_func.py:25); every
backbone tensor and the ProtoNet scale train (SA's dict comprehension keeps only the last
backbone tensor, metatrain_StyleAdv_ViT.py:120); the patch grid is the model's, not 14 x 14.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amt.attacks import kl_divergence
from amt.backbones import Backbone
from amt.episode_data import SampledEpisodeDataset, load_episode
from amt.protonet import prototypes
from amt.specs import TrainConfig
from amt.train import MetaTuner, StepMetrics, _accuracy, check_episode, episode_seed

GROUPS = 4  # the blocks' groups; the style after each but the last is attacked (SA ViT.py)
STD_EPS = 1e-5  # sqrt(var + 1e-5) (SA methods/tool_func.py:13-21)
_STREAM = 3  # the episode's draws of epsilons and skips, apart from other streams

Style = tuple[Tensor, Tensor]  # (mean, std), each [n, D]
Restyle = Callable[[Tensor], Tensor]  # patch tokens [n, L, D] -> restyled


def group_ends(backbone: Backbone) -> list[int]:
    """Indices of the blocks after which the style is attacked: the last block of each group
    but the last, of 4 equal groups (of fewer, one block each, in a backbone of under 4)."""
    depth = len(backbone.vit.blocks)
    groups = min(GROUPS, depth)
    if groups < 2:
        raise ValueError(f"StyleAdv attacks the style between block groups: the backbone has "
                         f"{depth} block")
    unit = depth // groups
    return [unit * (k + 1) - 1 for k in range(groups - 1)]


def style_of(patches: Tensor) -> Style:
    """Mean and std (unbiased variance + 1e-5, as SA) over the tokens, per sample and channel."""
    return patches.mean(1), (patches.var(1) + STD_EPS).sqrt()


def adain(patches: Tensor, style: Style) -> Tensor:
    """The patch tokens normalised by their own style and given ``style`` (SA lines 24-42)."""
    mean, std = style_of(patches)
    return (patches - mean[:, None]) / std[:, None] * style[1][:, None] + style[0][:, None]


def fgsm_style(style: Style, grads: Style, eps: float) -> Style:
    """One signed ascent step on the statistics (SA tool_func.py:28): within eps of the clean
    ones in every coordinate."""
    return tuple(s.detach() + eps * g.sign() for s, g in zip(style, grads, strict=True))


@contextmanager
def restyled(backbone: Backbone, restyles: dict[int, Restyle]) -> Iterator[None]:
    """Within: block i's output patch tokens go through ``restyles[i]`` (prefix tokens kept)."""
    prefix = backbone.vit.num_prefix_tokens

    def hook(fn: Restyle):
        def apply(module: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
            patches = fn(out[:, prefix:].float()).to(out.dtype)
            return torch.cat([out[:, :prefix], patches], dim=1)
        return apply

    handles = [backbone.vit.blocks[i].register_forward_hook(hook(fn))
               for i, fn in restyles.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class GlobalClassEpisodes(SampledEpisodeDataset):
    """Meta-training episodes with their classes' global labels: item i -> (xs, ys, xq, yq,
    classes), classes[k] the index of label k's class among every store's ``split`` classes
    (store after store), the labels of StyleAdv's global classifier."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lookup, offset = [], 0
        for store in self.stores:
            classes = store.classes_in_split(self.split)
            table = np.full(store.num_classes, -1, dtype=np.int64)
            table[classes] = offset + np.arange(len(classes))
            self.lookup.append(table)
            offset += len(classes)
        self.num_classes = offset

    def __getitem__(self, index: int):
        source, episode = self.episode(index)
        parts = load_episode(self.stores[source], episode, self.transform, self.seed, index)
        return (*parts, torch.from_numpy(self.lookup[source][episode.classes]))


class StyleAdvTuner(MetaTuner):
    """The whole backbone (as pm), the ProtoNet head and a global linear classifier over the
    meta-training classes, trained with StyleAdv's loss; the classifier is not written to
    model.pt (SA's fine-tuning drops it: finetune_StyleAdv_ViT.py:38-73)."""

    def __init__(self, config: TrainConfig, device: torch.device, num_classes: int) -> None:
        self.num_classes = num_classes
        super().__init__(config, device)

    def _trainable(self) -> dict[str, nn.Parameter]:
        self.classifier = nn.Linear(self.backbone.embed_dim, self.num_classes).to(self.device)
        return super()._trainable() | {f"classifier.{n}": p
                                       for n, p in self.classifier.named_parameters()}

    def _optimizer(self) -> torch.optim.Optimizer:
        """SA's two groups: the classifier at its own base lr, scaled with the schedule."""
        cfg = self.config
        scale = cfg.styleadv_classifier_lr / cfg.lr if cfg.lr else 0.0
        own = [p for n, p in self.params.items() if not n.startswith("classifier.")]
        groups = [{"params": own, "scale": 1.0},
                  {"params": list(self.classifier.parameters()), "scale": scale}]
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    def step(self, episode: Sequence[Tensor], index: int, lr: float) -> StepMetrics:
        *parts, classes = episode
        n_way = check_episode(tuple(parts), index, self.config.image_size)
        xs, ys, xq, yq = (t.to(self.device, non_blocking=True) for t in parts)
        labels = classes.to(self.device)[torch.cat([ys, yq])]
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        rng = np.random.default_rng([episode_seed(self.config.seed, index), _STREAM])
        images = torch.cat([xs, xq])
        styles = self.attack_styles(images, labels, rng)
        loss, metrics = self.styleadv_loss(images, ys, yq, labels, n_way, styles, rng)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return metrics

    def global_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.classifier(embeddings.float()), labels)

    def attack_styles(self, images: Tensor, labels: Tensor, rng: np.random.Generator
                      ) -> list[Style | None]:
        """The adversarial style of each attacked group (None: its drawn eps is 0), each group
        attacked with the groups before it restyled adversarially; modules in eval (SA line
        307), no parameter gradient kept."""
        eps_list = self.config.styleadv_epsilons
        ends, styles = group_ends(self.backbone), []
        self.backbone.eval()
        try:
            for k, end in enumerate(ends):
                eps = eps_list[int(rng.integers(len(eps_list)))]
                if eps == 0:
                    styles.append(None)
                    continue
                styles.append(self.attack_group(images, labels, ends[:k], styles, end, eps))
        finally:
            self.backbone.train()
        return styles

    def attack_group(self, images: Tensor, labels: Tensor, before: list[int],
                     styles: list[Style | None], end: int, eps: float) -> Style:
        leaves: list[Tensor] = []

        def expose(patches: Tensor) -> Tensor:
            mean, std = style_of(patches)
            leaves.extend(s.detach().requires_grad_(True) for s in (mean, std))
            return (patches - mean.detach()[:, None]) / std.detach()[:, None] * \
                leaves[1][:, None] + leaves[0][:, None]

        restyles = self._restyles(before, styles, [True] * len(before))
        with restyled(self.backbone, {**restyles, end: expose}), self.autocast():
            loss = self.global_loss(self.backbone(images), labels)
        grads = torch.autograd.grad(loss, leaves)
        return fgsm_style((leaves[0], leaves[1]), (grads[0], grads[1]), eps)

    @staticmethod
    def _restyles(ends: list[int], styles: list[Style | None], keep: list[bool]
                  ) -> dict[int, Restyle]:
        return {end: (lambda p, s=style: adain(p, s))
                for end, style, kept in zip(ends, styles, keep, strict=True)
                if style is not None and kept}

    def styleadv_loss(self, images: Tensor, ys: Tensor, yq: Tensor, labels: Tensor,
                      n_way: int, styles: list[Style | None], rng: np.random.Generator
                      ) -> tuple[Tensor, StepMetrics]:
        n = len(ys)
        keep = [bool(rng.uniform() >= self.config.styleadv_skip) for _ in styles]
        restyles = self._restyles(group_ends(self.backbone), styles, keep)
        with self.autocast():
            clean = self.backbone(images)
        logits = self.head(clean[n:], prototypes(clean[:n].float(), ys, n_way))
        l_fsl, l_cls = F.cross_entropy(logits, yq), self.global_loss(clean, labels)
        if restyles:
            with restyled(self.backbone, restyles), self.autocast():
                adv = self.backbone(images)
            adv_logits = self.head(adv[n:], prototypes(adv[:n].float(), ys, n_way))
            kl = kl_divergence(adv_logits, logits, "clean_adv").mean()
        else:  # every group skipped: the adversarial pass is the clean one (SA: KL set to 0)
            adv_logits, kl = logits, logits.new_zeros(())
        l_adv = F.cross_entropy(adv_logits, yq)
        loss = l_fsl + l_adv + kl + l_cls
        return loss, StepMetrics(loss.item(), l_fsl.item(), _accuracy(logits, yq), kl.item(),
                                 _accuracy(adv_logits, yq))
