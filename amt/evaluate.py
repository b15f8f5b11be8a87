"""Clean, adversarial and corruption accuracy of one (domain, backbone, method, setting).

Threat model. The support set is clean. The model first adapts to it (prototypes; TTM's
scoring, merging and trimming; PMF's fine-tuning), and the adapted classifier is then fixed:
its prototypes are never recomputed. Only then are the queries attacked, white-box, through
the adapted classifier (the attacker knows the merged or fine-tuned weights and the
prototypes; it cannot touch the support or the adaptation). Perturbations live in [0, 1] pixel
space, normalisation being inside the model: an attacked query is x + delta in [0, 1] with
||delta||_inf <= eps or ||delta||_2 <= eps. Loss: cross-entropy of the adapted logits (PGD,
APGD-CE) or the targeted DLR loss (APGD-T, over the min(9, N - 1) most likely wrong classes,
n_classes = N); autoattack: robust only if APGD-CE, APGD-T, FAB-T and Square all fail. A query
counts as robust only if it is classified correctly after every restart; a query the clean
model misclassifies is not robust (it is not attacked).

The conditions (clean, attacks, noise, corruptions) are ``amt.conditions``'; the sanity checks
(Carlini et al. 2019) ``amt.sanity``'s.

Outputs: the tidy CSV (``amt.rows``; validated, written atomically), the sanity
JSON, and for methods with merged weights ``<out>.spectra.csv``: the singular values of the
first episode's final LoRA-layer weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from amt import devices
from amt.checkpoints import sha256, write_json_atomic
from amt.conditions import CLEAN, Condition, build_conditions, condition_verdicts
from amt.episode_files import store_fingerprint
from amt.episodes import Episode
from amt.jobs import load_episode_job
from amt.methods import EmbeddingCache, FrozenMethod, merged_spectra
from amt.registry import TEST_TRANSFORMS, method_entry
from amt.rows import parse_spectra, validate_results, write_csv_atomic
from amt.sanity import sanity_checks, sanity_runs, worst_case_runs
from amt.selections import read_selection
from amt.specs import EvalConfig, add_spec_argument, spec_from_args
from data_prep.store import DomainStore

log = logging.getLogger(__name__)


class _Images(Dataset):
    """Distinct store images through a deterministic transform: (index, image)."""

    def __init__(self, store: DomainStore, ids: np.ndarray, transform) -> None:
        self.store, self.ids, self.transform = store, ids, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        return int(self.ids[i]), self.transform(self.store.read(int(self.ids[i]))).numpy()


def _stack(items: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, Tensor]:
    # numpy, not torch.stack: see amt.episode_data.load_episode
    return np.array([i for i, _ in items]), torch.from_numpy(np.stack([x for _, x in items]))



class Evaluation:
    """One job: its method, episodes, conditions and what they produce."""

    def __init__(self, config: EvalConfig) -> None:
        self.config = config
        self.hyper = read_selection(config.selection, config.method, config.model)
        self.job = load_episode_job(
            config.method, config.model, config.store, config.episodes, self.hyper,
            seed=config.seed, device=config.device, amp=config.amp,
            backbone_checkpoint=config.backbone_checkpoint, image_size=config.image_size,
            resize=config.resize, test_transform=config.test_transform,
            setting_name=config.setting_name)
        self.device, self.store, self.method = self.job.device, self.job.store, self.job.method
        self.episodes, self.dataset = self.job.episodes, self.job.dataset
        self.image_size, self.resize = self.job.image_size, self.job.resize
        self.conditions = build_conditions(config.attacks, config.corruptions)
        self.config_hash = self._hash()
        self.cache: EmbeddingCache | None = None
        self.extras: list[dict] = []

    def _hash(self) -> str:
        """sha256 of every setting that changes the numbers (file contents, not paths)."""
        c = self.config
        payload = {
            "method": c.method, "model_sha256": sha256(c.model),
            "backbone_checkpoint_sha256": c.backbone_checkpoint and sha256(c.backbone_checkpoint),
            "episodes_sha256": sha256(c.episodes), "store": store_fingerprint(self.store),
            "hyperparameters": asdict(self.hyper), "attacks": [asdict(a) for a in c.attacks],
            "corruptions": asdict(c.corruptions), "seed": c.seed, "image_size": self.image_size,
            "resize": self.resize, "test_transform": c.test_transform, "amp": c.amp,
            "device": self.device.type}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def _build_cache(self) -> None:
        """A frozen backbone's clean embeddings: one pass over the images the episodes use."""
        ids = np.unique(np.concatenate([np.concatenate([e.support, e.query])
                                        for e in self.episodes]))
        loader = DataLoader(_Images(self.store, ids, self.dataset.transform), batch_size=64,
                            num_workers=self.config.workers, collate_fn=_stack,
                            pin_memory=self.device.type == "cuda")
        self.cache = EmbeddingCache.build(self.method, loader)
        log.info("embedding cache: %d distinct images for %d episodes", len(ids),
                 len(self.episodes))

    def _cached_clean(self, chunk: int = 256) -> dict[int, tuple[Tensor, Tensor]]:
        """Each episode's prototypes and clean query logits from the embedding cache, computed
        for up to ``chunk`` episodes of one shape at a time."""
        shapes: dict[tuple[int, int, int], list[int]] = {}
        for i, e in enumerate(self.episodes):
            shapes.setdefault((len(e.support), len(e.query), len(e.classes)), []).append(i)
        out: dict[int, tuple[Tensor, Tensor]] = {}
        for (n, q, ways), indices in shapes.items():
            for start in range(0, len(indices), chunk):
                part = [self.episodes[i] for i in indices[start:start + chunk]]
                ys = torch.from_numpy(np.stack([e.support_labels for e in part]))
                support = self.cache(np.concatenate([e.support for e in part]))
                queries = self.cache(np.concatenate([e.query for e in part]))
                protos, logits = self.method.cached_logits(
                    ys.to(self.device), support.view(len(part), n, -1),
                    queries.view(len(part), q, -1), ways)
                for i, p, lg in zip(indices[start:start + chunk], protos, logits, strict=True):
                    out[i] = (p, lg)
        return out

    def _data(self, pixels: bool) -> Iterator[tuple[int, tuple[Tensor, ...] | None]]:
        if pixels:
            yield from self.job.batches(self.config.workers)
        else:
            yield from ((i, None) for i in range(len(self.episodes)))

    def run(self) -> pd.DataFrame:
        clean = None
        if isinstance(self.method, FrozenMethod):
            self._build_cache()
            clean = self._cached_clean()
        pixels = self.cache is None or len(self.conditions) > 1 or \
            self.config.sanity.large_eps is not None
        records, started = [], time.perf_counter()
        for index, data in self._data(pixels):
            results = self._episode(index, self.episodes[index], data,
                                    None if clean is None else clean[index])
            records += [(index, c, acc) for c, acc in results]
            self._progress(index, records, started)
        return self._frame(records)

    def _episode(self, index: int, episode: Episode, data: tuple[Tensor, ...] | None,
                 clean: tuple[Tensor, Tensor] | None) -> list[tuple[Condition, float]]:
        """``clean``: the episode's cached prototypes and clean logits (frozen methods)."""
        ys = torch.tensor(episode.support_labels, device=self.device)  # copies: Episode arrays
        yq = torch.tensor(episode.query_labels, device=self.device)  # are read-only
        xs, xq = (None, None) if data is None else (data[0], data[2])
        if clean is not None:
            context = nullcontext(self.method.adapted(*clean))
        else:
            context = self.method.adapt(xs, ys, index, queries=xq)
        with context as adapted:
            correct = adapted.clean_logits.argmax(-1) == yq
            verdicts = {c: condition_verdicts(adapted.classifier, xq, yq, c, correct,
                                              self.config.seed, index)
                        for c in self.conditions[1:]}
            results = [(CLEAN, correct.float().mean().item())]
            results += [(c, v.float().mean().item()) for c, v in verdicts.items()]
            self.extras += worst_case_runs(verdicts, index)
            if index < self.config.sanity.episodes:
                self.extras += sanity_runs(adapted.classifier, xq, yq, correct, index,
                                           self.conditions, self.config.attacks,
                                           self.config.sanity, self.config.seed)
        return results

    def _progress(self, index: int, records: list, started: float) -> None:
        done = index + 1
        if done % self.config.log_every and done != len(self.episodes):
            return
        clean = np.mean([acc for _, c, acc in records if c is CLEAN])
        log.info("%s %s %s: episode %d/%d, clean accuracy %.3f, %.2f s/episode",
                 self.config.method, self.config.domain, self.config.setting_name, done,
                 len(self.episodes), clean, (time.perf_counter() - started) / done)

    def _frame(self, records: list[tuple[int, Condition, float]]) -> pd.DataFrame:
        c = self.config
        frame = pd.DataFrame(
            [{"benchmark": c.benchmark, "domain": c.domain, "in_domain": c.in_domain,
              "backbone": self.method.backbone_name, "method": c.method,
              "setting": c.setting_name, "episode": index, "attack": cond.attack,
              "norm": cond.norm, "eps": cond.eps, "accuracy": acc, "seed": c.seed,
              "config_hash": self.config_hash} for index, cond, acc in records])
        validate_results(frame, source=f"evaluation rows for {c.out}")
        return frame

    def spectra(self) -> pd.DataFrame:
        xs, ys, _, _ = (t.to(self.device) for t in self.dataset[0])
        frame = merged_spectra(self.method, xs, ys, 0, self.config.domain, self.config.method,
                               self.config.spectra_layers)
        return parse_spectra(frame.astype(str), f"spectra of {self.config.out}")

    def sanity(self, frame: pd.DataFrame, seconds: float) -> dict:
        checks = sanity_checks(frame, self.extras, self.conditions, self.config.sanity)
        failed = [c["check"] for c in checks if not c["ok"]]
        for name in failed:
            log.warning("sanity check failed: %s (see %s)", name, self.config.sanity_path)
        return {"config_hash": self.config_hash, "method": self.config.method,
                "backbone": self.method.backbone_name, "domain": self.config.domain,
                "setting": self.config.setting_name,
                "episodes": len(self.episodes), "hyperparameters": asdict(self.hyper),
                "device": devices.describe(self.device), "seconds": round(seconds, 2),
                "peak_memory": devices.peak_memory(self.device), "all_ok": not failed,
                "checks": checks}


