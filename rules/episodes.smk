"""Draw the test and validation episodes once per (domain, setting) and store them."""


rule draw_episodes:
    priority: DATA_PRIORITY
    input:
        PATHS["store"],
    output:
        PATHS["episodes"],
    log:
        log("draw_episodes"),
    params:
        spec=lambda wc: to_json(PLAN.episodes_spec(wc.domain, wc.kind, wc.setting)),
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m amt episodes --spec {params.spec:q} > {log} 2>&1"
