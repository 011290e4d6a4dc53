rule data:
    input:
        code=source_files("data"),
        noise=lambda wildcards: noise_files(PIPELINE.for_task(wildcards.task).data),
    output:
        directory(DATA),
    params:
        config=CONFIG_ARGS,
        settings=lambda wildcards: task_settings(wildcards, "data"),
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/data/{{task}}.log",
    benchmark:
        f"{TIMINGS}/data/{{task}}.tsv"
    shell:
        "rmt data generate {wildcards.task} {output} {params.config} > {log} 2>&1"