def evaluate(config: EvalConfig) -> pd.DataFrame:
    """Run the job and write its rows (``config.out``), sanity JSON and, for methods with
    merged weights, spectra; returns the validated rows."""
    started = time.perf_counter()
    job = Evaluation(config)
    devices.reset_peak_memory(job.device)
    frame = job.run()
    write_csv_atomic(frame, config.out)
    if method_entry(config.method).merges:
        write_csv_atomic(job.spectra(), config.spectra_path)
    write_json_atomic(job.sanity(frame, time.perf_counter() - started), config.sanity_path)
    log.info("%d rows -> %s", len(frame), config.out)
    return frame


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command."""
    p = subparsers.add_parser("evaluate", help="clean/adversarial/corruption accuracy of one "
                              "(domain, backbone, method, setting)")
    add_spec_argument(p, EvalConfig)
    p.add_argument("--method", help="a registry method")
    p.add_argument("--model", type=Path,
                   help="pm/lora model.pt (pm, pmf, lora) or pool.pt (the amt family)")
    p.add_argument("--backbone-checkpoint", type=Path, help="override the recorded backbone file")
    p.add_argument("--store", type=Path)
    p.add_argument("--episodes", type=Path, help="the stored test episodes")
    p.add_argument("--selection", type=Path, help="JSON from `select` (methods with "
                   "hyperparameters)")
    p.add_argument("--benchmark")
    p.add_argument("--domain")
    p.add_argument("--in-domain", action=argparse.BooleanOptionalAction)
    p.add_argument("--setting-name")
    p.add_argument("--attacks", type=json.loads,
                   help='JSON list, e.g. [{"attack": "pgd", "norm": "linf", "eps": ["2/255"], '
                        '"steps": 10, "restarts": 1}]')
    p.add_argument("--corruptions", type=json.loads, help='JSON {"names": [...], '
                   '"severities": [...]}')
    p.add_argument("--sanity", type=json.loads, help='JSON {"episodes": 2, "large_eps": '
                   '"64/255"}')
    for option, kind in (("--seed", int), ("--image-size", int), ("--resize", int),
                         ("--workers", int), ("--log-every", int)):
        p.add_argument(option, type=kind)
    p.add_argument("--test-transform", choices=TEST_TRANSFORMS)
    p.add_argument("--device")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction)
    p.add_argument("--spectra-layers", nargs="+", help="LoRA layer name suffixes for the "
                   "spectra (default: every layer)")
    p.add_argument("--out", type=Path, help="results CSV; the sanity JSON and spectra CSV go "
                   "beside it")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    evaluate(spec_from_args(EvalConfig, args))
    return 0
