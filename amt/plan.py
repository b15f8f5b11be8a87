"""The workflow's plan: which jobs a config makes, where their files go, and each job's spec.

Free of torch and of Snakemake: ``rules/common.smk`` builds one ``Plan`` from the config and the
rules call it for their paths, input functions and specs; the tests call it directly. Every path
of the workflow is a template in ``PATHS``, used both for the rules' outputs (with wildcards)
and for the target lists (filled in).
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from fractions import Fraction

from amt.registry import EPISODE_KINDS, METHODS, TRAINED, parse_budget
from amt.specs import (
    FIXED_HYPER,
    EpisodesConfig,
    EvalConfig,
    ImportConfig,
    PoolConfig,
    PretrainConfig,
    SelectConfig,
    StatsOptions,
    TrainConfig,
    grid_points,
)
from data_prep.sources import FETCHED

RESULTS = "results"
MODELS = f"{RESULTS}/models"
# Everything trained or evaluated per training seed (train.seeds) has a seed<k> folder.
RUN = f"{MODELS}/{{backbone}}/{{setting}}/seed{{seed}}"
MEMBER = f"{RUN}/{{trained}}_{{strategy}}/member{{member}}"
EVAL = f"{RESULTS}/eval/{{backbone}}/{{setting}}/seed{{seed}}/{{domain}}/{{method}}"
PATHS = {
    "fetched": "resources/{source}",
    "store": f"{RESULTS}/data/{{domain}}.h5",
    "conversion_report": f"{RESULTS}/data/{{domain}}.h5.report.json",
    "inspection": f"{RESULTS}/data/{{domain}}.inspect.json",
    "episodes": f"{RESULTS}/episodes/{{domain}}/{{kind}}_{{setting}}.json",
    "backbone": f"{RESULTS}/backbones/{{backbone}}/model.pt",
    "backbone_log": f"{RESULTS}/backbones/{{backbone}}/train_log.csv",
    "backbone_manifest": f"{RESULTS}/backbones/{{backbone}}/manifest.json",
    "model": f"{RUN}/{{trained}}/model.pt",
    "model_log": f"{RUN}/{{trained}}/train_log.csv",
    "model_valid_log": f"{RUN}/{{trained}}/valid_log.csv",
    "model_manifest": f"{RUN}/{{trained}}/manifest.json",
    "member": f"{MEMBER}/model.pt",
    "member_log": f"{MEMBER}/train_log.csv",
    "member_valid_log": f"{MEMBER}/valid_log.csv",
    "member_manifest": f"{MEMBER}/manifest.json",
    "pool": f"{RUN}/{{trained}}_{{strategy}}/pool.pt",
    "release_pool": f"{MODELS}/{{backbone}}/{{setting}}/release/pool.pt",
    "release_backbone": f"{MODELS}/{{backbone}}/{{setting}}/release/backbone.pt",
    "selection": f"{RESULTS}/selection/{{backbone}}/{{setting}}/seed{{seed}}/{{domain}}/"
                 "{method}.json",
    "rows": f"{EVAL}.csv",
    "sanity": f"{EVAL}.sanity.json",
    "spectra": f"{EVAL}.spectra.csv",
    "tables": f"{RESULTS}/tables",
    "figures": f"{RESULTS}/figures",
}
# Each rule's job name (its log and benchmark file names) from its wildcards.
JOB_NAMES = {
    "fetch_builtin": "{source}",
    "convert": "{domain}",
    "inspect_domain": "{domain}",
    "draw_episodes": "{domain}_{kind}_{setting}",
    "pretrain_backbone": "{backbone}",
    "train_baseline": "{backbone}_{setting}_seed{seed}_{trained}",
    "train_amt_member": "{backbone}_{setting}_seed{seed}_{trained}_{strategy}_member{member}",
    "assemble_pool": "{backbone}_{setting}_seed{seed}_{trained}_{strategy}",
    "import_release": "{backbone}_{setting}",
    "select_hyperparameters": "{backbone}_{setting}_seed{seed}_{domain}_{method}",
    "evaluate": "{backbone}_{setting}_seed{seed}_{domain}_{method}",
    "report": "report",
}
EVALUATION_KINDS = EPISODE_KINDS[:2]  # test and valid: drawn per evaluated domain and setting
VALIDATION_KIND = "train_valid"  # a training run's per-epoch validation
DEFAULT_STRATEGIES = ("separate",)  # train.amt.pool_strategies unset: AMT's own pool
DEFAULT_BENCHMARK = "builtin"
MEMBER_SEED_STRIDE = 1000  # a random/uniform member's seed: training seed + stride x member
DEFAULT_WORKERS = 2  # conversion processes of a domain without workers of its own
# config.train keys that are TrainConfig fields of every run (train.overrides.<trained> may set
# them per trained method), and config.train.amt's of members
RUN_KEYS = ("epochs", "episodes_per_epoch", "optimizer", "lr", "momentum", "weight_decay",
            "schedule", "warmup_epochs", "keep", "rank", "checkpoint_every")
MEMBER_KEYS = ("attack_steps", "awp_gamma", "lambda_adv", "apq", "apsv", "kl_direction",
               "apsv_rescale", "apsv_detach_support", "apsv_loss_support")


def _fill(template: str, wildcards: dict[str, object]) -> str:
    for key, value in wildcards.items():
        template = template.replace(f"{{{key}}}", str(value))
    return template


def path(name: str, **wildcards: object) -> str:
    """``PATHS[name]``, with the wildcards given filled in (the others stay ``{wildcards}``)."""
    return _fill(PATHS[name], wildcards)


def log(rule: str, **wildcards: object) -> str:
    """A rule's log file, one per job."""
    return _fill(f"{RESULTS}/logs/{rule}/{JOB_NAMES[rule]}.log", wildcards)


