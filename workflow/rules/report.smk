# Figures and tables from the result files, registered in `snakemake --report`.

REPORT_FILES = [
    f"{REPORT}/accuracy.png",
    f"{REPORT}/accuracy.svg",
    f"{REPORT}/generalization.png",
    f"{REPORT}/generalization.svg",
    f"{REPORT}/accuracy.csv",
    f"{REPORT}/accuracy.md",
    f"{REPORT}/seeds.csv",
    f"{REPORT}/seeds.md",
    f"{REPORT}/flops.png",
    f"{REPORT}/flops.svg",
    f"{REPORT}/memory.png",
    f"{REPORT}/memory.svg",
    f"{REPORT}/training-memory.png",
    f"{REPORT}/training-memory.svg",
    *(f"{REPORT}/attention-{task}.{fmt}" for task in PIPELINE.tasks if task in ATTENTION_TASKS for fmt in ("png", "svg")),
]


rule report:
    input:
        report_inputs,
        code=source_files("report"),
    output:
        report(f"{REPORT}/accuracy.png", caption="../report/accuracy.rst", category="Accuracy"),
        f"{REPORT}/accuracy.svg",
        report(f"{REPORT}/generalization.png", caption="../report/generalization.rst", category="Generalization"),
        f"{REPORT}/generalization.svg",
        report(f"{REPORT}/accuracy.csv", caption="../report/table.rst", category="Accuracy"),
        f"{REPORT}/accuracy.md",
        report(f"{REPORT}/seeds.csv", caption="../report/seeds.rst", category="Accuracy"),
        f"{REPORT}/seeds.md",
        report(f"{REPORT}/flops.png", caption="../report/flops.rst", category="Cost"),
        f"{REPORT}/flops.svg",
        report(f"{REPORT}/memory.png", caption="../report/memory.rst", category="Cost"),
        f"{REPORT}/memory.svg",
        report(f"{REPORT}/training-memory.png", caption="../report/training-memory.rst", category="Cost"),
        f"{REPORT}/training-memory.svg",
        *(
            report(f"{REPORT}/attention-{task}.png", caption="../report/attention.rst", category="Attention")
            for task in PIPELINE.tasks
            if task in ATTENTION_TASKS
        ),
        *(f"{REPORT}/attention-{task}.svg" for task in PIPELINE.tasks if task in ATTENTION_TASKS),
    params:
        folder=lambda wildcards, output: os.path.dirname(output[0]),
        config=CONFIG_ARGS,
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{TIMINGS}/report.tsv"
    shell:
        "rmt report --output {params.folder} {params.config} > {log} 2>&1"
