"""Pretrain the built-in backbone; official backbones are plain input files from the config."""


rule pretrain_backbone:
    input:
        store=lambda wc: PLAN.pretrain_store(wc.backbone),
    output:
        model=PATHS["backbone"],
        log_csv=PATHS["backbone_log"],
        manifest=PATHS["backbone_manifest"],
    log:
        log("pretrain_backbone"),
    benchmark:
        benchmark("pretrain_backbone")
    params:
        spec=lambda wc: to_json(PLAN.pretrain_spec(wc.backbone)),
        workers=loader_workers,
        out_dir=lambda wc, output: Path(output.model).parent,
    threads: 2
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(60),
        gpu=1,
        cpus_per_gpu=cpus_per_gpu,
    shell:
        "OMP_NUM_THREADS={threads} python -m amt pretrain --spec {params.spec:q}"
        " --store {input.store} --workers {params.workers} --out {params.out_dir} > {log} 2>&1"
