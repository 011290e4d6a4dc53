# One curriculum stage per job: stage N starts from stage N-1's best checkpoint. The
# stage's checkpoints/ folder is not an output, so a killed job resumes when rerun.


rule train:
    input:
        data=DATA,
        init=previous_best,
        code=source_files("train"),
    output:
        best=directory(f"{STAGE}/best"),
        history=f"{STAGE}/history.jsonl",
        metrics=f"{STAGE}/metrics.json",
    params:
        config=CONFIG_ARGS,
        settings=stage_settings,
        folder=lambda wildcards: STAGE.format(**wildcards),
        init=lambda wildcards, input: f" --init {input.init}" if input.init else "",
        launcher=launcher,
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/train/{{task}}/seed-{{seed}}/stage-{{segments}}.log",
    benchmark:
        f"{TIMINGS}/train/{{task}}/seed-{{seed}}/stage-{{segments}}.tsv"
    shell:
        "{params.launcher}rmt train --data {input.data} --segments {wildcards.segments} --seed {wildcards.seed}"
        " --output {params.folder}{params.init} {params.config} > {log} 2>&1"
