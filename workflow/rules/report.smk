# Tables (`gmr tables`) and figures (`gmr plots`) across all runs, marked for `snakemake --report`.
#
# The tables are the ones registered in gmr/report/tables.py (a new registered table is a new output
# here, with no edit). `gmr tables` writes each in every format of gmr/report/render.py, among them
# NAME.rst: the table's registered title and caption, which the report shows beside NAME.html.
# The tables read each evaluation's per-example .npz (intervals, paired comparisons), so those are inputs
# too; the comparisons table compares the pairs of the config's `report: comparisons:` (see
# _comparisons_arg). The RobustBench models of `zoo_models:` join the tables (their evaluations and
# audits; their rows are marked "(RobustBench)"), not the figures, which follow our runs' training.

from gmr.report.render import FORMATS as TABLE_FORMATS
from gmr.report.comparisons import pair_specs
from gmr.report.tables import table_names as registered_table_names


def table_names() -> list[str]:
    return registered_table_names(DATASETS)


def table_files(fmt=None) -> list[str]:
    formats = [fmt] if fmt else TABLE_FORMATS
    return [f"{R}/tables/{name}.{f}" for name in table_names() for f in formats]


def _table_outputs():
    out = {}
    for name in table_names():
        for fmt in TABLE_FORMATS:
            path = f"{R}/tables/{name}.{fmt}"
            if fmt == "html":
                # the caption is an output of this rule; an absolute path, since Snakemake reads a
                # relative one beside this file
                path = report(path, caption=os.path.abspath(f"{R}/tables/{name}.rst"), category="Tables",
                              labels={"table": name.replace("_", " ")})
            out[f"{name}_{fmt}"] = path
    return out


def _run_dirs(files) -> str:
    return " ".join(shlex.quote(os.path.dirname(f)) for f in files)


def _quoted(files) -> str:
    return " ".join(shlex.quote(f) for f in files)


def _per_example_files() -> list[str]:
    # the .npz beside each evaluation (same stem): the tables' intervals and comparisons read them
    return [os.path.splitext(f)[0] + ".npz" for f in all_evaluations() + all_zoo_evaluations()]


def _comparisons_arg() -> str:
    # config `report: comparisons:` maps a method to its baselines, e.g. {gmr: [fgsm, rfgsm, pgd]};
    # absent: `gmr tables` compares GMR with FGSM-AT, R-FGSM-AT and PGD-AT where present
    pairs = pair_specs((config.get("report") or {}).get("comparisons"))
    return ("--comparisons " + _quoted(pairs)) if pairs else ""


rule tables:
    input:
        runs=all_run_jsons(),
        evals=all_evaluations() + all_zoo_evaluations(),
        per_example=_per_example_files(),
        audits=all_audits() + all_zoo_audits(),
    output:
        **_table_outputs(),
    log:
        R + "/logs/tables.log",
    params:
        runs=lambda wc, input: _run_dirs(input.runs),
        evals=lambda wc, input: _quoted(input.evals),
        audits=lambda wc, input: ("--audits " + _quoted(input.audits)) if input.audits else "",
        out=R + "/tables",
        comparisons=_comparisons_arg(),
    threads: resources("summary")["threads"]
    resources:
        **job_resources("summary"),
    shell:
        "{GMR} tables --runs {params.runs} --evals {params.evals} {params.audits} {params.comparisons} "
        "--out {params.out:q} > {log:q} 2>&1"


rule plots:
    input:
        runs=all_run_jsons(),
        evals=all_evaluations(),
        audits=all_audits(),
    output:
        figures=report(directory(R + "/figures"), patterns=["{name}.png"], caption="../report/figures.rst",
                       category="Figures", labels={"figure": "{name}"}),
    log:
        R + "/logs/plots.log",
    params:
        runs=lambda wc, input: _run_dirs(input.runs),
        evals=lambda wc, input: _quoted(input.evals),
        diagnostics=lambda wc, input: ("--diagnostics " + _run_dirs(input.audits)) if input.audits else "",
    threads: resources("summary")["threads"]
    resources:
        **job_resources("summary"),
    shell:
        "{GMR} plots --runs {params.runs} --evals {params.evals} {params.diagnostics} --out {output.figures:q} "
        "> {log:q} 2>&1"
