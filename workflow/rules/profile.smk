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
