# Tables (`gmr tables`) and figures (`gmr plots`) across all runs, marked for `snakemake --report`.

TABLE_FORMATS = ["csv", "md", "tex", "html"]


def table_names() -> list[str]:
    return [f"robustness_{d}" for d in DATASETS] + ["reference", "cost", "masking"]


def table_files(fmt=None) -> list[str]:
    formats = [fmt] if fmt else TABLE_FORMATS
    return [f"{R}/tables/{name}.{f}" for name in table_names() for f in formats]


def _run_dirs(files) -> str:
    return " ".join(shlex.quote(os.path.dirname(f)) for f in files)


def _quoted(files) -> str:
    return " ".join(shlex.quote(f) for f in files)


def _table_outputs():
    out = {}
    for name in table_names():
        for fmt in TABLE_FORMATS:
            path = f"{R}/tables/{name}.{fmt}"
            if fmt == "html":
                caption = "../report/robustness.rst" if name.startswith("robustness_") else f"../report/{name}.rst"
                path = report(path, caption=caption, category="Tables",
                              labels={"table": name.replace("_", " ")})
            out[f"{name}_{fmt}"] = path
    return out


rule tables:
    input:
        runs=all_run_jsons(),
        evals=all_evaluations(),
        audits=all_audits(),
    output:
        **_table_outputs(),
    log:
        R + "/logs/tables.log",
    params:
        runs=lambda wc, input: _run_dirs(input.runs),
        evals=lambda wc, input: _quoted(input.evals),
        audits=lambda wc, input: ("--audits " + _quoted(input.audits)) if input.audits else "",
        out=R + "/tables",
    threads: resources("summary")["threads"]
    resources:
        **job_resources("summary"),
    shell:
        "{GMR} tables --runs {params.runs} --evals {params.evals} {params.audits} --out {params.out:q} "
        "> {log:q} 2>&1"


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
