"""Per-domain hyperparameter selection on the validation episodes, then clean, adversarial and
corruption evaluation of every method on the stored test episodes."""


rule select_hyperparameters:
    input:
        model=lambda wc: eval_model(wc.backbone, wc.setting, wc.method),
        store=domain_file("{domain}"),
        episodes=episode_file("{domain}", "valid", "{setting}"),
        base=lambda wc: base_selection(wc.backbone, wc.setting, wc.domain, wc.method),
    output:
        f"{RESULTS}/selection/{{backbone}}/{{setting}}/{{domain}}/{{method}}.json",
    log:
        f"{RESULTS}/logs/select/{{backbone}}_{{setting}}_{{domain}}_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/select/{{backbone}}_{{setting}}_{{domain}}_{{method}}.tsv"
    params:
        workers=loader_workers,
        grid=lambda wc: json.dumps(EVALUATE["grids"][wc.method]),
        base=lambda wc, input: f"--selection {input.base}" if input.base else "",
        run=f"--seed {config['seed']} --device {config['device']} {image_options()}",
    threads: 1
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(120),
        gpu=1,
        cpus_per_gpu=cpus_per_gpu,
    shell:
        "OMP_NUM_THREADS={threads} python -m amt select --method {wildcards.method}"
        " --model {input.model} --store {input.store} --episodes {input.episodes}"
        " --grid {params.grid:q} {params.base} {params.run} --workers {params.workers}"
        " --out {output} > {log} 2>&1"


rule evaluate:
    input:
        model=lambda wc: eval_model(wc.backbone, wc.setting, wc.method),
        store=domain_file("{domain}"),
        episodes=episode_file("{domain}", "test", "{setting}"),
        selection=lambda wc: selection_file(wc.backbone, wc.setting, wc.domain, wc.method),
    output:
        rows=f"{RESULTS}/eval/{{backbone}}/{{setting}}/{{domain}}/{{method}}.csv",
        sanity=f"{RESULTS}/eval/{{backbone}}/{{setting}}/{{domain}}/{{method}}.sanity.json",
    log:
        f"{RESULTS}/logs/evaluate/{{backbone}}_{{setting}}_{{domain}}_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{backbone}}_{{setting}}_{{domain}}_{{method}}.tsv"
    params:
        workers=loader_workers,
        selection=lambda wc, input: f"--selection {input.selection}" if input.selection else "",
        domain=lambda wc: domain_options(wc.domain),
        attacks=json.dumps(EVALUATE.get("attacks", [])),
        corruptions=json.dumps(EVALUATE.get("corruptions", {"names": [], "severities": []})),
        sanity=json.dumps(EVALUATE.get("sanity", {})),
        run=f"--seed {config['seed']} --device {config['device']} {image_options()}",
    threads: 1
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(240),
        gpu=1,
        cpus_per_gpu=cpus_per_gpu,
    shell:
        "OMP_NUM_THREADS={threads} python -m amt evaluate --method {wildcards.method}"
        " --model {input.model} --store {input.store} --episodes {input.episodes}"
        " {params.selection} {params.domain} --setting-name {wildcards.setting}"
        " --attacks {params.attacks:q} --corruptions {params.corruptions:q}"
        " --sanity {params.sanity:q} {params.run} --workers {params.workers}"
        " --out {output.rows} > {log} 2>&1"
