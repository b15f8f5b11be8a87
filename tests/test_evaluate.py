"""Adversarial evaluation: the attacks through adapted models, the job end to end, its CLI."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from builders import make_episodes, make_pool, model_file, template_domain

from amt.attacks import pgd
from amt.checkpoints import sha256
from amt.conditions import CLEAN, Condition, build_conditions, robust_correct, torchattack
from amt.evaluate import evaluate, register
from amt.methods import load_method
from amt.rows import load_results, load_spectra
from amt.sanity import sanity_checks
from amt.selections import SELECTION_FORMAT
from amt.specs import (
    AttackSpec,
    CorruptionSpec,
    EvalConfig,
    Hyper,
    SanitySpec,
    build,
    parse_attacks,
)


def parse_corruptions(value: dict) -> CorruptionSpec:
    return build(CorruptionSpec, value, "corruptions")


def parse_sanity(value: dict) -> SanitySpec:
    return build(SanitySpec, value, "sanity")

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
ATTACKS = [{"attack": "pgd", "norm": "linf", "eps": ["1/255", "8/255"], "steps": 3,
            "restarts": 2},
           {"attack": "pgd", "norm": "l2", "eps": [0.5], "steps": 3}]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eval")
    torch.set_num_threads(1)
    pool = make_pool(folder, members=3)
    store = template_domain(folder / "domain.h5")
    selection = folder / "selection.json"
    selection.write_text(json.dumps({
        "format": SELECTION_FORMAT, "selected": ["beta", "gamma", "top_k", "str_layers",
                                                 "str_ratio"],
        "hyperparameters": {"str_layers": "fc1", "str_ratio": 0.5},
        "model": str(pool), "model_sha256": sha256(pool)}))
    return {"pool": pool, "store": store, "selection": selection,
            "pm": model_file(folder, folder / "tiny_backbone.pth", "pm", method="pm"),
            "episodes": make_episodes(store, folder / "test.json", count=3, ways=5)}


def _config(files: dict[str, Path], out: Path, **overrides) -> EvalConfig:
    base = dict(method="amt", model=files["pool"], store=files["store"],
                episodes=files["episodes"], benchmark="builtin", domain="stripes",
                in_domain=False, setting_name="5w1s", out=out, selection=files["selection"],
                attacks=parse_attacks(ATTACKS),
                corruptions=parse_corruptions({"names": ["gaussian_noise"], "severities": [3]}),
                sanity=parse_sanity({"episodes": 1, "large_eps": "64/255"}), device="cpu")
    return EvalConfig(**{**base, **overrides})


def test_evaluate_writes_valid_rows_deterministically(files, tmp_path):
    frames = [evaluate(_config(files, tmp_path / f"run{i}" / "amt.csv")) for i in range(2)]
    texts = [(tmp_path / f"run{i}" / "amt.csv").read_text() for i in range(2)]
    assert texts[0] == texts[1]
    rows = load_results([tmp_path / "run0" / "amt.csv"])
    conditions = {("none", "none", 0.0), ("pgd", "linf", 1 / 255), ("pgd", "linf", 8 / 255),
                  ("pgd", "l2", 0.5), ("noise", "linf", 1 / 255), ("noise", "linf", 8 / 255),
                  ("gaussian_noise", "corruption", 3.0)}
    assert set(rows[["attack", "norm", "eps"]].itertuples(index=False, name=None)) == conditions
    assert len(rows) == 3 * len(conditions) and rows.config_hash.nunique() == 1
    assert set(rows.backbone) == {"tiny_vit"} and not rows.in_domain.any()
    mean = frames[0].groupby(["attack", "eps"]).accuracy.mean()
    assert mean[("pgd", 8 / 255)] < mean[("none", 0.0)]
    sanity = json.loads((tmp_path / "run0" / "amt.sanity.json").read_text())
    names = [c["check"] for c in sanity["checks"]]
    assert any("non-increasing" in n for n in names) and any("noise" in n for n in names)
    assert any("3 vs 6 steps" in n for n in names) and any("reaches ~0" in n for n in names)
    assert sanity["config_hash"] == rows.config_hash.iloc[0]
    spectra = load_spectra([tmp_path / "run0" / "amt.spectra.csv"])
    assert set(spectra.method) == {"amt"} and spectra.layer.nunique() == 2 * 4


def test_config_hash_follows_the_numbers_not_the_labels(files, tmp_path):
    one = evaluate(_config(files, tmp_path / "a.csv", attacks=(), sanity=parse_sanity({})))
    relabelled = evaluate(_config(files, tmp_path / "b.csv", attacks=(), domain="other",
                                  sanity=parse_sanity({})))
    reseeded = evaluate(_config(files, tmp_path / "c.csv", attacks=(), seed=1,
                                sanity=parse_sanity({})))
    assert one.config_hash[0] == relabelled.config_hash[0] != reseeded.config_hash[0]


def test_pgd_through_the_adapted_model_respects_the_budget_and_hurts(files):
    method = load_method("amt", files["pool"], Hyper(str_layers="fc1", str_ratio=0.5), CPU)
    g = torch.Generator().manual_seed(0)
    ys, yq = torch.arange(5), torch.arange(5).repeat_interleave(3)
    colours = torch.linspace(0.1, 0.9, 5).view(-1, 1, 1, 1)
    xs = (colours + 0.05 * torch.randn(5, 3, 32, 32, generator=g)).clamp(0, 1)
    xq = (colours[yq] + 0.05 * torch.randn(15, 3, 32, 32, generator=g)).clamp(0, 1)
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        correct = adapted.clean_logits.argmax(-1) == yq
        assert correct.float().mean() >= 0.8
        for norm, eps in (("linf", 8 / 255), ("l2", 1.0)):
            adv = pgd(lambda x: F.cross_entropy(adapted.classifier(x), yq, reduction="none"), xq,
                      eps, eps / 4, 10, norm)
            delta = (adv - xq).flatten(1)
            size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
            assert float(size.max()) <= eps + 1e-5 and adv.min() >= 0 and adv.max() <= 1
            spec = AttackSpec("pgd", norm, (eps,), steps=10, restarts=2)
            survived = robust_correct(adapted.classifier, xq, yq, spec, eps, correct, 0, 1)
            assert not (survived & ~correct).any()  # robust implies clean-correct
            assert survived.float().mean() < correct.float().mean()
            once = robust_correct(adapted.classifier, xq, yq, replace(spec, restarts=1), eps,
                                  correct, 0, 1)  # the same first restart
            assert not (survived & ~once).any()  # robust only if it survives every restart


def test_apgd_attacks_through_torchattacks(files):
    pytest.importorskip("torchattacks")
    method = load_method("amt", files["pool"], Hyper(), CPU)
    ys, yq = torch.arange(5), torch.arange(5).repeat_interleave(2)
    xs = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    xq = (xs[yq] + 0.02).clamp(0, 1)
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        correct = adapted.clean_logits.argmax(-1) == yq
        for attack in ("apgd_ce", "apgd_t"):
            spec = AttackSpec(attack, "linf", (16 / 255,), steps=5)
            survived = robust_correct(adapted.classifier, xq, yq, spec, 16 / 255, correct, 0, 2)
            assert survived.sum() < correct.sum()
        apgd_t = torchattack(adapted.classifier, AttackSpec("apgd_t", "linf", (0.1,)), 0.1, 0, 5)
        assert apgd_t.n_target_classes == 4
        with pytest.raises(ValueError, match="3-way episode"):
            torchattack(adapted.classifier, AttackSpec("apgd_t", "linf", (0.1,)), 0.1, 0, 3)


def _alone(torchattacks, classifier, eps: float, seed: int) -> dict:
    """AutoAttack's four attacks built by hand, as the original's standard version lists them
    (5-way: 4 target classes), 4 iterations, 60 Square queries."""
    targeted = dict(eps=eps, seed=seed, n_classes=5)
    return {"apgd_ce": torchattacks.APGD(classifier, eps=eps, seed=seed, loss="ce", steps=4),
            "apgd_t": torchattacks.APGDT(classifier, steps=4, **targeted),
            "fab_t": torchattacks.FAB(classifier, multi_targeted=True, steps=4, **targeted),
            "square": torchattacks.Square(classifier, eps=eps, seed=seed, n_queries=60)}


def test_autoattack_is_at_most_each_of_its_attacks_on_every_episode(files):
    """autoattack's accuracy on an episode is at most that of APGD-CE, APGD-T, FAB-T and Square
    run alone with its seed and settings; it attacks with the configured steps and queries."""
    torchattacks = pytest.importorskip("torchattacks")
    from amt.conditions import WorstCase
    from amt.episodes import episode_rng

    method = load_method("amt", files["pool"], Hyper(), CPU)
    spec = AttackSpec("autoattack", "linf", (1 / 255,), steps=4, queries=60)
    ys, yq = torch.arange(5), torch.arange(5).repeat_interleave(3)
    found = []
    for episode in range(3):
        g = torch.Generator().manual_seed(episode)
        xs = torch.rand(5, 3, 32, 32, generator=g)
        xq = (xs[yq] + 0.15 * torch.randn(len(yq), 3, 32, 32, generator=g)).clamp(0, 1)
        with method.adapt(xs, ys, episode, queries=xq) as adapted:
            correct = adapted.clean_logits.argmax(-1) == yq
            survived = robust_correct(adapted.classifier, xq, yq, spec, spec.eps[0], correct,
                                      0, episode)
            seed = int(episode_rng(0, episode).integers(2**31))
            alone = {}
            for name, attack in _alone(torchattacks, adapted.classifier, spec.eps[0],
                                       seed).items():
                adversarial = attack(xq[correct], yq[correct])
                kept = adapted.classifier(adversarial).argmax(-1) == yq[correct]
                alone[name] = kept.sum().item()
            found.append((survived.sum().item(), alone, correct.sum().item()))
            built = torchattack(adapted.classifier, spec, spec.eps[0], seed, 5)
    for robust, alone, _ in found:  # queries kept, of 15
        assert robust <= min(alone.values()), (robust, alone)
    assert any(0 < robust < clean for robust, _, clean in found)
    assert isinstance(built, WorstCase)
    assert [type(a).__name__ for a in built.attacks] == ["APGD", "APGDT", "FAB", "Square"]
    assert [getattr(a, "steps", None) for a in built.attacks] == [4, 4, 4, None]
    assert built.attacks[3].n_queries == 60 and built.attacks[2].multi_targeted
    assert built.attacks[1].n_target_classes == built.attacks[2].n_target_classes == 4
    with pytest.raises(ValueError, match="autoattack: a 3-way episode"):
        torchattack(adapted.classifier, spec, 0.1, 0, 3)
    with pytest.raises(ValueError, match="queries=60: expected left out"):
        AttackSpec("apgd_ce", "linf", (0.1,), queries=60)


@pytest.mark.parametrize("name", ["amt", "amt_logit_avg", "pm"])
def test_torchattacks_leave_every_module_in_eval_mode(files, name):
    """torchattacks calls train() on the model it attacked when that model's own flag said
    training; the adapted classifiers are made in eval mode, so the shared backbone (and every
    module in it) is still in eval mode after an APGD call, and the next episode's clean
    logits are unchanged."""
    pytest.importorskip("torchattacks")
    model = files["pm"] if name == "pm" else files["pool"]
    method = load_method(name, model, Hyper(), CPU)
    ys, yq = torch.arange(5), torch.arange(5).repeat_interleave(2)
    xs = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    xq = (xs[yq] + 0.02).clamp(0, 1)
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        assert not adapted.classifier.training
        correct = adapted.clean_logits.argmax(-1) == yq
        spec = AttackSpec("apgd_ce", "linf", (8 / 255,), steps=3)
        robust_correct(adapted.classifier, xq, yq, spec, 8 / 255, correct, 0, 0)
        training = [n for n, m in adapted.classifier.named_modules() if m.training]
        assert training == []
    assert not any(m.training for m in method.backbone.modules())


def test_apgd_reseeds_torchs_global_generator_which_none_of_our_draws_use(files):
    """torchattacks' APGD calls torch.manual_seed(seed) on every call (torchattacks 3.5.1
    attacks/apgd.py:327-328). Every later draw of ours comes from generators fixed by (seed,
    episode, condition): the noise and corruption conditions give the same accuracy whatever
    the global generator's state."""
    pytest.importorskip("torchattacks")
    from amt.conditions import condition_verdicts

    method = load_method("amt", files["pool"], Hyper(), CPU)
    ys, yq = torch.arange(5), torch.arange(5).repeat_interleave(2)
    xs = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    xq = (xs[yq] + 0.02).clamp(0, 1)
    with method.adapt(xs, ys, 0, queries=xq) as adapted:
        correct = adapted.clean_logits.argmax(-1) == yq
        attack = torchattack(adapted.classifier, AttackSpec("apgd_ce", "linf", (0.1,), steps=2),
                             0.1, 1234, 5)
        after = []
        for state in (0, 99):  # the global state after a call does not depend on the one before
            torch.manual_seed(state)
            attack(xq[:2], yq[:2])
            after.append(torch.random.get_rng_state())
        assert torch.equal(*after)
        conditions = build_conditions(parse_attacks([{"attack": "pgd", "norm": "linf",
                                                      "eps": ["8/255"]}]),
                                      parse_corruptions({"names": ["gaussian_noise"],
                                                         "severities": [5]}))[2:]
        for condition in conditions:  # noise, then the corruption
            seen = set()
            for state in (0, 99):
                torch.manual_seed(state)
                seen.add(condition_verdicts(adapted.classifier, xq, yq, condition, correct, 0,
                                            3).float().mean().item())
            assert len(seen) == 1, condition


