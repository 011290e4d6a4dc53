# Extrapolation of the last stage to long inputs, and the generalization grid of every
# stage (the paper's Figure 5).


rule evaluate:
    input:
        step_inputs("evaluate"),
    output:
        accuracy=EVALUATION,
        metrics=EVALUATION_METRICS,
    params:
        command=step_command("evaluate"),
        settings=lambda wildcards: evaluation_settings(wildcards, grid=False),
    resources:
        machine_share=machine_share,
    log:
        f"{LOGS}/evaluate/{{task}}/seed-{{seed}}.log",
    benchmark:
        f"{TIMINGS}/evaluate/{{task}}/seed-{{seed}}.tsv"
    shell:
        "{params.command} > {log} 2>&1"


rule grid:
    input:
        step_inputs("grid"),
    output:
        GRID,
    params:
        command=step_command("grid"),
        settings=lambda wildcards: evaluation_settings(wildcards, grid=True),
    resources:
        machine_share=machine_share,
    log:
        f"{LOGS}/grid/{{task}}/seed-{{seed}}/stage-{{segments}}.log",
    benchmark:
        f"{TIMINGS}/grid/{{task}}/seed-{{seed}}/stage-{{segments}}.tsv"
    shell:
        "{params.command} > {log} 2>&1"
