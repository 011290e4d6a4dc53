# Cost studies: analytic forward FLOPs of full attention and RMT on the OPT shapes (the
# paper's Figure 3).


rule flops:
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
