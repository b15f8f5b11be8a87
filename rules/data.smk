"""Fetch the built-in sources, convert every configured domain to HDF5, inspect and verify it."""


rule fetch_builtin:
    priority: DATA_PRIORITY
    output:
        directory(PATHS["fetched"]),
    log:
        log("fetch_builtin"),
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m data_prep fetch {wildcards.source} --dest {output} > {log} 2>&1"


# One rule per configured domain, so each source keeps its own resources and appears by name.
for _domain in PLAN.domains:

    rule:
        name:
            f"convert_{_domain}"
        priority: DATA_PRIORITY
        input:
            PLAN.convert_inputs(_domain),
        output:
            h5=path("store", domain=_domain),
            report=path("conversion_report", domain=_domain),
        log:
            log("convert", domain=_domain),
        benchmark:
            benchmark("convert", domain=_domain)
        params:
            arguments=PLAN.convert_arguments(_domain),
        threads: PLAN.convert_threads(_domain)
        resources:
            mem_mb=4000,
            runtime=60,
        shell:
            "python -m data_prep convert {params.arguments} --out {output.h5}"
            " --workers {threads} > {log} 2>&1"


rule inspect_domain:
    input:
        PATHS["store"],
    output:
        PATHS["inspection"],
    log:
        log("inspect_domain"),
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "(python -m data_prep verify {input} && "
        "python -m data_prep inspect {input} && "
        "python -m data_prep inspect {input} --json --out {output}) > {log} 2>&1"
