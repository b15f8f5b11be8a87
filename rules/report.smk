"""Aggregate every result row into the paper's tables and figures."""


rule report:
    input:
        rows=PLAN.rows(),
        sanity=PLAN.sanity_files(),
        spectra=PLAN.spectra_files(),
        training=PLAN.training_logs(),
        validation=PLAN.validation_logs(),
    output:
        tables=report(
            directory(PATHS["tables"]),
            patterns=["{name}.csv"],
            caption="../docs/report/tables.rst",
            category="Tables",
        ),
        figures=report(
            directory(PATHS["figures"]),
            patterns=["{name}.png"],
            caption="../docs/report/figures.rst",
            category="Figures",
        ),
    log:
        log("report"),
    params:
        spectra=lambda wc, input: f"--spectra {input.spectra}" if input.spectra else "",
        root=lambda wc, output: Path(output.tables).parent,
        options=PLAN.report_arguments(),
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m amt report --results {input.rows} {params.spectra} --sanity {input.sanity}"
        " --training-logs {input.training} --validation-logs {input.validation}"
        " --results-root {params.root}"
        " --tables-dir {output.tables} --figures-dir {output.figures} {params.options}"
        " > {log} 2>&1"
