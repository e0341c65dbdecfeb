# gmr-bench workflow: config -> data -> train -> evaluate / diagnose -> tables, figures -> report.
#
#   snakemake --cores all                                   # default study (config/config.yaml)
#   snakemake --cores all --configfile config/paper-mnist.yaml
#   snakemake --report results/report.html                  # after a run: tables and figures, offline
#   snakemake --profile workflow/profiles/slurm --configfile ...   # on a Slurm cluster
#
# Every job calls the `gmr` CLI; see README.md ("Workflow") for the outputs and run times.

import copy

from snakemake.utils import min_version

min_version("8.0")

# The default study only when no study is given. A study given with --configfile is the whole study:
# without `experiments:` it would run nothing of its own, and merged into the default one it would run
# the default experiments too. --config KEY=VALUE overrides single keys of either.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"

elif "experiments" not in config:
    given = ", ".join(str(f) for f in workflow.overwrite_configfiles)
    raise ValueError(f"config: {given} has no `experiments:`; a study needs `experiments:` "
                     "(see config/config.yaml)")

# The config as written (before the schema fills in defaults): experiments override the global
# sections only with the keys they set themselves.
RAW_CONFIG = copy.deepcopy(config)

report: "workflow/report/workflow.rst"

# common.smk checks every key of the config first (the schema, then names, method options, attack
# parameters, eps, and the seeds and methods that diagnose and autoattack pick): a bad value stops
# Snakemake here, before any job starts, with one line naming the key.
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
