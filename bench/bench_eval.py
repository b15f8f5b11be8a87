"""Evaluation cost per episode against the work it cannot avoid.

For each backbone (random weights; P random adapters of rank 8 on every target layer) and shot
count (5-way, 15 queries per class), side by side in one run:

- ``pm``: a frozen backbone without the embedding cache; work: one forward of |S| + |Q| images.
- ``amt``: test-time merging (the P members scored on [support; augmented support], the merge,
  the prototypes and the clean queries), no STr; work: (2P + 1)|S| + |Q| image forwards in one
  batch, and (same-shape) P forwards of 2|S| and one of |S| + |Q|, each timed plainly: the first
  ratio includes what smaller batches lose, the second compares with scoring member by member.
- ``amt + PGD-k``: the same episode, then l_inf PGD with k steps on every query (labels are the
  clean predictions, so every query is attacked); work: the amt work plus k forward-backwards
  of |Q| images (input gradients only).
- STr: ``trim_`` (batched float32 Gram eigendecomposition) on the fc1 layers and on every LoRA
  layer, as % of the amt episode; ``lowrank`` is the release's solver (``trim.lowrank_trim_``,
  torch.svd_lowrank per layer); ``svd64`` is ``trim.trim_singular_values`` (float64
  torch.linalg.svd per layer) for comparison; "eigenvalues alone" times only
  ``torch.linalg.eigvalsh`` of every layer's Gram matrix (precomputed), the floor of any exact
  rank-k truncation of these full-rank weights on this device.

Every work figure is measured on the same device, in the same precision (bfloat16 autocast on
CUDA unless ``--no-amp``, float32 on the CPU), with a plain batched forward (backward) of the
plain backbone and ProtoNet head. Per shot count the FLOPs of one pm, amt and attacked amt
episode are counted (bench_train's dispatch counter) against the device's matmul peak in that
precision, measured in the same run, and the peak memory is recorded (RSS; allocated CUDA
memory). Finally a frozen-backbone job (``Evaluation.run`` for pm, clean
only) over many episodes of a synthetic store against one plain pass (read, transform, forward)
over the distinct images they use. Targets: amt <= 1.1x; STr (fc1, all) <= +10%; amt + PGD-k
<= 1.1x; frozen episodes <= 1.2x one pass.

    python bench/bench_eval.py [--json] [--backbones dino_vits16 small_vit] [--steps 10]
        [--device cuda] [--no-amp]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_train import compute_dtype, flop_counter, matmul_peak

from amt.backbones import build_backbone
from amt.checkpoints import save_atomic
from amt.conditions import robust_correct
from amt.devices import autocast, describe, peak_memory, pick_device, reset_peak_memory
from amt.evaluate import Evaluation
from amt.lora import LoRAState, inject_lora
from amt.methods import FrozenMethod, Method, PoolMethod
from amt.pool import Pool
from amt.protonet import ProtoHead
from amt.registry import backbone_entry
from amt.specs import AttackSpec, EvalConfig, Hyper
from amt.trim import lowrank_trim_, tall_stacks, trim_, trim_singular_values

WAYS, QUERIES, RANK = 5, 15, 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warm: bool = True
          ) -> float:
    """Median seconds of ``repeats`` calls, after one warm-up call unless ``warm`` is False
    (for long calls whose kernels an earlier measurement has warmed)."""
    if warm:
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def episode(image_size: int, shots: int, device: torch.device):
    g = torch.Generator().manual_seed(shots)
    ys = torch.arange(WAYS).repeat_interleave(shots)
    yq = torch.arange(WAYS).repeat_interleave(QUERIES)
    return tuple(t.to(device) for t in (torch.rand(len(ys), 3, image_size, image_size,
                                                   generator=g), ys,
                                        torch.rand(len(yq), 3, image_size, image_size,
                                                   generator=g), yq))


def random_pool(name: str, members: int, device: torch.device) -> Pool:
    torch.manual_seed(0)
    backbone = build_backbone(name, None, backbone_entry(name).image_size)
    principal = inject_lora(backbone.vit, RANK)
    states = []
    for _ in range(members):
        adapters = {n: (a + 0.02 * torch.randn_like(a), b + 0.02 * torch.randn_like(b))
                    for n, (a, b) in principal.adapters.items()}
        states.append(LoRAState(adapters).to(device))
    heads = [ProtoHead(10.0 + p).requires_grad_(False).to(device) for p in range(members)]
    return Pool(backbone.requires_grad_(False).eval().to(device), states, heads,
                [0.0] * members, "separate", {"backbone": name})


class Reference:
    """Plain batched forward / forward-backward of the plain backbone and ProtoNet head."""

    def __init__(self, name: str, device: torch.device, repeats: int, amp: bool) -> None:
        torch.manual_seed(0)
        self.backbone = build_backbone(name, None, backbone_entry(name).image_size)
        self.backbone.requires_grad_(False).eval().to(device)
        self.head = ProtoHead().to(device)
        self.device, self.repeats, self.amp = device, repeats, amp

    def forward(self, n: int, size: int) -> float:
        x = torch.rand(n, 3, size, size, device=self.device)

        def run() -> None:
            with torch.no_grad(), autocast(self.device, self.amp):
                self.backbone(x)

        return timed(run, self.device, self.repeats)

    def forward_backward(self, n: int, size: int) -> float:
        x = torch.rand(n, 3, size, size, device=self.device)
        y = torch.arange(n, device=self.device) % WAYS
        protos = torch.randn(WAYS, self.backbone.embed_dim, device=self.device)

        def step() -> None:
            v = x.clone().requires_grad_(True)
            with autocast(self.device, self.amp):
                logits = self.head(self.backbone(v), protos)
            loss = F.cross_entropy(logits.float(), y, reduction="none")
            torch.autograd.grad(loss.sum(), v)

        return timed(step, self.device, self.repeats)


def _clean_episode(method: Method, data) -> Callable[[], None]:
    xs, ys, xq, _ = data

    def run() -> None:
        with method.adapt(xs, ys, 0, queries=xq):
            pass

    return run


# So small that no query falls: every one of the k steps runs on every query (the worst case;
# at real budgets the queries an iterate fools leave the batch and the attack gets cheaper).
WORST_CASE_EPS = 1e-6


def _attacked_episode(method: PoolMethod, data, steps: int) -> Callable[[], None]:
    xs, ys, xq, _ = data
    spec = AttackSpec("pgd", "linf", (WORST_CASE_EPS,), steps=steps)

    def run() -> None:
        with method.adapt(xs, ys, 0, queries=xq) as adapted:
            predicted = adapted.clean_logits.argmax(-1)
            everything = torch.ones_like(predicted, dtype=torch.bool)
            robust_correct(adapted.classifier, xq, predicted, spec, WORST_CASE_EPS, everything,
                           0, 0)

    return run


def _attacked_time(method: PoolMethod, data, steps: int, device: torch.device) -> float:
    """One attacked episode, after a one-step one has warmed the backward kernels."""
    _attacked_episode(method, data, 1)()
    return timed(_attacked_episode(method, data, steps), device, 1, warm=False)


def _trim_times(method: PoolMethod, data, device: torch.device, repeats: int) -> dict:
    xs, ys, _, _ = data
    out = {}
    with method.setup(xs, ys, 0):
        for layers, suffix in (("fc1", ("mlp.fc1",)), ("all", None)):
            chosen = [layer.weight for name, layer in method.layers.items()
                      if suffix is None or name.endswith(suffix)]
            copies = [w.clone() for w in chosen]
            out[layers] = timed(lambda c=copies: trim_(c, 0.5), device, repeats)
            out[f"{layers}_lowrank"] = timed(lambda c=copies: lowrank_trim_(c, 0.5, 0), device,
                                             repeats)
            out[f"{layers}_svd64"] = timed(
                lambda c=chosen: [trim_singular_values(w, 0.5) for w in c], device, 1, False)
        # the smaller Gram matrices, batched as trim_ batches them: their eigenvalues are the
        # least an exact rank-k truncation of these weights has to compute
        grams = [w.mT @ w for _, w, _ in tall_stacks(x.weight for x in method.layers.values())]
        out["all_eigvalsh"] = timed(lambda: [torch.linalg.eigvalsh(g) for g in grams], device,
                                    repeats)
    return out


def _gflop(run: Callable[[], None]) -> float:
    """GFLOP of one call, counted (bench_train's dispatch counter)."""
    counter = flop_counter()
    with counter:
        run()
    return counter.total / 1e9


def measure(name: str, shots: list[int], members: int, steps: int, device: torch.device,
            repeats: int, amp: bool) -> list[dict]:
    """Every shot count on one backbone: its reference, a frozen pm and an amt pool."""
    size = backbone_entry(name).image_size
    reference = Reference(name, device, repeats, amp)
    step_work = reference.forward_backward(WAYS * QUERIES, size)
    pm = FrozenMethod(reference.backbone, reference.head, device, amp, 0, name)
    method = PoolMethod(random_pool(name, members, device), "amt", Hyper(), device, amp, 0)
    results = []
    for k in shots:
        reset_peak_memory(device)
        data = episode(size, k, device)
        support, queries = WAYS * k, WAYS * QUERIES
        amt_work = reference.forward((2 * members + 1) * support + queries, size)
        shaped = members * reference.forward(2 * support, size) + \
            reference.forward(support + queries, size)
        results.append({
            "backbone": name, "image_size": size, "shots": k, "members": members,
            "steps": steps, "pm": timed(_clean_episode(pm, data), device, repeats),
            "pm_work": reference.forward(support + queries, size),
            "amt": timed(_clean_episode(method, data), device, repeats), "amt_work": amt_work,
            "amt_shaped_work": shaped, "pgd": _attacked_time(method, data, steps, device),
            "pgd_work": amt_work + steps * step_work,
            "trim": _trim_times(method, data, device, repeats),
            "gflop": {"pm": _gflop(_clean_episode(pm, data)),
                      "amt": _gflop(_clean_episode(method, data)),
                      "pgd": _gflop(_attacked_episode(method, data, steps))},
            **peak_memory(device)})
        print(f"{name} {k}-shot done", file=sys.stderr)
    return results


def _synthetic_store(folder: Path, classes: int, per_class: int, side: int) -> Path:
    from data_prep.convert import ClassSpec, write_domain

    rng = np.random.default_rng(0)
    specs = [ClassSpec(f"c{c}", "test", [rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                                         for _ in range(per_class)]) for c in range(classes)]
    path = folder / "store.h5"
    write_domain(path, source="synthetic", converter_version="bench", classes=specs,
                 load=np.asarray)
    return path


def measure_frozen(name: str, episodes: int, device: str, workers: int, repeats: int,
                   amp: bool) -> dict:
    """Evaluation.run of pm over ``episodes`` clean episodes vs one plain pass (best of
    ``repeats`` each, alternated)."""
    from amt.episode_files import episode_meta, save_episodes
    from amt.episodes import FixedSampler, draw_episodes
    from amt.specs import TrainConfig
    from amt.train import MetaTuner
    from data_prep.store import DomainStore

    size = backbone_entry(name).image_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store_path = _synthetic_store(folder, 40, 20, size + size // 8)
        store = DomainStore(store_path)
        sampler = FixedSampler(ways=WAYS, shots=1, queries=QUERIES)
        drawn = draw_episodes(store, "test", sampler, episodes, 0)
        meta = episode_meta(store, domain="bench", split="test", sampler=sampler, seed=0,
                            count=episodes)
        save_episodes(folder / "eps.json", drawn, {**meta, "setting_name": "5w1s"})
        torch.manual_seed(0)
        tuner = MetaTuner(TrainConfig(method="pm", backbone=name), torch.device("cpu"))
        save_atomic(tuner.model_file(None), folder / "pm.pt")
        job = Evaluation(EvalConfig(
            method="pm", model=folder / "pm.pt", store=store_path, episodes=folder / "eps.json",
            benchmark="bench", domain="bench", in_domain=False, setting_name="5w1s",
            out=folder / "out.csv", device=device, workers=workers, amp=amp,
            log_every=10**6))
        ids = np.unique(np.concatenate([np.concatenate([e.support, e.query]) for e in drawn]))
        one_pass, run = math.inf, math.inf
        for _ in range(repeats):  # best of: both take well under a second on small_vit
            one_pass = min(one_pass, _one_pass(job, store, ids))
            start = time.perf_counter()
            job.run()
            _sync(job.device)
            run = min(run, time.perf_counter() - start)
    return {"backbone": name, "episodes": episodes, "distinct_images": len(ids),
            "images_in_episodes": sum(len(e.support) + len(e.query) for e in drawn),
            "one_pass": one_pass, "run": run}


def _one_pass(job: Evaluation, store, ids: np.ndarray, batch: int = 64) -> float:
    """Read, transform and embed each distinct image once, in batches, in this process."""
    start = time.perf_counter()
    for i in range(0, len(ids), batch):
        images = np.stack([job.dataset.transform(store.read(int(j))).numpy()
                           for j in ids[i:i + batch]])
        with torch.no_grad(), autocast(job.device, job.config.amp):
            job.method.backbone(torch.from_numpy(images).to(job.device))
    _sync(job.device)
    return time.perf_counter() - start


def checks(report: dict) -> list[dict]:
    found = []
    for r in report["episodes"]:
        label = f"{r['backbone']} {r['shots']}-shot"
        amt, pgd = r["amt"] / r["amt_work"], r["pgd"] / r["pgd_work"]
        found += [{"case": label, "check": "amt / its forward work", "value": amt,
                   "target": "<= 1.1", "ok": amt <= 1.1},
                  {"case": label, "check": f"amt + PGD-{r['steps']} / its work", "value": pgd,
                   "target": "<= 1.1", "ok": pgd <= 1.1},
                  *({"case": label, "check": f"STr {layers} / amt episode",
                     "value": r["trim"][layers] / r["amt"], "target": "<= 0.10",
                     "ok": r["trim"][layers] / r["amt"] <= 0.10} for layers in ("fc1", "all"))]
    for r in report["frozen"]:
        ratio = r["run"] / r["one_pass"]
        found.append({"case": f"{r['backbone']} {r['episodes']} episodes",
                      "check": "frozen episodes / one pass", "value": ratio, "target": "<= 1.2",
                      "ok": ratio <= 1.2})
    return found


def _throughput(report: dict) -> list[str]:
    peak = report["matmul"]
    lines = ["", f"matmul peak: {peak['gflops']:.0f} GFLOP/s ({peak['dtype']}, {peak['size']}^2)",
             "", "| backbone | shots | case | s/episode | GFLOP/episode | GFLOP/s | "
             "% of matmul peak | peak RSS MiB | peak CUDA MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["episodes"]:
        lines += [f"| {r['backbone']} | {r['shots']} | {case} | {r[case]:.3f} | "
                  f"{r['gflop'][case]:.1f} | {r['gflops'][case]:.1f} | "
                  f"{100 * r['fraction_of_peak'][case]:.0f} | {r['peak_rss_mib']:.0f} | "
                  f"{r.get('peak_cuda_allocated_mib', '-')} |" for case in r["gflop"]]
    return lines


def with_peak_fractions(report: dict, peak: dict) -> None:
    """Each episode row's achieved GFLOP/s per case and its fraction of the matmul peak."""
    report["matmul"] = peak
    for r in report["episodes"]:
        r["gflops"] = {case: gflop / r[case] for case, gflop in r["gflop"].items()}
        r["fraction_of_peak"] = {case: rate / peak["gflops"] for case, rate in r["gflops"].items()}


def markdown(report: dict) -> str:
    lines = [f"device: {report['device']}; {report['dtype']}; 5-way, {QUERIES} queries per "
             f"class, P = {report['members']} members of rank {RANK}; "
             f"l_inf PGD-{report['steps']}", "",
             "| backbone | px | shots | pm s (x work) | amt s (x work; x same-shape forwards) | "
             "amt+PGD s (x work) | STr fc1 % | STr all % | lowrank fc1 % | lowrank all % | "
             "svd64 fc1 % | svd64 all % | eigenvalues alone, all % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["episodes"]:
        t = r["trim"]
        lines.append(
            f"| {r['backbone']} | {r['image_size']} | {r['shots']} | {r['pm']:.3f} "
            f"({r['pm'] / r['pm_work']:.2f}) | {r['amt']:.3f} ({r['amt'] / r['amt_work']:.2f}; "
            f"{r['amt'] / r['amt_shaped_work']:.2f}) | {r['pgd']:.2f} "
            f"({r['pgd'] / r['pgd_work']:.2f}) | "
            + " | ".join(f"{100 * t[k] / r['amt']:.1f}" for k in (
                "fc1", "all", "fc1_lowrank", "all_lowrank", "fc1_svd64", "all_svd64",
                "all_eigvalsh"))
            + " |")
    lines += _throughput(report)
    if report["frozen"]:
        lines += ["", "| backbone | episodes | distinct images | images in episodes | "
                  "one pass s | frozen run s | x one pass |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['episodes']} | {r['distinct_images']} | "
              f"{r['images_in_episodes']} | {r['one_pass']:.2f} | {r['run']:.2f} | "
              f"{r['run'] / r['one_pass']:.2f} |" for r in report["frozen"]]
    lines += ["", "| case | check | value | target | ok |", "|---|---|---|---|---|"]
    lines += [f"| {c['case']} | {c['check']} | {c['value']:.3f} | {c['target']} | "
              f"{'yes' if c['ok'] else 'NO'} |" for c in report["checks"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="*", default=["dino_vits16", "small_vit"])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps of the attacked case")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--frozen-backbones", nargs="*", default=["small_vit"])
    parser.add_argument("--frozen-episodes", type=int, default=600)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16 autocast on CUDA, as evaluation runs (no effect on the CPU)")
    parser.add_argument("--json", action="store_true", help="print JSON, not Markdown")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    report = {"device": describe(device), "dtype": compute_dtype(str(device), args.amp),
              "members": args.members, "steps": args.steps, "episodes": [], "frozen": []}
    for name in args.backbones:
        report["episodes"] += measure(name, args.shots, args.members, args.steps, device,
                                      args.repeats, args.amp)
    for name in args.frozen_backbones:
        report["frozen"].append(measure_frozen(name, args.frozen_episodes, args.device,
                                               args.workers, max(args.repeats, 3), args.amp))
    with_peak_fractions(report, matmul_peak(str(device), None, args.amp))
    report["checks"] = checks(report)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
