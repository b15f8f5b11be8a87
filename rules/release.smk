"""Import the authors' released AMT checkpoints (config backbones.<name>.release.<setting>) as
pools that the methods over them (amt_release) select and evaluate like the pipeline's own."""


rule import_release:
    input:
        lambda wc: PLAN.release_checkpoint(wc.backbone, wc.setting) or [],
    output:
        pool=PATHS["release_pool"],
        backbone=PATHS["release_backbone"],
    log:
        log("import_release"),
    params:
        spec=lambda wc: to_json(PLAN.import_spec(wc.backbone, wc.setting)),
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m amt import-release --spec {params.spec:q} > {log} 2>&1"