def test_missing_torchattacks_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(RuntimeError, match=r"--no-deps torchattacks==3\.5\.1"):
        torchattack(torch.nn.Identity(), AttackSpec("apgd_ce", "linf", (0.1,)), 0.1, 0, 5)


@pytest.mark.parametrize(("value", "message"), [
    ([{"attack": "pgd", "norm": "linf", "eps": ["2/255"]}, {"attack": "fgsm", "norm": "linf",
                                                            "eps": [0.1]}],
     r"--attacks\[1\]: attack='fgsm': expected one of \['pgd'"),
    ([{"attack": "pgd", "norm": "linf", "eps": ["2/0"]}], r"--attacks\[0\]: eps: budget '2/0'"),
    ([{"attack": "pgd", "norm": "linf", "eps": [-1]}], r"budget -1: expected a value in \(0, 1\]"),
    ([{"attack": "pgd", "norm": "linf", "eps": [0.1], "step": 3}], r"unknown keys \['step'\]"),
    ({"attack": "pgd"}, "expected a list of attack objects"),
])
def test_attack_specs_are_checked(value, message):
    with pytest.raises(ValueError, match=message):
        parse_attacks(value)


def test_conditions_are_distinct_and_noise_follows_linf_budgets():
    specs = parse_attacks([{"attack": "pgd", "norm": "linf", "eps": ["2/255"]},
                           {"attack": "apgd_ce", "norm": "linf", "eps": ["2/255", "4/255"]}])
    found = build_conditions(specs, parse_corruptions({"names": ["contrast"],
                                                       "severities": [1, 5]}))
    keys = [(c.attack, c.norm, c.eps) for c in found]
    assert keys[0] == ("none", "none", 0.0)
    assert ("noise", "linf", 2 / 255) in keys and ("noise", "linf", 4 / 255) in keys
    assert ("contrast", "corruption", 5.0) in keys and len(keys) == 1 + 3 + 2 + 2
    with pytest.raises(ValueError, match="more than once"):
        build_conditions(specs + specs[:1], parse_corruptions({"names": [], "severities": []}))
    with pytest.raises(ValueError, match="expected corruptions among"):
        parse_corruptions({"names": ["fog"], "severities": [1]})


