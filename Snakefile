# The rmt pipeline: data -> curriculum training -> evaluation -> report.
#
#   snakemake                                   the CPU default (params.yaml), local
#   snakemake --configfile config/paper.yaml    the paper's recipe, laid over params.yaml
#   snakemake --profile slurm                   the same on a SLURM cluster (see README)
#   snakemake --report reports/report.html      the self-contained report
#
# Rules call the rmt CLI; all computation lives in rmt/. Per-rule resources are in
# profiles/default/config.yaml. dvc.yaml describes the same steps (rmt/pipeline.py).

from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    task="|".join(PIPELINE.tasks),
    seed=r"\d+",
    segments=r"\d+",


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/report.smk"


onstart:
    open_reproduction_run()


onsuccess:
    close_reproduction_run(failed=False)


onerror:
    close_reproduction_run(failed=True)


rule all:
    input:
        all_outputs(),
    default_target: True
