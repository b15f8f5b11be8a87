"""Pixel-space attacks: PGD (l_inf, l_2) on any per-example loss, and AMT's KL query attack.

Images live in [0, 1]; the model normalises inside, so the eps ball and the [0, 1] box are both
in pixel units. Gradients are taken with ``torch.autograd.grad`` with respect to the input only:
nothing accumulates in the parameters' ``.grad`` and no weight gradient is computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from amt.registry import KL_DIRECTIONS, NORMS

LossFn = Callable[[Tensor], Tensor]  # images [n, ...] -> per-example loss [n]


def pgd(loss_fn: LossFn, x: Tensor, eps: float, alpha: float, steps: int, norm: str = "linf",
        random_start: bool = True, restarts: int = 1,
        generator: torch.Generator | None = None) -> Tensor:
    """Maximise ``loss_fn`` within the ``norm`` ball of radius ``eps`` around ``x`` and the
    [0, 1] box. Each restart starts at x (or a random point of the ball with ``random_start``)
    and takes ``steps`` steps of size ``alpha`` (signed gradient for linf, normalised gradient
    for l2). With several restarts, each example keeps its highest-loss result."""
    _check_attack(x, eps, alpha, steps, norm, restarts)
    x = x.detach()
    best, best_loss = x, None
    for _ in range(restarts):
        delta = _start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
        for _ in range(steps):
            delta = _project(x, _ascend(loss_fn, x, delta, alpha, norm), eps, norm)
        adv = (x + delta).detach()
        if restarts == 1:
            return adv
        with torch.no_grad():
            loss = loss_fn(adv).detach()
        if best_loss is None:
            best, best_loss = adv, loss
        else:
            better = loss > best_loss
            best = torch.where(_expand(better, x), adv, best)
            best_loss = torch.maximum(loss, best_loss)
    return best


def pgd_until_fooled(logits_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: float,
                     alpha: float, steps: int, norm: str = "linf", random_start: bool = True,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Cross-entropy PGD for evaluation, with AutoAttack's bookkeeping: an example counts as
    fooled as soon as one iterate (the start included) is misclassified, and is attacked no
    further. At least as strong as PGD judged at its last iterate, and cheaper: the batch
    shrinks as examples fall, and the forward pass that gives a step's gradient also judges
    the iterate. Returns (adversarial images: the fooling iterate or the last one, fooled)."""
    _check_attack(x, eps, alpha, steps, norm, 1)
    x, adv = x.detach(), x.detach().clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    alive = torch.arange(len(x), device=x.device)  # indices of the examples still attacked
    x_alive, y_alive = x, y
    delta = _start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    for step in range(steps + 1):
        last = step == steps
        with torch.set_grad_enabled(not last):
            delta.requires_grad_(not last)
            iterate = x_alive + delta
            logits = logits_fn(iterate)
        wrong = logits.argmax(-1) != y_alive
        adv[alive] = iterate.detach()
        fooled[alive[wrong]] = True
        keep = ~wrong
        if last or not keep.any():
            break
        loss = F.cross_entropy(logits[keep].float(), y_alive[keep], reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        alive, x_alive, y_alive = alive[keep], x_alive[keep], y_alive[keep]
        delta = _project(x_alive, _step(delta.detach()[keep], grad[keep], alpha, norm), eps,
                         norm)
    return adv, fooled


def _check_attack(x: Tensor, eps: float, alpha: float, steps: int, norm: str,
                  restarts: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"attack norm {norm!r}: expected one of {NORMS}")
    if eps < 0 or alpha <= 0 or steps < 0 or restarts < 1:
        raise ValueError(f"attack eps={eps}, alpha={alpha}, steps={steps}, restarts={restarts}: "
                         "expected eps >= 0, alpha > 0, steps >= 0, restarts >= 1")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        raise ValueError(f"attack input spans [{low:.3g}, {high:.3g}]: expected [0, 1] pixels "
                         "(normalisation belongs inside the model)")


def _expand(per_example: Tensor, like: Tensor) -> Tensor:
    return per_example.view(-1, *([1] * (like.ndim - 1)))


def _l2(t: Tensor) -> Tensor:
    return _expand(t.flatten(1).norm(dim=1), t)


def _start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = (2 * noise - 1) * eps
    else:  # a random direction at a uniform fraction of the radius (torchattacks' PGDL2)
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = torch.rand((len(x),) + (1,) * (x.ndim - 1), generator=generator,
                            device=x.device, dtype=x.dtype)
        delta = direction / _l2(direction).clamp_min(1e-12) * radius * eps
    return (x + delta).clamp(0, 1) - x


def _ascend(loss_fn: LossFn, x: Tensor, delta: Tensor, alpha: float, norm: str) -> Tensor:
    delta = delta.detach().requires_grad_(True)
    loss = loss_fn(x + delta)
    (grad,) = torch.autograd.grad(loss.float().sum(), delta)
    return _step(delta.detach(), grad, alpha, norm)


def _step(delta: Tensor, grad: Tensor, alpha: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta + alpha * grad.sign()
    return delta + alpha * grad / _l2(grad).clamp_min(1e-12)


def _project(x: Tensor, delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x  # the box only shrinks delta, so it stays in the ball


def kl_divergence(adv_logits: Tensor, clean_logits: Tensor, direction: str) -> Tensor:
    """Per-example KL between the softmaxes: 'clean_adv' is KL(p_clean || p_adv) (TRADES, and
    the AMT release's ``F.kl_div(log_softmax(adv), softmax(clean))``: adsv.py:71-72, 122-123,
    engine.py:81-82), 'adv_clean' KL(p_adv || p_clean). Training's mean over queries equals the
    release's batchmean (the sum over queries and classes over the number of queries)."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"KL direction {direction!r}: expected one of {KL_DIRECTIONS}")
    log_adv, log_clean = F.log_softmax(adv_logits, -1), F.log_softmax(clean_logits, -1)
    first, second = (log_adv, log_clean) if direction == "adv_clean" else (log_clean, log_adv)
    return (first.exp() * (first - second)).sum(-1)


def kl_query_attack(model_fn: Callable[[Tensor], Tensor], xq: Tensor, eps: float, alpha: float,
                    steps: int, direction: str, random_start: bool = True,
                    generator: torch.Generator | None = None) -> Tensor:
    """APQ: l_inf PGD on the queries maximising the KL (``direction``, see ``kl_divergence``)
    between the softmaxes of the attacked and the clean query logits (clean logits detached).
    ``model_fn`` maps queries to logits against prototypes computed once per episode, outside.

    At the clean queries the KL is at its minimum and its gradient is zero up to rounding, so
    from a zero start the first signed step follows rounding noise; ``random_start`` (uniform
    in the ball) does not depend on it.
    """
    with torch.no_grad():
        clean = model_fn(xq).float()
    return pgd(lambda x: kl_divergence(model_fn(x).float(), clean, direction), xq, eps, alpha,
               steps, "linf", random_start, 1, generator)
