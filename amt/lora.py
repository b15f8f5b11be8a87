"""AMT's LoRA: SVD-initialised low-rank adapters on a frozen residual, merged by name.

Each adapted ``nn.Linear`` (weight W, out x in) becomes a ``LoRALinear``. Its output rows are
split into blocks - three (q, k, v) for timm's fused ``qkv``, one otherwise - and block j gets
its own rank-r adapter from the top r singular triplets of its rows W_j = U S V^T:
A_j = diag(sqrt S_r) V_r^T, B_j = U_r diag(sqrt S_r), and the frozen base becomes the residual
W_res,j = W_j - B_j A_j, so at initialisation the network is unchanged. The top triplets are
computed in float64 on the CPU (whatever the training device), so every run on the same backbone
file gets the same residual: a pool of adapters trained separately shares one W_res. A backbone
whose weights already are residuals (the authors' released pool, ``amt.release``) is injected
with ``residual="stored"``: W_res = W as stored, and zero adapters. The usual LoRA
initialisation (``standard_init``: A Kaiming-uniform, B zero) also keeps W_res = W: a pool
trained from it is rebuilt with ``residual="stored"`` (``RESIDUAL_OF_INIT``).

Adapters are addressed by name (``blocks.3.attn.qkv.k``, ``blocks.3.mlp.fc1``). A ``LoRAState``
holds the adapter tensors only, saved apart from the backbone. ``merge`` writes
W_res + sum_p w_p B_p A_p into a weight buffer allocated once per layer (no copy of the model per
pool member); ``unmerge`` drops it, leaving the residual untouched, so the round trip is exact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amt.registry import LORA_TARGETS

FUSED_BLOCKS = {"qkv": ("q", "k", "v")}  # layer name -> output blocks with their own adapter
RESIDUALS = ("svd", "stored")  # W_res = W - (top-r of W), or W as stored
# TrainConfig.lora_init (registry.LORA_INITS) -> the residual its adapters were trained on
RESIDUAL_OF_INIT = {"svd": "svd", "standard": "stored"}

Adapter = tuple[Tensor, Tensor]  # (A [r, in], B [out_block, r])


def top_singular_triplets(w: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r, S_r, V_r) of a float64 matrix, largest first, from the eigendecomposition of its
    smaller Gram matrix: several times faster than a full SVD, and for the leading triplets
    accurate far beyond float32 (the error grows only as eps64 * s_1^2 / gap)."""
    tall = w.shape[0] >= w.shape[1]
    values, vectors = torch.linalg.eigh(w.T @ w if tall else w @ w.T)
    top = vectors[:, -rank:].flip(-1)
    s = values[-rank:].flip(0).clamp_min(0).sqrt()
    other = (w @ top if tall else w.T @ top) / s.clamp_min(torch.finfo(w.dtype).tiny)
    return (other, s, top) if tall else (top, s, other)


