# Cost studies: analytic forward FLOPs of full attention and RMT on the OPT shapes (the
# paper's Figure 3), attention maps (Figure 6), and measured memory and time of RMT against
# full attention (its timings are wall time: alongside other jobs they run slower).


rule flops:
    input:
        code=source_files("flops"),
    output:
        FLOPS,
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/profile/flops.log",
    benchmark:
        f"{TIMINGS}/profile/flops.tsv"
    shell:
        "rmt profile flops --output {output} > {log} 2>&1"


rule attention:
    input:
        checkpoint=last_stage_of_first_seed,
        data=DATA,
        code=source_files("attention"),
    output:
        ATTENTION,
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/profile/attention-{{task}}.log",
    benchmark:
        f"{TIMINGS}/profile/attention-{{task}}.tsv"
    shell:
        "rmt profile attention --checkpoint {input.checkpoint} --data {input.data} --output {output} > {log} 2>&1"


rule memory:
    input:
        code=source_files("memory"),
    output:
        inference=f"{MEMORY}/inference.csv",
        training=f"{MEMORY}/training.csv",
        summary=f"{MEMORY}/summary.json",
    params:
        folder=lambda wildcards, output: os.path.dirname(output.summary),
        config=CONFIG_ARGS,
        settings=memory_profile_settings,
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/profile/memory.log",
    benchmark:
        f"{TIMINGS}/profile/memory.tsv"
    shell:
        "rmt profile memory --output {params.folder} {params.config} > {log} 2>&1"
