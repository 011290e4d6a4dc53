# Cost studies: analytic forward FLOPs of full attention and RMT on the OPT shapes (the
# paper's Figure 3), attention maps (Figure 6), and measured memory and time of RMT against
# full attention (its timings are wall time: alongside other jobs they run slower).


rule flops:
    input:
        step_inputs("flops"),
    output:
        FLOPS,
    params:
        command=step_command("flops"),
    resources:
        machine_share=machine_share,
    log:
        f"{LOGS}/profile/flops.log",
    benchmark:
        f"{TIMINGS}/profile/flops.tsv"
    shell:
        "{params.command} > {log} 2>&1"


rule attention:
    input:
        step_inputs("attention"),
    output:
        ATTENTION,
    params:
        command=step_command("attention"),
    resources:
        machine_share=machine_share,
    log:
        f"{LOGS}/profile/attention-{{task}}.log",
    benchmark:
        f"{TIMINGS}/profile/attention-{{task}}.tsv"
    shell:
        "{params.command} > {log} 2>&1"


rule memory:
    input:
        step_inputs("memory"),
    output:
        inference=f"{MEMORY}/inference.csv",
        training=f"{MEMORY}/training.csv",
        summary=f"{MEMORY}/summary.json",
    params:
        command=step_command("memory"),
        settings=memory_profile_settings,
    resources:
        machine_share=whole_machine,
    log:
        f"{LOGS}/profile/memory.log",
    benchmark:
        f"{TIMINGS}/profile/memory.tsv"
    shell:
        "{params.command} > {log} 2>&1"
