"""Fetch the built-in sources, convert every configured domain to HDF5, inspect and verify it."""


rule fetch_builtin:
    priority: DATA_PRIORITY
    output:
        directory("resources/{source}"),
    log:
        f"{RESULTS}/logs/fetch/{{source}}.log",
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m data_prep fetch {wildcards.source} --dest {output} > {log} 2>&1"


# One rule per configured domain, so each source keeps its own resources and appears by name.
for _domain, _spec in config["domains"].items():
    _raw = raw_folder(config, _domain)

    rule:
        name:
            f"convert_{_domain}"
        priority: DATA_PRIORITY
        input:
            convert_inputs(_domain),
        output:
            h5=domain_file(_domain),
            report=f"{domain_file(_domain)}.report.json",
        log:
            f"{RESULTS}/logs/convert/{_domain}.log",
        benchmark:
            f"{RESULTS}/benchmarks/convert/{_domain}.tsv"
        params:
            source=_spec["source"],
            raw=f"--raw {_raw}" if _raw else "",
            short_side=(
                f"--short-side {_spec['short_side']}" if "short_side" in _spec else ""
            ),
            options=converter_options(_domain),
            checksums=f"--checksums {_spec['checksums']}" if "checksums" in _spec else "",
        threads: _spec.get("workers", config["workers"])
        resources:
            mem_mb=4000,
            runtime=60,
        shell:
            "python -m data_prep convert {params.source} {params.raw} --out {output.h5}"
            " --workers {threads} {params.short_side} {params.checksums} {params.options}"
            " > {log} 2>&1"


rule inspect_domain:
    input:
        domain_file("{domain}"),
    output:
        f"{RESULTS}/data/{{domain}}.inspect.json",
    log:
        f"{RESULTS}/logs/inspect/{{domain}}.log",
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "(python -m data_prep verify {input} && "
        "python -m data_prep inspect {input} && "
        "python -m data_prep inspect {input} --json --out {output}) > {log} 2>&1"
