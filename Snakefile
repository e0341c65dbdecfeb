# gmr-bench workflow: config -> data -> train -> evaluate / diagnose -> tables, figures -> report.
#
#   snakemake --cores all                                   # default study (config/config.yaml)
#   snakemake --cores all --configfile config/paper-mnist.yaml
#   snakemake --report results/report.html                  # after a run: tables and figures, offline
#   snakemake --profile workflow/profiles/slurm --configfile ...   # on a Slurm cluster
#
# Every job calls the `gmr` CLI; see README.md ("Workflow") for the outputs and run times.

import copy

from snakemake.utils import min_version, validate

min_version("8.0")

# The default study, unless a study is given (--configfile FILE): Snakemake would otherwise merge the
# given file into the default one and run the default experiments too. --config KEY=VALUE still
# overrides single keys of either.
if "experiments" not in config:

    configfile: "config/config.yaml"


# The config as written (before the schema fills in defaults): experiments override the global
# sections only with the keys they set themselves.
RAW_CONFIG = copy.deepcopy(config)
validate(config, "workflow/schemas/config.schema.yaml")

report: "workflow/report/workflow.rst"

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/diagnose.smk"
include: "workflow/rules/report.smk"

# Light jobs run where Snakemake runs, also on a cluster (compute nodes may have no internet for a
# dataset download; tables and plots take seconds).
localrules:
    all,
    prepare_data,
    tables,
    plots,


rule all:
    input:
        table_files(),
        R + "/figures",
    default_target: True