def test_sanity_checks_flag_what_they_should():
    def rows(attack, norm, eps, accuracy):
        return {"episode": 0, "attack": attack, "norm": norm, "eps": eps, "accuracy": accuracy}

    frame = pd.DataFrame([rows("none", "none", 0.0, 0.9), rows("pgd", "linf", 0.01, 0.3),
                          rows("pgd", "linf", 0.02, 0.4), rows("noise", "linf", 0.01, 0.5),
                          rows("noise", "linf", 0.02, 0.9)])
    spec = AttackSpec("pgd", "linf", (0.01, 0.02), steps=3)
    conditions = [Condition("pgd", "linf", 0.01, spec), Condition("pgd", "linf", 0.02, spec)]
    extras = [{"kind": "steps", "key": conditions[0].key, "episode": 0, "accuracy": 0.5},
              {"kind": "large_eps", "eps": 0.25, "episode": 0, "accuracy": 0.0}]
    checks = {c["check"]: c["ok"] for c in sanity_checks(frame, extras, conditions,
                                                        parse_sanity({"large_eps": 0.25}))}
    assert checks == {"pgd linf: accuracy non-increasing in eps": False,
                      "uniform noise at l_inf 0.01 hurts far less than the attack": False,
                      "uniform noise at l_inf 0.02 hurts far less than the attack": True,
                      f"3 vs 6 steps {conditions[0].key}": False,
                      "l_inf PGD at eps 0.25 reaches ~0": True}


