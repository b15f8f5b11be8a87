"""Test-time methods: adapt to one episode's clean support, then classify its queries.

What each method is lives in the registry (``amt.registry.METHODS``): the trained artefact it
reads and, for the pool family, how the members combine. This module builds them. A method turns
an episode's support (``xs`` [n, 3, S, S] in [0, 1], labels ``ys`` 0..N-1) into an ``Adapted``
classifier whose prototypes are computed once, from the clean support, when it adapts; an attack
on the queries reuses them and never recomputes them (threat model: ``amt.evaluate``).
``method.adapt(xs, ys, index, queries)`` is a context manager: the model is in the episode's
state (merged, trimmed, fine-tuned) inside it and restored when it exits.

- kind 'frozen' (pm, lora, amt_single): the frozen meta-tuned backbone (lora, amt_single: its
  one adapter merged once, nothing merged per episode) and its ProtoNet head. Frozen, so a
  clean embedding depends on the image only: ``EmbeddingCache`` computes each image's
  embedding once for all episodes (attacked queries are recomputed).
- ``finetune`` (pmf, amt_ft): PMF's test-time fine-tuning of the whole backbone on top: Adam,
  ``ft_steps`` steps at ``lr``, each on one DiffAugment copy of the support with prototypes from
  the clean support (both in one forward, gradients through both, as PMF); the weights are
  restored in place afterwards. ``ft_params`` 'attnscale' (attnscale, attnscale_amt_ft):
  only ATTNSCALE's vectors train, a scaling of each attention matrix's rows and eTT's
  domain-residual offsets, applied by hooks (``AttentionScaling``). ``ft_adversarial``
  (pmf_adv, amt_ft_adv, Adv. TTF): each step's copy is first attacked by l_inf PGD on the
  fine-tuning loss within ``hyper.ft_eps``; the support itself stays clean.
- kind 'pool' with combine 'ttm' (amt): test-time merging (docs/method.md): one DiffAugment
  copy Z of the support; for each member p alone (W = W_res + B_p A_p) prototypes from the clean
  support and cosine similarities of Z's embeddings to them; intra_p (a class's Z to its own
  prototype) and inter_p (to the other prototypes), each averaged within a class and then over
  classes; score_p = gamma intra_p - (1 - gamma) inter_p; w_p = exp(beta (score_p - 1)) over the
  top k scores, normalised; W = W_res + sum_p w_p B_p A_p in every adapted layer; STr
  (``amt.trim``, exact or the release's randomised solver: ``hyper.str_solver``) replaces W by
  a rank-floor(rho min(out, in)) approximation in the selected layers (the fused qkv counts as
  one layer). The scoring runs in float32 unless ``hyper.score_precision`` is 'amp'. The
  ProtoNet head is the w-weighted average of the chosen members' heads (scale and bias): each
  member learned its own scale, and the merged model mixes them as it mixes their adapters.
- combine 'uniform': every member with weight 1/P, no scoring; combine 'logits': each member
  alone with its own prototypes and head, the logits averaged (no merged model, no STr);
  combine 'linear' (amt_linear): the same members' logits weighted by a linear classifier
  fitted per episode on the augmented support (``PoolMethod.linear_weights``).

Cost. Each member's merged weights W_res + B_p A_p are computed once per pool, not per episode,
and stacked per layer: switching members is a pointer swap, and scoring runs the members side by
side, P copies of [support; Z] in one grouped forward (capped per device, ``SCORING_IMAGES``). The
episode's merge writes into one preallocated buffer per layer; nothing copies the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amt import devices
from amt.attacks import pgd
from amt.augment import augment_support
from amt.backbones import Backbone
from amt.checkpoints import MODEL_FORMAT, CheckpointError, load_tagged
from amt.devices import torch_generator
from amt.errors import UserError
from amt.lora import LoRALinear, lora_layers, merge, merged_weight
from amt.models import load_trained
from amt.pool import Pool, load_pool
from amt.protonet import ProtoHead, prototypes
from amt.registry import FULL_BACKBONE_TRAINERS, STR_LAYERS, TRAINED, MethodEntry, method_entry
from amt.rows import SPECTRA_COLUMNS
from amt.specs import Hyper
from amt.trim import trim


# -- classifiers ----------------------------------------------------------------------------------
class Classifier(nn.Module):
    """Queries [n, 3, S, S] in [0, 1] -> logits [n, N] against prototypes fixed at adaptation.
    Valid inside the ``adapt`` context that made it (the backbone is in the episode's state).

    Made in eval mode, as the backbone it wraps: torchattacks' wrappers call ``train()`` on the
    model they attack after each attack when its own flag says training, which would leave the
    shared backbone in train mode."""

    def __init__(self, backbone: Backbone, head: ProtoHead, protos: Tensor, amp: bool) -> None:
        super().__init__()
        self.backbone, self.head, self.amp = backbone, head, amp
        self.register_buffer("protos", protos.detach())
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        with devices.autocast(x.device, self.amp):
            return self.head(self.backbone(x), self.protos)


class LogitAverage(nn.Module):
    """Mean of the members' logits (or their sum weighted by ``weights`` [P]), each member
    alone with its own prototypes and head; in eval mode, as ``Classifier``."""

    def __init__(self, method: PoolMethod, protos: list[Tensor],
                 weights: Tensor | None = None) -> None:
        super().__init__()
        self.method, self.backbone = method, method.backbone
        self.protos = [p.detach() for p in protos]
        self.weights = None if weights is None else weights.detach()
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        logits = []
        for p, protos in enumerate(self.protos):
            self.method.use_member(p)  # a pointer swap, no in-place write: backward stays valid
            with devices.autocast(x.device, self.method.amp):
                logits.append(self.method.pool.heads[p](self.backbone(x), protos))
        return combine_logits(torch.stack(logits), self.weights)


def combine_logits(logits: Tensor, weights: Tensor | None) -> Tensor:
    """[P, n, N] members' logits -> [n, N]: their mean, or their sum weighted by ``weights``."""
    if weights is None:
        return logits.mean(0)
    return torch.tensordot(weights.to(logits.dtype), logits, dims=1)


@dataclass
class Adapted:
    """An episode's classifier and, when queries were given, their clean logits."""

    classifier: nn.Module
    clean_logits: Tensor | None


def _ways(ys: Tensor) -> int:
    return int(ys.max()) + 1


# -- methods --------------------------------------------------------------------------------------
class Method:
    """A backbone and how it adapts to an episode (``setup``); subclasses define ``setup``."""

    def __init__(self, backbone: Backbone, device: torch.device, amp: bool, seed: int,
                 backbone_name: str) -> None:
        self.backbone, self.device, self.amp, self.seed = backbone, device, amp, seed
        self.backbone_name = backbone_name  # the BACKBONES key, for result rows
        self.backbone.requires_grad_(False).eval()

    def setup(self, xs: Tensor, ys: Tensor, index: int, **options) -> AbstractContextManager:
        """Put the backbone in the episode's state; yields the ProtoNet head to use."""
        raise NotImplementedError

    def set_hyper(self, hyper: Hyper) -> None:
        """Use other hyperparameters from the next episode on (grid search)."""
        raise NotImplementedError

    @contextmanager
    def adapt(self, xs: Tensor, ys: Tensor, index: int, queries: Tensor | None = None,
              **options) -> Iterator[Adapted]:
        with self.setup(xs, ys, index, **options) as head:
            yield self.classify(head, xs, ys, queries)

    @torch.no_grad()
    def embed(self, x: Tensor, amp: bool | None = None) -> Tensor:
        """Embeddings in float32, computed under the job's amp (or ``amp`` when given)."""
        with devices.autocast(self.device, self.amp if amp is None else amp):
            return self.backbone(x).float()

    def classify(self, head: ProtoHead, xs: Tensor, ys: Tensor, queries: Tensor | None
                 ) -> Adapted:
        """Prototypes from the clean support and the clean query logits, in one forward."""
        embeddings = self.embed(xs if queries is None else torch.cat([xs, queries]))
        protos = prototypes(embeddings[:len(xs)], ys, _ways(ys))
        clean = None if queries is None else head(embeddings[len(xs):], protos)
        return Adapted(Classifier(self.backbone, head, protos, self.amp), clean)


class FrozenMethod(Method):
    """pm and lora: nothing adapts but the prototypes."""

    def __init__(self, backbone: Backbone, head: ProtoHead, device: torch.device, amp: bool,
                 seed: int, backbone_name: str) -> None:
        super().__init__(backbone, device, amp, seed, backbone_name)
        self.head = head.requires_grad_(False)

    def setup(self, xs: Tensor, ys: Tensor, index: int, **options) -> AbstractContextManager:
        return nullcontext(self.head)

    def set_hyper(self, hyper: Hyper) -> None:
        """pm and lora have no hyperparameters."""

    def cached_logits(self, ys: Tensor, support: Tensor, queries: Tensor, ways: int
                      ) -> tuple[Tensor, Tensor]:
        """Prototypes [E, ways, D] and clean query logits [E, q, ways] of E episodes of one
        shape from cached clean embeddings: labels ys [E, n], support [E, n, D], queries
        [E, q, D]. One batched call: per-episode calls would cost more than a small backbone's
        whole pass over the images."""
        protos = prototypes(support, ys, ways)
        return protos, self.head(queries, protos)

    def adapted(self, protos: Tensor, clean_logits: Tensor) -> Adapted:
        """One episode's ``Adapted`` from its rows of ``cached_logits``."""
        return Adapted(Classifier(self.backbone, self.head, protos, self.amp), clean_logits)


class EmbeddingCache:
    """Clean embeddings of a frozen backbone by store image index, each image embedded once
    however many episodes use it."""

    def __init__(self, ids: np.ndarray, embeddings: Tensor) -> None:
        if len(ids) != len(embeddings) or np.any(np.diff(ids) <= 0):
            raise ValueError("EmbeddingCache: expected sorted distinct ids, one per embedding")
        self.ids, self.embeddings = ids, embeddings

    @classmethod
    def build(cls, method: Method, batches: Iterable[tuple[np.ndarray, Tensor]]
              ) -> EmbeddingCache:
        """From batches of (store indices, [0, 1] images) covering each image once."""
        ids, parts = [], []
        for batch_ids, images in batches:
            ids.append(np.asarray(batch_ids))
            parts.append(method.embed(images.to(method.device, non_blocking=True)))
        ids_all = np.concatenate(ids)
        order = np.argsort(ids_all, kind="stable")
        order_t = torch.from_numpy(order).to(method.device)
        return cls(ids_all[order], torch.cat(parts)[order_t])

    def __call__(self, ids: np.ndarray) -> Tensor:
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        missing = np.asarray(ids)[self.ids[pos] != ids]
        if len(missing):
            raise KeyError(f"images {missing[:5].tolist()} are not in the embedding cache")
        return self.embeddings[torch.from_numpy(pos).to(self.embeddings.device)]


class FineTuned(Method):
    """Test-time fine-tuning on top of another method's setup (pmf: pm; amt_ft: amt): the whole
    backbone as PMF (``WholeBackbone``) or ATTNSCALE's scaling vectors (``AttentionScaling``);
    ``adversarial`` (Adv. TTF): each step's augmented support copy is first attacked by l_inf
    PGD on the fine-tuning loss (budget ``hyper.ft_eps``), the prototypes still from the clean
    support. The backbone leaves the episode as it entered it."""

    def __init__(self, base: Method, hyper: Hyper, params: str = "full",
                 adversarial: bool = False) -> None:
        super().__init__(base.backbone, base.device, base.amp, base.seed, base.backbone_name)
        self.base, self.hyper, self.adversarial = base, hyper, adversarial
        self.tuning = TUNINGS[params](self.backbone)

    def set_hyper(self, hyper: Hyper) -> None:
        self.hyper = hyper
        self.base.set_hyper(hyper)

    @contextmanager
    def setup(self, xs: Tensor, ys: Tensor, index: int, **options) -> Iterator[ProtoHead]:
        with self.base.setup(xs, ys, index, **options) as head:
            if self.hyper.lr == 0 or self.hyper.ft_steps == 0:
                yield head
                return
            with self.tuning() as tensors:
                self._finetune(tensors, head, xs, ys, index)
                yield head

    def _finetune(self, tensors: list[Tensor], head: ProtoHead, xs: Tensor, ys: Tensor,
                  index: int) -> None:
        for t in tensors:
            t.requires_grad_(True)
        optimizer = torch.optim.Adam(tensors, lr=self.hyper.lr, betas=(0.9, 0.999),
                                     weight_decay=0.0)
        generator = torch_generator(self.seed, index, "finetune")
        n, ways = len(xs), _ways(ys)
        for _ in range(self.hyper.ft_steps):
            z = augment_support(self.backbone, xs, generator)
            if self.adversarial:
                z = self.attack_copies(tensors, head, xs, ys, z, generator)
            with devices.autocast(self.device, self.amp):
                embeddings = self.backbone(torch.cat([xs, z])).float()
            protos = prototypes(embeddings[:n], ys, ways)
            loss = F.cross_entropy(head(embeddings[n:], protos), ys)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def attack_copies(self, tensors: list[Tensor], head: ProtoHead, xs: Tensor, ys: Tensor,
                      z: Tensor, generator: torch.Generator) -> Tensor:
        """Adv. TTF's inner step: l_inf PGD (``ft_attack_steps`` steps of eps/4, random start)
        maximising the fine-tuning's cross-entropy of the copies against the clean support's
        prototypes at the current weights. The copies are clamped to the [0, 1] box first: the
        threat model's images are pixels."""
        h = self.hyper
        for t in tensors:
            t.requires_grad_(False)
        try:
            protos = prototypes(self.embed(xs), ys, _ways(ys))

            def loss(x: Tensor) -> Tensor:
                with devices.autocast(self.device, self.amp):
                    return F.cross_entropy(head(self.backbone(x), protos), ys,
                                           reduction="none")

            start = torch.Generator(self.device).manual_seed(
                int(torch.randint(2**62, (1,), generator=generator)))
            return pgd(loss, z.clamp(0, 1), h.ft_eps, h.ft_eps / 4, h.ft_attack_steps,
                       generator=start)
        finally:
            for t in tensors:
                t.requires_grad_(True)


class WholeBackbone:
    """PMF's fine-tuned tensors (``tunable_tensors``), saved before and copied back after the
    episode, in place."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._saved: list[Tensor] | None = None

    @contextmanager
    def __call__(self) -> Iterator[list[Tensor]]:
        tensors = tunable_tensors(self.backbone)
        if self._saved is None:
            self._saved = [t.detach().clone() for t in tensors]
        else:  # the same tensors every episode: reuse the snapshot buffers
            for saved, t in zip(self._saved, tensors, strict=True):
                saved.copy_(t)
        try:
            yield tensors
        finally:
            with torch.no_grad():
                for saved, t in zip(self._saved, tensors, strict=True):
                    t.requires_grad_(False)
                    t.copy_(saved)


class AttentionScaling:
    """ATTNSCALE (Basu et al., AAAI 2024) as defined here: in every block a scaling vector per
    attention matrix, W_q, W_k, W_v (the fused qkv's row blocks) and W_o (attn.proj), scaling
    that matrix's output rows (W x + b -> s * (W x) + b, s from 1), and eTT's domain-residual
    adapter (DRA): an offset vector per block added to the attention branch's and to the MLP
    branch's outputs (from 0). Only these train; the backbone's own tensors are never written:
    forward hooks apply them inside the episode and are removed after it."""

    def __init__(self, backbone: Backbone) -> None:
        width = backbone.embed_dim
        widths = {"qkv": 3 * width, "proj": width, "attn": width, "mlp": width}
        modules = {"qkv": lambda b: b.attn.qkv, "proj": lambda b: b.attn.proj,
                   "attn": lambda b: b.attn, "mlp": lambda b: b.mlp}
        self.sites = [(site, modules[site](block)) for block in backbone.vit.blocks
                      for site in widths]
        self.vectors = [torch.zeros(widths[site], device=backbone.mean.device)
                        for site, _ in self.sites]

    @contextmanager
    def __call__(self) -> Iterator[list[Tensor]]:
        with torch.no_grad():
            for (site, _), v in zip(self.sites, self.vectors, strict=True):
                v.fill_(1.0 if site in ("qkv", "proj") else 0.0)
        handles = [module.register_forward_hook(self._hook(site, v))
                   for (site, module), v in zip(self.sites, self.vectors, strict=True)]
        try:
            yield self.vectors
        finally:
            for handle in handles:
                handle.remove()
            for v in self.vectors:
                v.requires_grad_(False)

    @staticmethod
    def _hook(site: str, vector: Tensor):
        def scale(module: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
            bias = 0 if module.bias is None else module.bias
            return (out - bias) * vector.to(out.dtype) + bias

        def offset(module: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
            return out + vector.to(out.dtype)

        return scale if site in ("qkv", "proj") else offset


TUNINGS = {"full": WholeBackbone, "attnscale": AttentionScaling}  # registry.FINETUNE_PARAMS


def tunable_tensors(backbone: Backbone) -> list[Tensor]:
    """The whole backbone as PMF fine-tunes it: every parameter, except that a LoRA layer
    contributes its merged weight and its bias instead of its (unused) adapters."""
    layers = lora_layers(backbone.vit).values()
    adapters = {id(p) for layer in layers for p in layer.parameters()}
    tensors = [p for p in backbone.vit.parameters() if id(p) not in adapters]
    for layer in layers:
        if not layer.merged:
            raise ValueError("fine-tuning a LoRA backbone needs its adapters merged first")
        tensors += [layer.weight] + ([] if layer.bias is None else [layer.bias])
    return tensors


@dataclass(frozen=True)
class Merge:
    """Which members an episode merges, with which weights."""

    members: tuple[int, ...]
    weights: tuple[float, ...]


# Images per grouped scoring forward (members x [support; Z]). On the CPU, batches beyond ~64
# small images run slower per image (the conv stem's activations leave the cache: 4 members x
# 50 images take 84 ms in one forward, 64 ms in four, 2 threads); a GPU wants large batches.
SCORING_IMAGES = {"cpu": 64, "cuda": 1024}


class PoolMethod(Method):
    """The amt family over a LoRA pool; the registry entry says how members combine."""

    def __init__(self, pool: Pool, name: str, hyper: Hyper, device: torch.device, amp: bool,
                 seed: int) -> None:
        super().__init__(pool.backbone, device, amp, seed, pool.info["backbone"])
        self.pool, self.name, self.entry, self.hyper = pool, name, method_entry(name), hyper
        self.layers = lora_layers(pool.backbone.vit)
        self.set_hyper(hyper)
        # W_res + B_p A_p once per pool, stacked per layer [P, out, in]: switching members is
        # then a pointer swap, and scoring runs every member in one grouped forward.
        merged = [self._merged(Merge((p,), (1.0,))) for p in range(len(pool))]
        self.stacked = {n: torch.stack([m[n] for m in merged]) for n in self.layers}
        del merged
        self.buffers = {n: torch.empty_like(layer.residual) for n, layer in self.layers.items()}

    def set_hyper(self, hyper: Hyper) -> None:
        """Change the hyperparameters (grid search) without rebuilding the member weights."""
        k = self.entry.top_k or hyper.top_k
        if self.entry.combine == "ttm" and k > len(self.pool):
            raise ValueError(f"{self.name}: top_k={k} but the pool has {len(self.pool)} members")
        self.hyper, self.trimmed = hyper, self._str_layers(hyper) if self.entry.trim else []

    def _str_layers(self, hyper: Hyper) -> list[LoRALinear]:
        if not hyper.trims:
            return []
        suffixes = STR_LAYERS[hyper.str_layers]
        chosen = [layer for n, layer in self.layers.items() if n.endswith(suffixes)]
        if not chosen:
            raise ValueError(f"STr layers {hyper.str_layers!r} ({suffixes}) match none of the "
                             f"pool's LoRA layers {list(self.layers)[:4]}...")
        return chosen

    def _merged(self, plan: Merge, out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        members = [self.pool.members[p] for p in plan.members]
        return {n: merged_weight(layer.residual,
                                 [[m.adapters[a] for a in layer.adapter_names] for m in members],
                                 plan.weights, out=None if out is None else out[n])
                for n, layer in self.layers.items()}

    def _use(self, weights: dict[str, Tensor] | None) -> None:
        for n, layer in self.layers.items():
            layer.weight = None if weights is None else weights[n]

    def use_member(self, p: int) -> None:
        self._use({n: w[p] for n, w in self.stacked.items()})

    def scores(self, xs: Tensor, ys: Tensor, index: int) -> Tensor:
        """[P, 2]: (intra_p, inter_p) of each member on one augmented copy of the support, its
        embeddings in float32 or under the job's amp (``hyper.score_precision``).

        The members run side by side: the batch holds one copy of [support; Z] per member and
        each LoRA layer applies member p's weight to copy p (``LoRALinear``'s grouped form), so
        P small forwards become one, up to ``SCORING_IMAGES`` images at a time (per device)."""
        z = augment_support(self.backbone, xs, torch_generator(self.seed, index, "ttm"))
        batch, n, ways = torch.cat([xs, z]), len(xs), _ways(ys)
        if ways < 2:
            raise ValueError("test-time merging needs at least 2 classes (inter-class score)")
        cap = SCORING_IMAGES.get(self.device.type, SCORING_IMAGES["cpu"])
        P, per_forward = len(self.pool), max(1, cap // len(batch))
        amp = self.amp and self.hyper.score_precision == "amp"
        parts = []
        try:
            for start in range(0, P, per_forward):
                group = range(start, min(start + per_forward, P))
                self._use({name: w[group.start:group.stop] for name, w in self.stacked.items()})
                parts.append(self.embed(batch.repeat(len(group), 1, 1, 1), amp))
        finally:
            self._use(None)
        embeddings = torch.cat(parts).view(P, len(batch), -1)
        protos = prototypes(embeddings[:, :n], ys.expand(P, n), ways)  # [P, ways, D]
        sims = F.normalize(embeddings[:, n:], dim=-1) @ F.normalize(protos, dim=-1).mT
        one_hot = F.one_hot(ys, ways).float()
        counts = one_hot.sum(0)
        own = (sims * one_hot).sum(-1)  # [P, n]: each Z's similarity to its own class
        other = (sims * (1 - one_hot)).sum(-1) / (ways - 1)
        return torch.stack([(own @ one_hot / counts).mean(-1),
                            (other @ one_hot / counts).mean(-1)], dim=-1)

    def plan(self, scores: Tensor | None) -> Merge:
        """The members and weights of this episode's merge (scores: from ``scores``)."""
        P = len(self.pool)
        if self.entry.combine != "ttm":
            return Merge(tuple(range(P)), (1.0 / P,) * P)
        h = self.hyper
        intra, inter = scores.double().cpu().numpy().T
        score = h.gamma * intra - (1 - h.gamma) * inter
        chosen = np.argsort(-score, kind="stable")[:self.entry.top_k or h.top_k]
        w = np.exp(h.beta * (score[chosen] - 1))
        return Merge(tuple(int(p) for p in chosen), tuple(float(v) for v in w / w.sum()))

    def head(self, plan: Merge) -> ProtoHead:
        """The weighted average of the chosen members' heads."""
        heads = [self.pool.heads[p] for p in plan.members]
        scale = sum(w * float(h.scale) for w, h in zip(plan.weights, heads, strict=True))
        bias = sum(w * float(h.bias) for w, h in zip(plan.weights, heads, strict=True))
        return ProtoHead(scale, bias).requires_grad_(False).to(self.device)

    @contextmanager
    def setup(self, xs: Tensor, ys: Tensor, index: int, plan: Merge | None = None
              ) -> Iterator[ProtoHead]:
        if self.entry.combine == "logits":
            raise ValueError(f"{self.name} averages logits: it has no merged model")
        if plan is None:
            plan = self.plan(self.scores(xs, ys, index) if self.entry.combine == "ttm" else None)
        self._use(self._merged(plan, out=self.buffers))
        try:
            if self.trimmed:
                trim([layer.weight for layer in self.trimmed], self.hyper.str_ratio,
                     self.hyper.str_solver, self.seed, index)
            yield self.head(plan)
        finally:
            self._use(None)

    @contextmanager
    def adapt(self, xs: Tensor, ys: Tensor, index: int, queries: Tensor | None = None,
              **options) -> Iterator[Adapted]:
        if self.entry.combine not in ("logits", "linear"):
            with super().adapt(xs, ys, index, queries, **options) as adapted:
                yield adapted
            return
        try:
            yield self._logit_average(xs, ys, index, queries)
        finally:
            self._use(None)

    def _logit_average(self, xs: Tensor, ys: Tensor, index: int, queries: Tensor | None
                       ) -> Adapted:
        protos, clean = [], []
        for p, head in enumerate(self.pool.heads):
            self.use_member(p)
            adapted = self.classify(head, xs, ys, queries)
            protos.append(adapted.classifier.protos)
            clean.append(adapted.clean_logits)
        weights = self.linear_weights(xs, ys, index, protos) \
            if self.entry.combine == "linear" else None
        logits = None if queries is None else combine_logits(torch.stack(clean), weights)
        return Adapted(LogitAverage(self, protos, weights), logits)

    def linear_weights(self, xs: Tensor, ys: Tensor, index: int, protos: list[Tensor]
                       ) -> Tensor:
        """amt_linear's classifier: weights w [P] of the members' logits, sum_p w_p l_p(x),
        fitted on ``hyper.linear_copies`` DiffAugment copies of the support (labelled as the
        support; no query is seen) by ``hyper.linear_steps`` full-batch Adam steps at
        ``hyper.linear_lr`` on their cross-entropy, from the uniform 1/P (the logit average).
        Each member's logits of the copies are computed once, against its own clean-support
        prototypes and head, so the fit costs P backbone passes over the copies."""
        h, P = self.hyper, len(self.pool)
        generator = torch_generator(self.seed, index, "linear")
        copies = torch.cat([augment_support(self.backbone, xs, generator)
                            for _ in range(h.linear_copies)])
        logits = []
        for p, head in enumerate(self.pool.heads):
            self.use_member(p)
            logits.append(head(self.embed(copies), protos[p]))
        self._use(None)
        stacked, labels = torch.stack(logits).float(), ys.repeat(h.linear_copies)
        weights = torch.full((P,), 1.0 / P, device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([weights], lr=h.linear_lr)
        with torch.enable_grad():
            for _ in range(h.linear_steps):
                loss = F.cross_entropy(combine_logits(stacked, weights), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return weights.detach()


# -- building a method from files -----------------------------------------------------------------
def load_method(name: str, model: Path, hyper: Hyper, device: torch.device, amp: bool = True,
                seed: int = 0, backbone_checkpoint: Path | None = None) -> Method:
    """``name`` (a registry method) over the file its entry reads: a pm or lora model file, or
    a pool file."""
    entry = method_entry(name)
    if entry.trained in FULL_BACKBONE_TRAINERS and backbone_checkpoint is not None:
        raise UserError(f"--backbone-checkpoint {backbone_checkpoint}: method {name} evaluates "
                        f"the full backbone stored in {model} and would ignore it; leave it out")
    method = _pool_method(entry, model, hyper, device, amp, seed, backbone_checkpoint) \
        if entry.pooled else _frozen_method(entry, model, device, amp, seed, backbone_checkpoint)
    return FineTuned(method, hyper, entry.ft_params, entry.ft_adversarial) if entry.finetune \
        else method


def _pool_method(entry: MethodEntry, model: Path, hyper: Hyper, device: torch.device, amp: bool,
                 seed: int, backbone_checkpoint: Path | None) -> PoolMethod:
    return PoolMethod(load_pool(model, device, backbone_checkpoint), entry.name, hyper, device,
                      amp, seed)


def _frozen_method(entry: MethodEntry, model: Path, device: torch.device, amp: bool, seed: int,
                   backbone_checkpoint: Path | None) -> FrozenMethod:
    stored = load_tagged(Path(model), MODEL_FORMAT)
    trainer = TRAINED[entry.trained].trainer  # amt_single: an amt model file
    wanted = ("lora", "amt") if trainer == "lora" else (trainer,)
    if stored.get("method") not in wanted:
        raise CheckpointError(f"{model}: a {stored.get('method')!r} model file; method "
                              f"{entry.name} needs a {' or '.join(wanted)} model file")
    backbone, head = load_trained(Path(model), backbone_checkpoint, device)
    if trainer not in FULL_BACKBONE_TRAINERS:
        merge(backbone.vit)  # the adapter merged once: a plain frozen backbone from here on
    return FrozenMethod(backbone, head, device, amp, seed, stored["backbone"])


# -- spectra --------------------------------------------------------------------------------------
def merged_spectra(method: Method, xs: Tensor, ys: Tensor, index: int, domain: str,
                   method_name: str, layers: Iterable[str] | None = None) -> pd.DataFrame:
    """Singular values of the episode's final LoRA-layer weights (merged, trimmed, fine-tuned as
    the method does) as SPECTRA_COLUMNS rows; ``layers``: name suffixes (None: every layer)."""
    suffixes = None if layers is None else tuple(layers)
    rows = []
    with method.setup(xs, ys, index):
        chosen = {n: layer for n, layer in lora_layers(method.backbone.vit).items()
                  if suffixes is None or n.endswith(suffixes)}
        if not chosen:
            raise ValueError(f"{method_name}: no merged LoRA layer matches {suffixes}")
        for name, layer in chosen.items():
            if not layer.merged:
                raise ValueError(f"{method_name}: layer {name} is not merged")
            values = torch.linalg.svdvals(layer.weight.detach().double()).cpu().numpy()
            rows += [(domain, method_name, name, i, float(v)) for i, v in enumerate(values)]
    return pd.DataFrame(rows, columns=list(SPECTRA_COLUMNS))

