import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amt import attacks
from amt.attacks import kl_divergence, kl_query_attack, pgd, pgd_until_fooled
from amt.backbones import build_backbone
from amt.protonet import ProtoHead, prototypes

EPS = 8 / 255


@pytest.fixture
def problem():
    """A linear classifier and images, some of them at the edges of [0, 1]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.rand(16, 3, 8, 8)
    x[:4] = x[:4].round()  # pixels at exactly 0 and 1: the box must hold there
    y = torch.randint(0, 5, (16,))
    return model, x, y


def _ce(model, y):
    return lambda images: F.cross_entropy(model(images), y, reduction="none")


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_stays_in_ball_and_box_and_raises_loss(problem, norm, random_start):
    model, x, y = problem
    eps = EPS if norm == "linf" else 0.5
    adv = pgd(_ce(model, y), x, eps, eps / 4, 10, norm, random_start,
              generator=torch.Generator().manual_seed(1))
    delta = adv - x
    size = delta.abs().flatten(1).amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert size.max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    loss = _ce(model, y)
    assert (loss(adv) > loss(x)).all()
    assert (size > 0.5 * eps).all()  # it moved, not just stayed at x


def test_pgd_beats_random_noise_of_the_same_size(problem):
    model, x, y = problem
    loss = _ce(model, y)
    adv = pgd(loss, x, EPS, EPS / 4, 10)
    noise = (x + EPS * torch.randn_like(x).sign()).clamp(0, 1)
    assert loss(adv).mean() > loss(noise).mean() + 0.01


def test_pgd_is_deterministic_given_a_generator_and_leaves_no_param_grads(problem):
    model, x, y = problem
    runs = [pgd(_ce(model, y), x, EPS, EPS / 4, 3, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(*runs)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_until_fooled_stays_in_ball_and_box_and_its_verdicts_hold(problem, norm):
    model, x, _ = problem
    with torch.no_grad():
        y = model(x).argmax(-1)  # every query correct before the attack
    eps = 2 / 255 if norm == "linf" else 0.1
    adv, fooled = pgd_until_fooled(model, x, y, eps, eps / 4, 10, norm,
                                   generator=torch.Generator().manual_seed(1))
    delta = adv - x
    size = delta.abs().flatten(1).amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert size.max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        wrong = model(adv).argmax(-1) != y
    assert torch.equal(fooled, wrong)  # every verdict is backed by the image returned
    assert 0 < fooled.sum() < len(y)  # a real test: some fall, some stand


def test_pgd_until_fooled_is_at_least_as_strong_as_last_iterate_pgd(problem):
    model, x, y = problem
    for seed in range(5):
        adv = pgd(_ce(model, y), x, EPS, EPS / 4, 10,
                  generator=torch.Generator().manual_seed(seed))
        _, fooled = pgd_until_fooled(model, x, y, EPS, EPS / 4, 10,
                                     generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            plain = model(adv).argmax(-1) != y
        assert not (plain & ~fooled).any()  # same start, same steps until a query falls


def test_pgd_until_fooled_stops_attacking_fallen_queries(problem):
    model, x, y = problem
    seen = []

    def counting(images):
        seen.append(len(images))
        return model(images)

    _, fooled = pgd_until_fooled(counting, x, y, 0.5, 0.1, 10)
    assert fooled.all() and seen[0] == len(x) and len(seen) < 11 and seen == sorted(seen)[::-1]


def test_restarts_keep_each_examples_best(problem):
    model, x, y = problem
    loss = _ce(model, y)
    # the first restart draws what a single run draws from the same generator
    single = pgd(loss, x, EPS, EPS / 8, 1, generator=torch.Generator().manual_seed(3))
    several = pgd(loss, x, EPS, EPS / 8, 1, restarts=4, generator=torch.Generator().manual_seed(3))
    assert (loss(several) >= loss(single)).all()
    assert (loss(several) > loss(single)).any()


def test_bad_inputs_are_refused(problem):
    model, x, y = problem
    with pytest.raises(ValueError, match="expected \\[0, 1\\] pixels"):
        pgd(_ce(model, y), (x - 0.5) / 0.25, EPS, EPS / 4, 1)
    with pytest.raises(ValueError, match="norm 'l1'"):
        pgd(_ce(model, y), x, EPS, EPS / 4, 1, norm="l1")
    with pytest.raises(ValueError, match="alpha=0"):
        pgd(_ce(model, y), x, EPS, 0, 1)


def test_kl_directions():
    p, q = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    log_p, log_q = F.log_softmax(p, -1), F.log_softmax(q, -1)
    forward = (log_p.exp() * (log_p - log_q)).sum()
    assert torch.isclose(kl_divergence(p, q, "adv_clean")[0], forward)
    assert torch.isclose(kl_divergence(p, q, "clean_adv")[0],
                         F.kl_div(log_p, log_q.exp(), reduction="sum"))  # the release's call
    assert kl_divergence(p, p, "clean_adv").item() == 0
    with pytest.raises(ValueError, match="KL direction 'both'"):
        kl_divergence(p, q, "both")


def test_mean_kl_over_queries_is_the_releases_batchmean():
    adv, clean = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)), torch.randn(7, 5)
    release = F.kl_div(F.log_softmax(adv, -1), F.softmax(clean, -1), reduction="batchmean")
    summed = torch.nn.KLDivLoss(reduction="sum")(F.log_softmax(adv, -1), F.softmax(clean, -1))
    assert torch.isclose(kl_divergence(adv, clean, "clean_adv").mean(), release)
    assert torch.isclose(kl_divergence(adv, clean, "clean_adv").mean(), summed / len(adv))


@pytest.mark.parametrize("direction", ["clean_adv", "adv_clean"])
def test_kl_query_attack_maximises_the_kl_of_its_direction(direction, monkeypatch):
    torch.manual_seed(0)
    backbone, head = build_backbone("tiny_vit", None, 32), ProtoHead()
    xs, ys, xq = torch.rand(4, 3, 32, 32), torch.tensor([0, 0, 1, 1]), torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        protos = prototypes(backbone(xs), ys, 2)
        clean = head(backbone(xq), protos)

    def logits(x):
        return head(backbone(x), protos)

    def release_kl(x):  # the release's F.kl_div(log_softmax(adv), softmax(clean)) per query
        log_adv = F.log_softmax(logits(x), -1)
        return F.kl_div(log_adv, F.softmax(clean, -1), reduction="none").sum(-1)

    def reverse_kl(x):
        log_adv, log_clean = F.log_softmax(logits(x), -1), F.log_softmax(clean, -1)
        return (log_adv.exp() * (log_adv - log_clean)).sum(-1)

    # The objective APQ hands to PGD, compared as values: the attacked images themselves would
    # be compared bit for bit, and the two directions' gradient signs differ in about 1e-4 of
    # the pixels, as much as one CPU's rounding differs from another's (AVX-512 vs AVX2).
    objectives = []

    def spy(loss, x, *args, **kwargs):
        objectives.append(loss)
        return x

    monkeypatch.setattr(attacks, "pgd", spy)
    assert torch.equal(kl_query_attack(logits, xq, EPS, EPS / 4, 3, direction), xq)
    x = (xq + EPS * torch.randn_like(xq).sign()).clamp(0, 1)
    with torch.no_grad():
        got = objectives[0](x)
        values = {"clean_adv": release_kl(x), "adv_clean": reverse_kl(x)}
    for name, value in values.items():
        close = torch.allclose(got, value, rtol=1e-4, atol=1e-7)
        assert close == (name == direction), name


def test_kl_query_attack_raises_kl_within_budget():
    torch.manual_seed(0)
    backbone, head = build_backbone("tiny_vit", None, 32), ProtoHead()
    xs, ys, xq = torch.rand(4, 3, 32, 32), torch.tensor([0, 0, 1, 1]), torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        protos = prototypes(backbone(xs), ys, 2)
    calls = []

    def logits(x):
        calls.append(len(x))
        return head(backbone(x), protos)

    adv = kl_query_attack(logits, xq, EPS, EPS / 4, 3, "clean_adv",
                          generator=torch.Generator().manual_seed(0))
    assert (adv - xq).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert kl_divergence(logits(adv), logits(xq), "clean_adv").mean() > 1e-4
        noisy = (xq + EPS * torch.randn_like(xq).sign()).clamp(0, 1)
        assert kl_divergence(logits(adv), logits(xq), "clean_adv").mean() > \
            kl_divergence(logits(noisy), logits(xq), "clean_adv").mean()
    assert calls[:4] == [6] * 4  # clean logits once, then one pass per step; support never
    assert all(p.grad is None for p in [*backbone.parameters(), *head.parameters()])
