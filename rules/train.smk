"""Meta-tune every (backbone, setting): the baselines, and one job per pool member
(independent, so a cluster runs them side by side), each validated after every epoch on the
stored episodes of train.validation, then assemble each pool."""


rule train_baseline:
    input:
        backbone=lambda wc: PLAN.backbone_checkpoint(wc.backbone),
        stores=PLAN.train_stores(),
        valid_stores=PLAN.validation_stores(),
        valid_episodes=lambda wc: PLAN.validation_episodes(wc.setting),
    output:
        model=PATHS["model"],
        log_csv=PATHS["model_log"],
        valid_log=PATHS["model_valid_log"],
        manifest=PATHS["model_manifest"],
    wildcard_constraints:
        trained=BASELINES,
    log:
        log("train_baseline"),
    benchmark:
        benchmark("train_baseline")
    params:
        spec=lambda wc: to_json(PLAN.baseline_spec(wc.backbone, wc.setting, wc.trained,
                                                   int(wc.seed))),
        workers=loader_workers,
        out_dir=lambda wc, output: Path(output.model).parent,
    threads: 1
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(720),
        gpu=1,
        cpus_per_gpu=cpus_per_gpu,
    shell:
        "OMP_NUM_THREADS={threads} python -m amt train --spec {params.spec:q}"
        " --stores {input.stores} --valid-stores {input.valid_stores}"
        " --valid-episodes {input.valid_episodes} --workers {params.workers}"
        " --out {params.out_dir} > {log} 2>&1"


rule train_amt_member:
    input:
        backbone=lambda wc: PLAN.backbone_checkpoint(wc.backbone),
        stores=PLAN.train_stores(),
        valid_stores=PLAN.validation_stores(),
        valid_episodes=lambda wc: PLAN.validation_episodes(wc.setting),
    output:
        model=PATHS["member"],
        log_csv=PATHS["member_log"],
        valid_log=PATHS["member_valid_log"],
        manifest=PATHS["member_manifest"],
    wildcard_constraints:
        trained=POOLED,
    log:
        log("train_amt_member"),
    benchmark:
        benchmark("train_amt_member")
    params:
        spec=lambda wc: to_json(PLAN.member_spec(wc.backbone, wc.setting, wc.trained,
                                                 wc.strategy, int(wc.member), int(wc.seed))),
        workers=loader_workers,
        out_dir=lambda wc, output: Path(output.model).parent,
    threads: 1
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(720),
        gpu=1,
        cpus_per_gpu=cpus_per_gpu,
    shell:
        "OMP_NUM_THREADS={threads} python -m amt train --spec {params.spec:q}"
        " --stores {input.stores} --valid-stores {input.valid_stores}"
        " --valid-episodes {input.valid_episodes} --workers {params.workers}"
        " --out {params.out_dir} > {log} 2>&1"


rule assemble_pool:
    input:
        lambda wc: PLAN.pool_members(wc.backbone, wc.setting, wc.trained, wc.strategy,
                                     int(wc.seed)),
    output:
        PATHS["pool"],
    wildcard_constraints:
        trained=POOLED,
    log:
        log("assemble_pool"),
    params:
        spec=lambda wc: to_json(PLAN.pool_spec(wc.backbone, wc.setting, wc.trained,
                                               wc.strategy, int(wc.seed))),
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m amt pool --spec {params.spec:q} > {log} 2>&1"
