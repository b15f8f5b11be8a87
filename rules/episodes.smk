"""Draw the test and validation episodes once per (domain, setting) and store them."""


rule draw_episodes:
    priority: DATA_PRIORITY
    input:
        domain_file("{domain}"),
    output:
        f"{RESULTS}/episodes/{{domain}}/{{kind}}_{{setting}}.json",
    log:
        f"{RESULTS}/logs/episodes/{{domain}}_{{kind}}_{{setting}}.log",
    params:
        setting=setting_json,
        n_episodes=lambda wc: config["episodes"][wc.kind]["count"],
        seed=lambda wc: config["episodes"][wc.kind]["seed"],
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m amt episodes --store {input} --domain {wildcards.domain}"
        " --kind {wildcards.kind} --setting-name {wildcards.setting}"
        " --setting {params.setting:q} --count {params.n_episodes} --seed {params.seed}"
        " --out {output} > {log} 2>&1"
