# Extrapolation of the last stage to long inputs, and the generalization grid of every
# stage (the paper's Figure 5).


rule evaluate:
    input:
        checkpoint=last_stage_best,
        data=DATA,
        code=source_files("evaluate"),
    output:
        accuracy=EVALUATION,
        metrics=EVALUATION_METRICS,
    params:
        config=CONFIG_ARGS,
        settings=lambda wildcards: evaluation_settings(wildcards, grid=False),
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/evaluate/{{task}}/seed-{{seed}}.log",
    benchmark:
        f"{TIMINGS}/evaluate/{{task}}/seed-{{seed}}.tsv"
    shell:
        "rmt evaluate --checkpoint {input.checkpoint} --data {input.data} --output {output.accuracy}"
        " --metrics {output.metrics} {params.config} > {log} 2>&1"


rule grid:
    input:
        checkpoint=f"{STAGE}/best",
        data=DATA,
        code=source_files("grid"),
    output:
        GRID,
    params:
        config=CONFIG_ARGS,
        settings=lambda wildcards: evaluation_settings(wildcards, grid=True),
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/grid/{{task}}/seed-{{seed}}/stage-{{segments}}.log",
    benchmark:
        f"{TIMINGS}/grid/{{task}}/seed-{{seed}}/stage-{{segments}}.tsv"
    shell:
        "rmt evaluate --grid --checkpoint {input.checkpoint} --data {input.data} --output {output} {params.config}"
        " > {log} 2>&1"
