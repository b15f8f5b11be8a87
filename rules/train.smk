"""Meta-tune every (backbone, setting): the pm and lora baselines, and one amt job per pool
member (independent, so a cluster runs them side by side), then assemble each pool."""


rule train_baseline:
    input:
        stores=train_stores(),
        backbone=lambda wc: backbone_checkpoint(wc.backbone),
    output:
        model=f"{MODELS}/{{backbone}}/{{setting}}/{{method}}/model.pt",
        log_csv=f"{MODELS}/{{backbone}}/{{setting}}/{{method}}/train_log.csv",
        manifest=f"{MODELS}/{{backbone}}/{{setting}}/{{method}}/manifest.json",
    wildcard_constraints:
        method="pm|lora",
    log:
        f"{RESULTS}/logs/train/{{backbone}}_{{setting}}_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{backbone}}_{{setting}}_{{method}}.tsv"
    params:
        workers=loader_workers,
        common=lambda wc: train_options(wc.setting),
        seed=config["seed"],
        out_dir=lambda wc, output: Path(output.model).parent,
    threads: 1
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(720),
        gpu=1,
        cpus_per_gpu=cpus_per_gpu,
    shell:
        "OMP_NUM_THREADS={threads} python -m amt train --method {wildcards.method}"
        " --backbone {wildcards.backbone} --backbone-checkpoint {input.backbone}"
        " --stores {input.stores} {params.common} --seed {params.seed}"
        " --workers {params.workers} --out {params.out_dir} > {log} 2>&1"


rule train_amt_member:
    input:
        stores=train_stores(),
        backbone=lambda wc: backbone_checkpoint(wc.backbone),
    output:
        model=f"{MODELS}/{{backbone}}/{{setting}}/amt_{{strategy}}/member{{member}}/model.pt",
        log_csv=f"{MODELS}/{{backbone}}/{{setting}}/amt_{{strategy}}/member{{member}}/train_log.csv",
        manifest=f"{MODELS}/{{backbone}}/{{setting}}/amt_{{strategy}}/member{{member}}/manifest.json",
    log:
        f"{RESULTS}/logs/train/{{backbone}}_{{setting}}_amt_{{strategy}}_member{{member}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{backbone}}_{{setting}}_amt_{{strategy}}_member{{member}}.tsv"
    params:
        workers=loader_workers,
        common=lambda wc: train_options(wc.setting),
        member=lambda wc: member_options(wc.strategy, int(wc.member)),
        out_dir=lambda wc, output: Path(output.model).parent,
    threads: 1
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(720),
        gpu=1,
        cpus_per_gpu=cpus_per_gpu,
    shell:
        "OMP_NUM_THREADS={threads} python -m amt train --method amt"
        " --backbone {wildcards.backbone} --backbone-checkpoint {input.backbone}"
        " --stores {input.stores} {params.common} {params.member}"
        " --workers {params.workers} --out {params.out_dir} > {log} 2>&1"


rule assemble_pool:
    input:
        lambda wc: pool_members(wc.backbone, wc.setting, wc.strategy),
    output:
        f"{MODELS}/{{backbone}}/{{setting}}/amt_{{strategy}}/pool.pt",
    log:
        f"{RESULTS}/logs/pool/{{backbone}}_{{setting}}_{{strategy}}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m amt pool --members {input} --strategy {wildcards.strategy}"
        " --out {output} > {log} 2>&1"