def test_the_headline_attack_is_compared_with_the_worst_case_at_its_budget():
    """Per query: a query survives the worst case only if it survives every attack at that
    budget; the headline (the first attack's first budget) may be 1 point above it, no more."""
    from amt.sanity import worst_case_runs

    pgd = AttackSpec("pgd", "linf", (0.01, 0.02))
    conditions = [CLEAN, Condition("pgd", "linf", 0.01, pgd), Condition("pgd", "linf", 0.02, pgd),
                  Condition("apgd_t", "linf", 0.01, AttackSpec("apgd_t", "linf", (0.01,))),
                  Condition("noise", "linf", 0.01)]
    verdicts = {conditions[1]: torch.tensor([True, True, False, True]),
                conditions[2]: torch.tensor([True, False, False, False]),
                conditions[3]: torch.tensor([False, True, False, True]),
                conditions[4]: torch.tensor([True, True, True, True])}
    extras = worst_case_runs(verdicts, 0)
    assert extras == [{"kind": "worst", "norm": "linf", "eps": 0.01, "episode": 0,
                       "attacks": ["pgd", "apgd_t"], "accuracy": 0.5}]
    frame = pd.DataFrame([{"episode": 0, "attack": c.attack, "norm": c.norm, "eps": c.eps,
                           "accuracy": v.float().mean().item()} for c, v in verdicts.items()]
                         + [{"episode": 0, "attack": "none", "norm": "none", "eps": 0.0,
                             "accuracy": 1.0}])
    check = sanity_checks(frame, extras, conditions, SanitySpec())[-1]
    assert check["check"] == ("headline pgd linf eps 0.01 within 1 point of the worst case over "
                              "pgd+apgd_t")
    assert (check["accuracy"], check["strongest_accuracy"], check["ok"]) == (0.75, 0.5, False)
    frame.loc[frame.attack == "pgd", "accuracy"] = 0.505
    assert sanity_checks(frame, extras, conditions, SanitySpec())[-1]["ok"]
    alone = sanity_checks(frame, [], conditions, SanitySpec())  # no second attack at 0.01
    assert not any(c["check"].startswith("headline") for c in alone)


def test_evaluate_command_for_a_frozen_model(files, tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    common = ["--model", str(files["pm"]), "--store", str(files["store"]), "--episodes",
              str(files["episodes"]), "--benchmark", "builtin", "--domain", "stripes",
              "--in-domain", "--setting-name", "5w1s", "--device", "cpu"]
    args = parser.parse_args(["evaluate", "--method", "pm", *common, "--corruptions",
                              '{"names": ["contrast"], "severities": [2]}', "--out",
                              str(tmp_path / "pm.csv")])
    assert args.func(args) == 0
    rows = load_results([tmp_path / "pm.csv"])
    assert len(rows) == 3 * 2 and rows.in_domain.all() and set(rows.method) == {"pm"}
    assert not (tmp_path / "pm.spectra.csv").exists()
    args = parser.parse_args(["evaluate", "--method", "pmf", *common, "--out",
                              str(tmp_path / "pmf.csv")])
    with pytest.raises(ValueError, match=r"pmf uses \['lr'\].*amt select"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--method", "pm", *common, "--attacks", "[{]",
                           "--out", "x.csv"])
