# Figures and tables from the result files (rmt/report.py names them), registered in
# `snakemake --report` with their captions.


rule report:
    input:
        step_inputs("report"),
    output:
        report_outputs(),
    params:
        command=step_command("report"),
    resources:
        machine_share=machine_share,
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{TIMINGS}/report.tsv"
    shell:
        "{params.command} > {log} 2>&1"
