"""Aggregate every result row into the paper's tables and figures."""


rule report:
    input:
        rows=eval_targets(),
        sanity=sanity_files(eval_targets()),
        training=training_logs(),
    output:
        tables=report(
            directory(f"{RESULTS}/tables"),
            patterns=["{name}.csv"],
            caption="../docs/report/tables.rst",
            category="Tables",
        ),
        figures=report(
            directory(f"{RESULTS}/figures"),
            patterns=["{name}.png"],
            caption="../docs/report/figures.rst",
            category="Figures",
        ),
    log:
        f"{RESULTS}/logs/report/report.log",
    params:
        spectra=lambda wc, input: spectra_files(input.rows),
        root=lambda wc, output: Path(output.tables).parent,
        references=" ".join(["--reference-methods", *EVALUATE["references"]])
        if "references" in EVALUATE
        else "",
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m amt report --results {input.rows} {params.spectra} --sanity {input.sanity}"
        " --training-logs {input.training} --results-root {params.root}"
        " --tables-dir {output.tables} --figures-dir {output.figures} {params.references}"
        " > {log} 2>&1"
