"""Pretrain the built-in backbone; official backbones are plain input files from the config."""


rule pretrain_backbone:
    input:
        store=lambda wc: domain_file(pretrain_spec(wc.backbone)["domain"]),
    output:
        model=f"{RESULTS}/backbones/{{backbone}}/model.pt",
        log_csv=f"{RESULTS}/backbones/{{backbone}}/train_log.csv",
        manifest=f"{RESULTS}/backbones/{{backbone}}/manifest.json",
    log:
        f"{RESULTS}/logs/pretrain/{{backbone}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{backbone}}.tsv"
    params:
        workers=loader_workers,
        options=lambda wc: cli_options(pretrain_spec(wc.backbone), exclude=["domain"]),
        run=f"--seed {config['seed']} --device {config['device']}",
        out_dir=lambda wc, output: Path(output.model).parent,
    threads: 2
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(60),
        gpu=1,
        cpus_per_gpu=cpus_per_gpu,
    shell:
        "OMP_NUM_THREADS={threads} python -m amt pretrain --store {input.store}"
        " --arch {wildcards.backbone} {params.options} {params.run}"
        " --workers {params.workers} --out {params.out_dir} > {log} 2>&1"