def svd_init(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(W_res, A, B): B A is the best rank-``rank`` approximation of ``weight`` and
    W_res = weight - B A, computed in float64 on the CPU, returned in the weight's dtype."""
    w = weight.detach().to("cpu", torch.float64)
    u, s, v = top_singular_triplets(w, rank)
    a, b = s.sqrt()[:, None] * v.T, u * s.sqrt()[None]
    return tuple(t.to(weight.device, weight.dtype) for t in (w - b @ a, a, b))


class LoRALinear(nn.Module):
    """A frozen linear layer on its SVD residual plus one trainable adapter per output block."""

    def __init__(self, base: nn.Linear, name: str, rank: int, blocks: Sequence[str],
                 residual: str = "svd") -> None:
        super().__init__()
        out_features, in_features = base.weight.shape
        rows = out_features // len(blocks)
        if rows * len(blocks) != out_features or not 1 <= rank <= min(rows, in_features):
            raise ValueError(f"{name}: cannot give {len(blocks)} output block(s) of its "
                             f"{out_features}x{in_features} weight a rank-{rank} adapter")
        weights = base.weight.detach().split(rows)
        parts = [svd_init(w, rank) for w in weights] if residual == "svd" else \
            [(w.clone(), w.new_zeros(rank, in_features), w.new_zeros(rows, rank)) for w in weights]
        self.rows = rows  # output rows per block
        self.adapter_names = tuple(name if len(blocks) == 1 else f"{name}.{b}" for b in blocks)
        self.register_buffer("residual", torch.cat([res for res, _, _ in parts]))
        bias = None if base.bias is None else base.bias.detach().clone()
        self.register_buffer("bias", bias)
        self.register_buffer("weight", None, persistent=False)  # the merged weight, when merged
        self.lora_A = nn.ParameterList([a for _, a, _ in parts])
        self.lora_B = nn.ParameterList([b for _, _, b in parts])

    @property
    def merged(self) -> bool:
        return self.weight is not None

    def adapters(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        return list(zip(self.lora_A, self.lora_B, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is not None and self.weight.ndim == 3:
            return self._grouped(x)
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        a = torch.stack(list(self.lora_A))  # [blocks, r, in]
        b = torch.stack(list(self.lora_B))  # [blocks, out_block, r]
        out = _LowRankLinear.apply(x.reshape(-1, x.shape[-1]), self.residual, self.bias, a, b)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _grouped(self, x: Tensor) -> Tensor:
        """Weights [G, out, in]: the batch (x's first dimension) is G equal consecutive groups
        and group g goes through weight g, in one batched matmul."""
        groups, weight = len(self.weight), self.weight.to(x.dtype)
        if x.shape[0] % groups:
            raise ValueError(f"a batch of {x.shape[0]} cannot be split into {groups} groups")
        flat = x.reshape(groups, -1, x.shape[-1])
        out = flat @ weight.mT if self.bias is None else \
            torch.baddbmm(self.bias.to(x.dtype).expand(groups, 1, -1), flat, weight.mT)
        return out.view(*x.shape[:-1], out.shape[-1])


class _LowRankLinear(torch.autograd.Function):
    """y = x (W_res + blockdiag(B_j A_j))^T + bias for 2-D x, with a hand-written backward.

    Autograd's own graph of the low-rank form costs a lora step 0.85-1.05x a full fine-tuning
    step on the CPU: it materialises full-size temporaries and runs the skinny products in
    orientations BLAS handles slowly. Here the forward merges the adapters into the weight first
    (out x r x in multiply-adds per block, far fewer than the skinny x A^T and low B^T it
    replaces) and runs one full matmul. The backward forms dL/dx with the merged weight and the
    adapter gradients per output block (a block-diagonal B would triple their work for qkv),
    every skinny product with the long token dimension as the streamed operand:
    (A x^T) and (B_j^T dY_j^T) are [r, tokens], dL/dA_j = (B_j^T dY_j^T) x and
    dL/dB_j = ((A_j x^T) dY_j)^T. On this CPU that orientation is 1.5-6x faster than the
    transposed ones (bench/README.md). No gradient for the bias; W_res gets dL/dW (= dY^T x)
    only when it requires grad (APSV's weight-space ascent); inputs that do not require grad get
    none (freeze the adapters while attacking inputs). Under autocast the
    matmuls run in the autocast dtype and the backward in the output's dtype.

    Shapes: x [tokens, in], residual [blocks * out_block, in], a [blocks, r, in],
    b [blocks, out_block, r].
    """

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, bias: Tensor | None, a: Tensor,
                b: Tensor) -> Tensor:
        blocks, rows, _ = b.shape
        weight = torch.baddbmm(residual.view(blocks, rows, -1), b.to(residual.dtype),
                               a.to(residual.dtype)).view(residual.shape)
        weight = weight.to(x.dtype)
        ctx.residual_dtype = residual.dtype
        ctx.save_for_backward(x, weight, a, b)
        return x @ weight.T if bias is None else torch.addmm(bias.to(x.dtype), x, weight.T)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        x, weight, a, b = (t.to(grad.dtype) for t in saved)
        need_x, need_w, _, need_a, need_b = ctx.needs_input_grad
        blocks, rows, rank = b.shape
        grad_x = grad @ weight if need_x else None
        grad_w = (grad.T @ x).to(ctx.residual_dtype) if need_w else None
        per_block = grad.view(len(grad), blocks, rows).permute(1, 2, 0)  # [blocks, rows, tokens]
        grad_a = grad_b = None
        if need_a:  # (B_j^T dY_j^T) x
            low = torch.bmm(b.mT, per_block).view(blocks * rank, -1)
            grad_a = (low @ x).view(a.shape)
        if need_b:  # ((A_j x^T) dY_j)^T
            projected = (a.reshape(blocks * rank, -1) @ x.T).view(blocks, rank, -1)
            grad_b = torch.bmm(projected, per_block.mT).mT
        return (_like(grad_x, saved[0]), grad_w, None, _like(grad_a, saved[2]),
                _like(grad_b, saved[3]))


def _like(grad: Tensor | None, tensor: Tensor) -> Tensor | None:
    return None if grad is None else grad.to(tensor.dtype)


@dataclass
class LoRAState:
    """Adapter tensors by name: name -> (A [r, in], B [out_block, r])."""

    adapters: dict[str, Adapter]

    @property
    def rank(self) -> int:
        return next(iter(self.adapters.values()))[0].shape[0]

    @property
    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.adapters.values())

    def to(self, device: torch.device | str) -> LoRAState:
        return LoRAState({n: (a.to(device), b.to(device)) for n, (a, b) in self.adapters.items()})

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat {name.A, name.B} tensors, for files loaded with weights_only=True."""
        flat = {}
        for name, (a, b) in self.adapters.items():
            flat[f"{name}.A"], flat[f"{name}.B"] = a, b
        return flat

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> LoRAState:
        names = sorted({k.rsplit(".", 1)[0] for k in tensors})
        broken = [n for n in names if set(tensors) & {f"{n}.A", f"{n}.B"} != {f"{n}.A", f"{n}.B"}]
        if not names or broken:
            raise ValueError(f"adapter tensors must come in name.A / name.B pairs; "
                             f"unpaired: {broken[:5] or 'no tensors'}")
        return cls({n: (tensors[f"{n}.A"], tensors[f"{n}.B"]) for n in names})


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_parameters(model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """The live adapter parameters by adapter name, in model order."""
    return {name: pair for layer in lora_layers(model).values()
            for name, pair in zip(layer.adapter_names, layer.adapters(), strict=True)}


def inject_lora(model: nn.Module, rank: int = 8, targets: Sequence[str] = LORA_TARGETS,
                residual: str = "svd") -> LoRAState:
    """Freeze ``model`` and replace each nn.Linear whose name is or ends with a target by a
    LoRALinear (its residual holds W_res: ``residual`` one of RESIDUALS). Returns the initial
    adapters (principal; zero for stored residuals)."""
    if residual not in RESIDUALS:
        raise ValueError(f"residual {residual!r}: expected one of {list(RESIDUALS)}")
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = set()
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith(f".{target}")]
        if not hits:
            raise ValueError(f"LoRA target {target!r} matches no nn.Linear in "
                             f"{type(model).__name__}; its linear layers include {linears[:6]}")
        chosen.update(hits)
    model.requires_grad_(False)
    with _one_thread():
        for name in (n for n in linears if n in chosen):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            blocks = FUSED_BLOCKS.get(child, ("",))
            setattr(parent, child,
                    LoRALinear(getattr(parent, child), name, rank, blocks, residual))
    return get_state(model)


def standard_init(model: nn.Module) -> None:
    """The usual LoRA initialisation in place (peft's, and the release's unused
    ``init_lora_weights="lora"``: AMT models/lora_adsv/layers.py:59-64, 79-80): every A
    Kaiming-uniform with a = sqrt(5), as nn.Linear's weights, every B zero, so B A = 0 and the
    network starts as the frozen W. For layers injected with ``residual="stored"`` (W_res = W);
    draws from torch's global generator."""
    with torch.no_grad():
        for a, b in adapter_parameters(model).values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b.zero_()


def adapter_delta(layer: LoRALinear) -> Tensor:
    """The layer's weight update from its own adapters, blockdiag(B_j A_j) stacked by output
    block: [out, in], in the residual's dtype."""
    return torch.cat([b.to(layer.residual.dtype) @ a.to(layer.residual.dtype)
                      for a, b in layer.adapters()])


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Small float64 eigendecompositions run several times faster on one thread than on a
    contended thread pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def get_state(model: nn.Module) -> LoRAState:
    return LoRAState({n: (a.detach().clone(), b.detach().clone())
                      for n, (a, b) in adapter_parameters(model).items()})


def load_state(model: nn.Module, state: LoRAState) -> None:
    """Copy ``state`` into the model's adapters; names and shapes must match exactly."""
    live = adapter_parameters(model)
    _check_names(live, state)
    with torch.no_grad():
        for name, (a, b) in live.items():
            new_a, new_b = state.adapters[name]
            if new_a.shape != a.shape or new_b.shape != b.shape:
                raise ValueError(f"adapter {name}: shapes {tuple(new_a.shape)}, "
                                 f"{tuple(new_b.shape)}; the model has {tuple(a.shape)}, "
                                 f"{tuple(b.shape)}")
            a.copy_(new_a)
            b.copy_(new_b)


def _check_names(live: Mapping[str, object], state: LoRAState) -> None:
    missing = [n for n in live if n not in state.adapters]
    unexpected = [n for n in state.adapters if n not in live]
    if missing or unexpected:
        raise ValueError(f"adapter names differ from the model's: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


@torch.no_grad()
def merged_weight(residual: Tensor, members: Sequence[Sequence[Adapter]],
                  weights: Sequence[float], out: Tensor | None = None) -> Tensor:
    """W_res + sum_p w_p B_p A_p for one layer; ``members[p]`` lists (A, B) per output block.

    Written into ``out`` when given (a buffer reused across episodes), else a new tensor.
    """
    if len(members) != len(weights):
        raise ValueError(f"{len(members)} adapters but {len(weights)} weights")
    out = residual.clone() if out is None else out.copy_(residual)
    for adapters, w in zip(members, weights, strict=True):
        rows = len(residual) // len(adapters)
        for block, (a, b) in zip(out.split(rows), adapters, strict=True):
            block.addmm_(b, a, alpha=float(w))
    return out


def merge(model: nn.Module, states: Sequence[LoRAState] | None = None,
          weights: Sequence[float] | None = None) -> None:
    """Merge adapters into every LoRA layer's weight: the model's own (weight 1) when ``states``
    is None, else W_res + sum_p weights[p] B_p A_p over the given states (on the model's device).
    Forward passes then use the merged weight until ``unmerge``."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge")
    live = adapter_parameters(model)
    for state in states or ():
        _check_names(live, state)
    if weights is None:
        weights = [1.0] * (1 if states is None else len(states))
    for layer in layers.values():
        members = ([layer.adapters()] if states is None else
                   [[s.adapters[n] for n in layer.adapter_names] for s in states])
        layer.weight = merged_weight(layer.residual, members, weights, out=layer.weight)


def unmerge(model: nn.Module) -> None:
    """Back to the residual + live adapters (the residual was never modified)."""
    for layer in lora_layers(model).values():
        layer.weight = None
