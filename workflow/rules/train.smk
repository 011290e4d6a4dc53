# One curriculum stage per job: stage N starts from stage N-1's best checkpoint. The
# stage's checkpoints/ folder is not an output, so a killed job resumes when rerun.


rule train:
    input:
        step_inputs("train"),
    output:
        best=directory(f"{STAGE}/best"),
        history=f"{STAGE}/history.jsonl",
        metrics=f"{STAGE}/metrics.json",
    params:
        command=step_command("train"),
        settings=stage_settings,
        launcher=launcher,
    resources:
        machine_share=machine_share,
    log:
        f"{LOGS}/train/{{task}}/seed-{{seed}}/stage-{{segments}}.log",
    benchmark:
        f"{TIMINGS}/train/{{task}}/seed-{{seed}}/stage-{{segments}}.tsv"
    shell:
        "{params.launcher}{params.command} > {log} 2>&1"