def benchmark(rule: str, **wildcards: object) -> str:
    """A rule's benchmark file (Snakemake's time and memory record), one per job."""
    return _fill(f"{RESULTS}/benchmarks/{rule}/{JOB_NAMES[rule]}.tsv", wildcards)


def mean_budget(budgets: list[object]) -> float:
    """The exact mean of the budgets as written ('1/255' stays a fraction until the end)."""
    exact = [Fraction(b) if isinstance(b, str) else Fraction(str(b)) for b in budgets]
    return float(sum(exact) / len(exact))


class Plan:
    """The jobs of one (schema-valid) config."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.train, self.evaluate = config["train"], config["evaluate"]
        self.amt = self.train.get("amt", {})
        self.strategies = tuple(self.amt.get("pool_strategies", DEFAULT_STRATEGIES))
        self.budgets = [parse_budget(b, f"train.amt.budgets[{i}]")
                        for i, b in enumerate(self.amt.get("budgets", []))]

    # -- the config's names --------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return list(self.config["domains"])

    @property
    def seeds(self) -> list[int]:
        """The training seeds: every trained model, pool member, selection and evaluation runs
        once per seed (train.seeds; the global seed alone by default)."""
        return list(self.train.get("seeds", [self.config["seed"]]))

    def _seed(self, seed: int | None) -> int:
        return self.seeds[0] if seed is None else int(seed)

    @property
    def trained_pooled(self) -> list[str]:
        return [t for t in self.train["methods"] if TRAINED[t].pooled]

    @property
    def trained_baselines(self) -> list[str]:
        return [t for t in self.train["methods"] if not TRAINED[t].pooled]

    def _run_options(self) -> dict:
        return {"device": self.config["device"]} if "device" in self.config else {}

    # -- data -----------------------------------------------------------------------------------
    def raw_folder(self, domain: str) -> str | None:
        """The raw folder a domain converts from: configured, fetched into resources/, or none."""
        spec = self.config["domains"][domain]
        if "raw" in spec:
            return spec["raw"]
        return path("fetched", source=spec["source"]) if spec["source"] in FETCHED else None

    def convert_inputs(self, domain: str) -> list[str]:
        """Its raw folder (fetched or the user's) and its split and checksum files, if given."""
        spec = self.config["domains"][domain]
        inputs = [self.raw_folder(domain)] if self.raw_folder(domain) else []
        if "split_file" in spec.get("options", {}):
            inputs.append(spec["options"]["split_file"])
        return inputs + ([spec["checksums"]] if "checksums" in spec else [])

    def convert_threads(self, domain: str) -> int:
        return self.config["domains"][domain].get("workers",
                                                  self.config.get("workers", DEFAULT_WORKERS))

    def convert_arguments(self, domain: str) -> str:
        """The converter's arguments but --out and --workers: the source, its raw folder, the
        storage settings, checksums and source-specific options."""
        spec, raw = self.config["domains"][domain], self.raw_folder(domain)
        parts = [spec["source"], *(["--raw", raw] if raw else [])]
        for key in ("short_side", "squash_side", "codec"):
            if key in spec:
                parts += [f"--{key.replace('_', '-')}", str(spec[key])]
        if "checksums" in spec:
            parts += ["--checksums", spec["checksums"]]
        for key, value in spec.get("options", {}).items():
            parts += ["--option", f"{key}={json.dumps(value)}"]
        return shlex.join(parts)

    def episodes_spec(self, domain: str, kind: str, setting: str) -> EpisodesConfig:
        draw = self.train["validation"] if kind == VALIDATION_KIND else \
            self.config["episodes"][kind]
        return EpisodesConfig(
            store=path("store", domain=domain), domain=domain, kind=kind, setting_name=setting,
            setting=self.config["settings"][setting], count=draw["count"], seed=draw["seed"],
            out=path("episodes", domain=domain, kind=kind, setting=setting))

    # -- backbones and training -----------------------------------------------------------------
    def backbone_checkpoint(self, backbone: str) -> str:
        """The weights a backbone starts from: pretrained by the pipeline, or the user's file."""
        spec = self.config["backbones"][backbone]
        return spec.get("checkpoint") or path("backbone", backbone=backbone)

    def pretrain_store(self, backbone: str) -> str:
        return path("store", domain=self.config["backbones"][backbone]["pretrain"]["domain"])

    def pretrain_spec(self, backbone: str) -> PretrainConfig:
        options = {k: v for k, v in self.config["backbones"][backbone]["pretrain"].items()
                   if k != "domain"}
        return PretrainConfig(arch=backbone, seed=self.config["seed"], **options,
                              **self._run_options())

    def train_stores(self) -> list[str]:
        return [path("store", domain=d) for d in self.train["sources"]]

    def train_setting(self, setting: str) -> str:
        """The setting whose episodes train (and validate) the models evaluated in
        ``setting``: train.episodes maps one to the other (Meta-Dataset's sampler, say)."""
        return self.train.get("episodes", {}).get(setting, setting)

    @property
    def validation_domains(self) -> list[str]:
        """The domains whose valid split validates every training run after each epoch."""
        validation = self.train.get("validation")
        return [] if validation is None else validation.get("domains", self.train["sources"])

    def validation_stores(self) -> list[str]:
        return [path("store", domain=d) for d in self.validation_domains]

    def validation_episodes(self, setting: str) -> list[str]:
        """The stored validation episodes of the runs evaluated in ``setting``, one file per
        validation domain (in the order of ``validation_stores``)."""
        return [path("episodes", domain=d, kind=VALIDATION_KIND,
                     setting=self.train_setting(setting)) for d in self.validation_domains]

    def _pos_embed(self, backbone: str) -> dict:
        """The backbone's position-embedding mode, if configured (else the spec's default)."""
        spec = self.config["backbones"][backbone]
        return {"pos_embed": spec["pos_embed"]} if "pos_embed" in spec else {}

    def _train_spec(self, backbone: str, setting: str, trained: str, **fields: object
                    ) -> TrainConfig:
        run = {k: self.train[k] for k in RUN_KEYS if k in self.train}
        run |= self.train.get("overrides", {}).get(trained, {})
        return TrainConfig(method=TRAINED[trained].trainer, backbone=backbone,
                           backbone_checkpoint=self.backbone_checkpoint(backbone),
                           setting=self.config["settings"][self.train_setting(setting)], **run,
                           **self._pos_embed(backbone), **self._run_options(), **fields)

    def baseline_spec(self, backbone: str, setting: str, trained: str, seed: int | None = None
                      ) -> TrainConfig:
        return self._train_spec(backbone, setting, trained, seed=self._seed(seed))

    def member_spec(self, backbone: str, setting: str, trained: str, strategy: str,
                    member: int, seed: int | None = None) -> TrainConfig:
        """Pool member ``member`` under a pool strategy (method.md): separate, one budget each;
        uniform, every member at the mean budget with its own seed; random, every member draws
        a budget from the list per episode, with its own seed (the training seed plus
        ``MEMBER_SEED_STRIDE`` per member, so that no member of one training seed shares its
        seed with a member of another)."""
        seed = self._seed(seed)
        if strategy == "separate":
            budgets = [self.budgets[member]]
        elif strategy == "uniform":
            budgets = [mean_budget(self.amt["budgets"])]
            seed += MEMBER_SEED_STRIDE * member
        else:
            budgets, seed = list(self.budgets), seed + MEMBER_SEED_STRIDE * member
        tuning = {k: self.amt[k] for k in MEMBER_KEYS if k in self.amt}
        return self._train_spec(backbone, setting, trained, seed=seed, budgets=budgets, **tuning)

    def pool_members(self, backbone: str, setting: str, trained: str, strategy: str,
                     seed: int | None = None) -> list[str]:
        return [path("member", backbone=backbone, setting=setting, seed=self._seed(seed),
                     trained=trained, strategy=strategy, member=i)
                for i in range(len(self.budgets))]

    def pool_spec(self, backbone: str, setting: str, trained: str, strategy: str,
                  seed: int | None = None) -> PoolConfig:
        return PoolConfig(members=self.pool_members(backbone, setting, trained, strategy, seed),
                          out=path("pool", backbone=backbone, setting=setting,
                                   seed=self._seed(seed), trained=trained, strategy=strategy),
                          strategy=strategy)

    # -- the authors' released pool -------------------------------------------------------------
    def release_checkpoint(self, backbone: str, setting: str) -> str | None:
        """The authors' checkpoint meta-tuned from ``backbone`` for ``setting``, if configured
        (backbones.<backbone>.release.<setting>)."""
        return self.config["backbones"][backbone].get("release", {}).get(setting)

    def releases(self) -> list[dict[str, str]]:
        """The wildcards of every import: the released pools an evaluated method reads."""
        jobs = []
        for job in self.evaluations():
            release = {"backbone": job["backbone"], "setting": job["setting"]}
            if METHODS[job["method"]].released and release not in jobs:
                jobs.append(release)
        return jobs

    def import_spec(self, backbone: str, setting: str) -> ImportConfig:
        where = {"backbone": backbone, "setting": setting}
        return ImportConfig(checkpoint=self.release_checkpoint(backbone, setting),
                            backbone=backbone, out=path("release_pool", **where),
                            backbone_out=path("release_backbone", **where),
                            **self._pos_embed(backbone))

    # -- selection and evaluation ---------------------------------------------------------------
    def trained_artefact(self, backbone: str, setting: str, method: str,
                         seed: int | None = None) -> str:
        """The file a test-time method reads: its trained method's model file, the pool of its
        strategy (of training seed ``seed``), or the imported release (one for every seed)."""
        entry = METHODS[method]
        if entry.released:
            return path("release_pool", backbone=backbone, setting=setting)
        where = {"backbone": backbone, "setting": setting, "seed": self._seed(seed),
                 "trained": entry.trained}
        return path("pool", strategy=entry.strategy, **where) if entry.pooled else \
            path("model", **where)

    def selection(self, backbone: str, setting: str, domain: str, method: str,
                  seed: int | None = None) -> str | None:
        """Its selection file, for a method with test-time hyperparameters and a grid."""
        if method not in self.evaluate.get("grids", {}):
            return None
        return path("selection", backbone=backbone, setting=setting, seed=self._seed(seed),
                    domain=domain, method=method)

    def base_selection(self, backbone: str, setting: str, domain: str, method: str,
                       seed: int | None = None) -> str | None:
        """The selection a method builds on (amt_ft: amt's merging choice)."""
        base = METHODS[method].base
        return base and self.selection(backbone, setting, domain, base, seed)

    def _image_options(self, domain: str) -> dict:
        """Input size and test transform: the domain's, else the episodes' / evaluate's."""
        layers = (self.config["episodes"], self.evaluate, self.config["domains"][domain])
        return {k: layer[k] for layer in layers for k in ("image_size", "resize",
                                                          "test_transform") if k in layer}

    def select_spec(self, backbone: str, setting: str, domain: str, method: str,
                    seed: int | None = None) -> SelectConfig:
        fixed = {k: self.evaluate[k] for k in FIXED_HYPER if k in self.evaluate}
        seed = self._seed(seed)
        return SelectConfig(
            method=method, model=self.trained_artefact(backbone, setting, method, seed),
            store=path("store", domain=domain),
            episodes=path("episodes", domain=domain, kind="valid", setting=setting),
            grid=self.evaluate["grids"][method],
            out=self.selection(backbone, setting, domain, method, seed),
            base_selection=self.base_selection(backbone, setting, domain, method, seed),
            seed=seed, **fixed, **self._image_options(domain),
            **self._run_options())

    def eval_spec(self, backbone: str, setting: str, domain: str, method: str,
                  seed: int | None = None) -> EvalConfig:
        spec, seed = self.config["domains"][domain], self._seed(seed)
        where = {"backbone": backbone, "setting": setting, "domain": domain, "method": method,
                 "seed": seed}
        return EvalConfig(
            method=method, model=self.trained_artefact(backbone, setting, method, seed),
            store=path("store", domain=domain),
            episodes=path("episodes", domain=domain, kind="test", setting=setting),
            benchmark=spec.get("benchmark", self.evaluate.get("benchmark", DEFAULT_BENCHMARK)),
            domain=domain, in_domain=domain in self.train["sources"], setting_name=setting,
            out=path("rows", **where), selection=self.selection(**where),
            attacks=self.evaluate.get("attacks", []),
            corruptions=self.evaluate.get("corruptions", {}),
            sanity=self.evaluate.get("sanity", {}), seed=seed,
            **self._image_options(domain), **self._run_options())

    # -- targets --------------------------------------------------------------------------------
    def evaluations(self) -> list[dict[str, object]]:
        """The wildcards of every evaluation job: per training seed, except a method over the
        released pool (one trained model: evaluated under the first seed only), which runs
        where the backbone has one for the setting."""
        return [{"backbone": b, "setting": s, "seed": seed, "domain": d, "method": m}
                for b in self.train["backbones"] for s in self.evaluate["settings"]
                for seed in self.seeds for d in self.evaluate["targets"]
                for m in self.evaluate["methods"]
                if not METHODS[m].released or (self.release_checkpoint(b, s)
                                               and seed == self.seeds[0])]

    def selections(self) -> list[dict[str, str]]:
        """The wildcards of every selection job: evaluated methods and the bases they need."""
        jobs = []
        for job in self.evaluations():
            for method in (METHODS[job["method"]].base, job["method"]):
                found = method and self.selection(**{**job, "method": method})
                candidate = {**job, "method": method}
                if found and candidate not in jobs:
                    jobs.append(candidate)
        return jobs

    def baselines(self) -> list[dict[str, object]]:
        return [{"backbone": b, "setting": s, "seed": seed, "trained": t}
                for b in self.train["backbones"] for s in self.train["settings"]
                for seed in self.seeds for t in self.trained_baselines]

    def pools(self) -> list[dict[str, object]]:
        return [{"backbone": b, "setting": s, "seed": seed, "trained": t, "strategy": st}
                for b in self.train["backbones"] for s in self.train["settings"]
                for seed in self.seeds for t in self.trained_pooled for st in self.strategies]

    def members(self) -> list[dict[str, object]]:
        return [{**pool, "member": i} for pool in self.pools() for i in range(len(self.budgets))]

    def pretrained_backbones(self) -> list[str]:
        return [b for b in self.train["backbones"] if "pretrain" in self.config["backbones"][b]]

    def episode_draws(self) -> list[dict[str, str]]:
        """The evaluation's episode files: test and valid, per target and setting."""
        return [{"domain": d, "kind": k, "setting": s} for d in self.evaluate["targets"]
                for s in self.evaluate["settings"] for k in EVALUATION_KINDS]

    def validation_draws(self) -> list[dict[str, str]]:
        """The training runs' validation episode files, per domain and training setting."""
        settings = dict.fromkeys(self.train_setting(s) for s in self.train["settings"])
        return [{"domain": d, "kind": VALIDATION_KIND, "setting": s}
                for s in settings for d in self.validation_domains]

    def model_targets(self) -> list[str]:
        return [path("model", **job) for job in self.baselines()] + \
            [path("pool", **job) for job in self.pools()]

    def backbone_models(self, backbone: str) -> list[str]:
        """The models trained from a backbone's weights (its checkpoint is needed while any is
        missing)."""
        return [p for p in self.model_targets() if p.startswith(f"{MODELS}/{backbone}/")]

    def training_logs(self) -> list[str]:
        """Every train_log.csv the trained models leave: pretraining, baselines, pool members."""
        return [path("backbone_log", backbone=b) for b in self.pretrained_backbones()] + \
            [path("model_log", **job) for job in self.baselines()] + \
            [path("member_log", **job) for job in self.members()]

    def validation_logs(self) -> list[str]:
        """Every valid_log.csv of the meta-tuning runs (validation per epoch, the kept one)."""
        return [path("model_valid_log", **job) for job in self.baselines()] + \
            [path("member_valid_log", **job) for job in self.members()]

    def rows(self) -> list[str]:
        return [path("rows", **job) for job in self.evaluations()]

    def sanity_files(self) -> list[str]:
        return [path("sanity", **job) for job in self.evaluations()]

    def spectra_files(self) -> list[str]:
        """The spectra the report draws: those of the merging methods of the first backbone and
        setting (spectra rows are keyed by domain and method only)."""
        first = {"backbone": self.train["backbones"][0], "setting": self.evaluate["settings"][0],
                 "seed": self.seeds[0]}
        return [path("spectra", **job) for job in self.evaluations()
                if METHODS[job["method"]].merges and first.items() <= job.items()]

    def targets(self) -> list[str]:
        """What ``snakemake`` builds: inspected stores, episodes, models, tables, figures."""
        return [path("inspection", domain=d) for d in self.domains] + \
            [path("episodes", **job) for job in self.episode_draws()] + \
            self.model_targets() + [PATHS["tables"], PATHS["figures"]]

    # -- the whole plan -------------------------------------------------------------------------
    def specs(self) -> list[tuple[str, object]]:
        """(rule, spec) of every job that has a spec: building them runs each job's own checks
        on the values the workflow will pass it."""
        draws = self.episode_draws() + self.validation_draws()
        return [("draw_episodes", self.episodes_spec(**job)) for job in draws] + \
            [("pretrain_backbone", self.pretrain_spec(b)) for b in self.pretrained_backbones()] + \
            [("train_baseline", self.baseline_spec(**job)) for job in self.baselines()] + \
            [("train_amt_member", self.member_spec(**job)) for job in self.members()] + \
            [("assemble_pool", self.pool_spec(**job)) for job in self.pools()] + \
            [("import_release", self.import_spec(**job)) for job in self.releases()] + \
            [("select_hyperparameters", self.select_spec(**job)) for job in self.selections()] + \
            [(self.evaluation_rule(job["method"]), self.eval_spec(**job))
             for job in self.evaluations()]

    @staticmethod
    def evaluation_rule(method: str) -> str:
        """Methods with merged weights also declare their spectra: a rule of their own."""
        return "evaluate_merged" if METHODS[method].merges else "evaluate"

    def job_counts(self) -> Counter:
        """Jobs per rule, as ``snakemake -n`` counts them on a machine without any output."""
        counts = Counter(rule for rule, _ in self.specs())
        fetched = {self.config["domains"][d]["source"] for d in self.domains} & FETCHED
        counts.update({"fetch_builtin": len(fetched), "convert": len(self.domains),
                       "inspect_domain": len(self.domains), "report": 1, "all": 1})
        return counts

    def grid_sizes(self) -> dict[str, int]:
        """Points per selection job, by method (a staged grid: its stages' points added)."""
        return {method: len(grid_points(grid, method))
                for method, grid in self.evaluate.get("grids", {}).items()}

    def summary(self) -> str:
        """The jobs per rule and the grid size per method, as a short table."""
        counts = self.job_counts()
        lines = [f"{sum(counts.values())} jobs:"]
        lines += [f"  {rule:<24} {count:>6}" for rule, count in sorted(counts.items())
                  if count]
        sizes = self.grid_sizes()
        if sizes:
            lines.append("grid points per selection job (validation episodes each):")
            lines += [f"  {method:<24} {size:>6}" for method, size in sizes.items()]
        return "\n".join(lines)

    # -- report ---------------------------------------------------------------------------------
    def stats_options(self) -> StatsOptions:
        return StatsOptions(**self.config.get("report", {}))

    def report_arguments(self) -> str:
        """The report command's statistics and reference-method options."""
        stats = self.stats_options()
        parts = ["--std-ddof", str(stats.std_ddof), "--average-ci", stats.average_ci]
        if "references" in self.evaluate:
            parts += ["--reference-methods", *self.evaluate["references"]]
        return shlex.join(parts)

