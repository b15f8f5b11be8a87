"""Cost and strength of each attack per episode on trained models (issue 15 item 2).

For one evaluation (method, model, store, stored episodes, selection), the first ``--episodes``
episodes are adapted once each, then every attack of ``--attacks`` (the config's JSON list) runs
on the adapted classifier: seconds per episode and robust accuracy of each condition, the
worst case per query over every attack at each budget (the headline check's comparison), and
for autoattack each of its four attacks timed alone on the same queries.

    python bench/bench_attacks.py --method amt --model pool.pt --store domain.h5 \\
        --episodes test_5w1s.json --selection amt.json --count 5 --attacks '[{"attack":
        "autoattack", "norm": "linf", "eps": ["4/255"], "steps": 20}]' [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from amt.conditions import build_conditions, condition_verdicts, torchattack
from amt.episodes import episode_rng
from amt.evaluate import Evaluation
from amt.specs import EvalConfig


def _time_parts(classifier, xq, yq, correct, condition, seed: int, index: int,
                parts: dict[str, list[float]]) -> None:
    """Each of autoattack's four attacks alone on the queries the clean model gets right (as
    ``robust_correct`` runs them): seconds and queries kept, summed into ``parts``."""
    seed = int(episode_rng(seed, index, condition.key).integers(2**31))
    ways = int(yq.max()) + 1
    for attack in torchattack(classifier, condition.spec, condition.eps, seed, ways).attacks:
        started = time.perf_counter()
        adversarial = attack(xq[correct], yq[correct])
        seconds = time.perf_counter() - started
        with torch.no_grad():
            kept = int((classifier(adversarial).argmax(-1) == yq[correct]).sum())
        totals = parts.setdefault(type(attack).__name__, [0.0, 0])
        totals[0] += seconds
        totals[1] += kept
        print(f"  {type(attack).__name__}: {seconds:.2f} s, {kept} robust", file=sys.stderr,
              flush=True)


def measure(config: EvalConfig, count: int) -> dict:
    """Seconds per episode and accuracy of every adversarial condition, and the worst cases."""
    job = Evaluation(config)
    conditions = [c for c in build_conditions(config.attacks, config.corruptions) if c.spec]
    seconds = {c.key: 0.0 for c in conditions}
    kept = {c.key: 0 for c in conditions}
    worst: dict[tuple[str, float], int] = {}
    parts: dict[str, list[float]] = {}
    queries = 0
    for index, data in job.job.batches(0):
        if index >= count:
            break
        episode = job.episodes[index]
        ys, yq = torch.tensor(episode.support_labels), torch.tensor(episode.query_labels)
        with job.method.adapt(data[0], ys, index, queries=data[2]) as adapted:
            correct = adapted.clean_logits.argmax(-1) == yq
            verdicts = {}
            for c in conditions:
                started = time.perf_counter()
                verdicts[c] = condition_verdicts(adapted.classifier, data[2], yq, c, correct,
                                                 config.seed, index)
                seconds[c.key] += time.perf_counter() - started
                kept[c.key] += int(verdicts[c].sum())
                print(f"episode {index} {c.key}: {time.perf_counter() - started:.2f} s, "
                      f"{int(verdicts[c].sum())} of {len(yq)} queries robust", file=sys.stderr,
                      flush=True)
                if c.spec.attack == "autoattack":
                    _time_parts(adapted.classifier, data[2], yq, correct, c, config.seed, index,
                                parts)
        for budget in {(c.norm, c.eps) for c in conditions}:
            alive = torch.stack([v for c, v in verdicts.items() if (c.norm, c.eps) == budget])
            worst[budget] = worst.get(budget, 0) + int(alive.all(0).sum())
        queries += len(yq)
    done = min(count, len(job.episodes))
    return {"episodes": done, "queries": queries, "threads": torch.get_num_threads(),
            "attacks": [{"condition": c.key, "steps": c.spec.steps,
                         "seconds_per_episode": seconds[c.key] / done,
                         "accuracy": kept[c.key] / queries} for c in conditions],
            "worst_case": [{"norm": n, "eps": e, "accuracy": k / queries}
                           for (n, e), k in worst.items()],
            "autoattack_parts": [{"attack": name, "seconds_per_episode": t / done,
                                  "accuracy": k / queries} for name, (t, k) in parts.items()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--episodes", type=Path, required=True)
    parser.add_argument("--selection", type=Path)
    parser.add_argument("--attacks", type=json.loads, required=True)
    parser.add_argument("--setting", default="5w1s", help="the episodes' setting name")
    parser.add_argument("--count", type=int, default=5, help="episodes to attack")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = EvalConfig(method=args.method, model=args.model, store=args.store,
                        episodes=args.episodes, benchmark="bench", domain=args.store.stem,
                        in_domain=False, setting_name=args.setting, out=Path("unused.csv"),
                        selection=args.selection, attacks=args.attacks, device=args.device)
    found = measure(config, args.count)
    if args.json:
        print(json.dumps(found, indent=1))
        return
    print(f"{found['episodes']} episodes, {found['queries']} queries, "
          f"{found['threads']} threads")
    for a in found["attacks"]:
        print(f"{a['condition']:>40} steps {a['steps']:>4}: {a['seconds_per_episode']:8.2f} "
              f"s/episode, accuracy {100 * a['accuracy']:6.2f}%")
    for w in found["worst_case"]:
        print(f"worst case {w['norm']} {w['eps']:.5g}: {100 * w['accuracy']:6.2f}%")
    for p in found["autoattack_parts"]:
        print(f"autoattack's {p['attack']} alone: {p['seconds_per_episode']:8.2f} s/episode, "
              f"accuracy {100 * p['accuracy']:6.2f}%")


if __name__ == "__main__":
    main()
