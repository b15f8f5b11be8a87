"""The CUDA path, run on CUDA: what test_train and test_methods check on the CPU with a
bfloat16 autocast fixture, here with the real thing (amt.devices.autocast on a GPU), and the
device choice. Skipped without a GPU; bench/gpu_check.sh runs it where there is one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from builders import Episodes, colour_episode, train_config

from amt import devices
from amt.attacks import pgd
from amt.errors import UserError
from amt.methods import FineTuned, load_method
from amt.registry import METHODS
from amt.specs import Hyper
from amt.train import MetaTuner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _step(tuner: MetaTuner, lr: float):
    return tuner.step(Episodes(1)[0], 0, lr)


@pytest.mark.parametrize("method", ["pm", "lora", "amt"])
def test_bfloat16_step_trains_float32_parameters_on_cuda(method):
    """amt here is APQ (PGD on the queries) and APSV, as TrainConfig's defaults have it."""
    torch.manual_seed(0)
    mixed = MetaTuner(train_config(None, method=method), CUDA)
    reference = MetaTuner(train_config(None, method=method, amp=False), CUDA)
    reference.load_trainable_state({n: p.detach().clone() for n, p in mixed.params.items()},
                                   Path("-"))
    before = {n: p.detach().clone() for n, p in mixed.params.items()}
    got, expected = _step(mixed, 0.05), _step(reference, 0.05)
    assert all(p.device.type == "cuda" for p in mixed.params.values())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in mixed.params.values())
    # the tolerance of test_train's CPU run of the same contexts: bfloat16's 8-bit mantissa
    assert math.isfinite(got.loss) and got.loss == pytest.approx(expected.loss, rel=0.15)
    assert all(torch.isfinite(p.grad).all() for p in mixed.params.values())
    learning = set(mixed.params) - {"head.bias"}  # its gradient is rounding noise (test_train)
    assert all(mixed.params[n].grad.abs().sum() > 0 for n in learning)
    assert all(not torch.equal(mixed.params[n], before[n]) for n in learning)


@pytest.mark.parametrize("name", ["pm", "pmf", "lora", "amt", "amt_ft", "amt_logit_avg",
                                  "pmf_adv", "amt_ft_adv", "attnscale", "attnscale_amt_ft"])
def test_bfloat16_methods_adapt_and_are_attacked_on_cuda(pool_dir, name):
    """Every test-time family (amt with STr on every layer) adapts, classifies and is attacked
    on CUDA; logits stay float32 and agree with the float32 run on the same GPU."""
    files = {"pm": "pm.pt", "lora": "member0.pt"}
    model = pool_dir / files.get(METHODS[name].trained, "pool.pt")
    hyper = Hyper(lr=1e-2, ft_steps=2, str_layers="all", str_ratio=0.5)
    xs, ys, xq, yq = (t.to(CUDA) for t in colour_episode())
    plain = load_method(name, model, hyper, CUDA, amp=False, seed=0)
    with plain.adapt(xs, ys, 0, queries=xq) as adapted:
        expected = adapted.clean_logits
    method = load_method(name, model, hyper, CUDA, amp=True, seed=0)
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        logits = adapted.clean_logits
        assert logits.device.type == "cuda" and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        if not isinstance(method, FineTuned):  # SGD feeds rounding back (test_methods)
            torch.testing.assert_close(logits, expected, atol=0.25, rtol=0.05)
        adv = pgd(lambda x: F.cross_entropy(adapted.classifier(x), yq, reduction="none"), xq,
                  8 / 255, 2 / 255, steps=3)
        assert adv.device.type == "cuda"
        assert float((adv - xq).abs().max()) <= 8 / 255 + 1e-6
        assert 0 <= float(adv.min()) <= float(adv.max()) <= 1
        assert adapted.classifier(adv).dtype == torch.float32


def test_bfloat16_autocast_is_on_for_cuda_only():
    with devices.autocast(CUDA):
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16
        assert (torch.ones(2, 2, device=CUDA) @ torch.ones(2, 2, device=CUDA)).dtype == \
            torch.bfloat16
    with devices.autocast(CUDA, enabled=False):
        assert (torch.ones(2, 2, device=CUDA) @ torch.ones(2, 2, device=CUDA)).dtype == \
            torch.float32


def test_device_choice_on_a_gpu_machine(monkeypatch):
    count = torch.cuda.device_count()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.pick_device("auto").type == "cuda"
    assert devices.pick_device("cuda").type == "cuda"
    assert devices.pick_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
    with pytest.raises(UserError, match=rf"'cuda:{count}': expected cuda:N with N in \[0, "):
        devices.pick_device(f"cuda:{count}")
    with pytest.raises(UserError, match="'cuda:x'"):
        devices.pick_device("cuda:x")
    assert devices.pick_device("cpu") == torch.device("cpu")


def test_device_choice_among_several_gpus(monkeypatch):
    """Without CUDA_VISIBLE_DEVICES the GPU with the most free memory; with it, the first
    visible one (a scheduler chose). Three GPUs are simulated on however many there are."""
    free = {0: 2 * 2**30, 1: 9 * 2**30, 2: 5 * 2**30}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 80 * 2**30))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.pick_device("auto") == torch.device("cuda:1")
    assert devices.pick_device("cuda") == torch.device("cuda:1")
    assert devices.pick_device("cuda:2") == torch.device("cuda:2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0,1")
    assert devices.pick_device("auto") == torch.device("cuda:0")
    assert devices.pick_device("cuda") == torch.device("cuda:0")
