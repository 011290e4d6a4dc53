# Each rule runs its job's planned command on its planned inputs (common.smk, STEPS); its
# `settings` parameter holds the resolved settings the job reads, so changing them reruns
# exactly those jobs.


rule data:
    input:
        step_inputs("data"),
    output:
        directory(DATA),
    params:
        command=step_command("data"),
        settings=lambda wildcards: task_settings(wildcards, "data"),
    resources:
        machine_share=machine_share,
    log:
        f"{LOGS}/data/{{task}}.log",
    benchmark:
        f"{TIMINGS}/data/{{task}}.tsv"
    shell:
        "{params.command} > {log} 2>&1"
