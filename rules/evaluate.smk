"""Per-domain hyperparameter selection on the validation episodes, then evaluation of every
(backbone, setting, target domain, method) on the stored test episodes."""


rule select_hyperparameters:
    input:
        model=lambda wc: PLAN.trained_artefact(wc.backbone, wc.setting, wc.method,
                                               int(wc.seed)),
        store=path("store"),
        episodes=path("episodes", kind="valid"),
        base=lambda wc: PLAN.base_selection(*evaluation(wc)) or [],
    output:
        PATHS["selection"],
    log:
        log("select_hyperparameters"),
    benchmark:
        benchmark("select_hyperparameters")
    params:
        spec=lambda wc: to_json(PLAN.select_spec(*evaluation(wc))),
        workers=loader_workers,
    threads: 1
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(120),
        gpu=1,
        cpus_per_gpu=cpus_per_gpu,
    shell:
        "OMP_NUM_THREADS={threads} python -m amt select --spec {params.spec:q}"
        " --workers {params.workers} > {log} 2>&1"


rule evaluate:
    input:
        model=lambda wc: PLAN.trained_artefact(wc.backbone, wc.setting, wc.method,
                                               int(wc.seed)),
        store=path("store"),
        episodes=path("episodes", kind="test"),
        selection=lambda wc: PLAN.selection(*evaluation(wc)) or [],
    output:
        rows=PATHS["rows"],
        sanity=PATHS["sanity"],
    wildcard_constraints:
        method=NOT_MERGING,
    log:
        log("evaluate"),
    benchmark:
        benchmark("evaluate")
    params:
        spec=lambda wc: to_json(PLAN.eval_spec(*evaluation(wc))),
        workers=loader_workers,
    threads: 1
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(240),
        gpu=1,
        cpus_per_gpu=cpus_per_gpu,
    shell:
        "OMP_NUM_THREADS={threads} python -m amt evaluate --spec {params.spec:q}"
        " --workers {params.workers} > {log} 2>&1"


# Methods with merged LoRA weights also write the singular values of the first episode's.
use rule evaluate as evaluate_merged with:
    output:
        rows=PATHS["rows"],
        sanity=PATHS["sanity"],
        spectra=PATHS["spectra"],
    wildcard_constraints:
        method=MERGING,
