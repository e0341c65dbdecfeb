# Gradient-masking audit of one model (diagnose.checkpoint: best or last) of the chosen runs
# (`gmr diagnose`). Only audit.json is declared; the probe CSVs and figures beside it are read by
# `gmr plots`.


def _diagnose_inputs(wc):
    run = Run(wc.exp, wc.method, wc.eps, int(wc.seed))
    files = {"run": run_json(run)}
    evals = evaluations(run)
    # One evaluation goes with the audit: the AutoAttack one (it holds PGD and AutoAttack on the same
    # points, for the flags and the PGD - AutoAttack gap), else the white-box one.
    ckpt = experiment(wc)["diagnose"]["checkpoint"]
    aa = (EVAL_DIR + "/{ckpt}-autoattack.json").format(**wc, ckpt=ckpt)
    whitebox = (EVAL_DIR + "/{ckpt}.json").format(**wc, ckpt=ckpt)
    files["evals"] = [f for f in (aa, whitebox) if f in evals][:1]
    return files


def _diagnose_args(wc, input) -> str:
    d = experiment(wc)["diagnose"]
    args = ["--checkpoint", d["checkpoint"], "--n-test", str(d["n_test"]), "--seed", str(d["seed"]),
            "--device", config["device"]]
    if d["n_curve"]:
        args += ["--n-curve", str(d["n_curve"])]
    if d["quick"]:
        args.append("--quick")
    for f in input.evals:
        args += ["--eval", f]
    return " ".join(shlex.quote(a) for a in args)


rule diagnose:
    input:
        unpack(_diagnose_inputs),
    output:
        audit=DIAG_DIR + "/audit.json",
    log:
        LOG.format(rule="diagnose", exp="{exp}", method="{method}", eps="{eps}", seed="{seed}") + ".log",
    benchmark:
        BENCH.format(rule="diagnose", exp="{exp}", method="{method}", eps="{eps}", seed="{seed}") + ".tsv"
    params:
        slot=gpu_slot_prefix("diagnose"),
        run=lambda wc, input: os.path.dirname(input.run),
        out=lambda wc, output: os.path.dirname(output.audit),
        args=_diagnose_args,
    # on the path to the audit and the last jobs of a study: start them as soon as they are ready
    priority: 1
    threads: resources("diagnose")["threads"]
    resources:
        **job_resources("diagnose"),
    shell:
        "{params.slot}{GMR} diagnose --run {params.run:q} --out {params.out:q} {params.args} --threads {threads} "
        "> {log:q} 2>&1"


# The masking audit of each RobustBench model of an experiment (`gmr diagnose --zoo`), with the
# experiment's diagnose settings and the zoo model's AutoAttack evaluation (else its white-box one).

ZOO_DIAG_DIR = R + "/diagnostics/{exp}/zoo/{zoo}/eps{eps}"


def zoo_audited(entry) -> bool:
    return EXPERIMENTS[entry.exp]["diagnose"]["enabled"]


def all_zoo_audits() -> list[str]:
    return [(ZOO_DIAG_DIR + "/audit.json").format(**e.wildcards) for e in all_zoo_entries() if zoo_audited(e)]


def _zoo_diagnose_inputs(wc):
    evals = zoo_evaluations(ZooEntry(wc.exp, wc.zoo, wc.eps))
    return {"data": _zoo_data(wc), "evals": [f for f in evals if f.endswith("-autoattack.json")][:1] or evals[:1]}


def _zoo_diagnose_args(wc, input) -> str:
    d = experiment(wc)["diagnose"]
    args = ["--n-test", str(d["n_test"]), "--seed", str(d["seed"]), "--device", config["device"]]
    if d["n_curve"]:
        args += ["--n-curve", str(d["n_curve"])]
    if d["quick"]:
        args.append("--quick")
    for f in input.evals:
        args += ["--eval", f]
    return " ".join(shlex.quote(a) for a in args)


rule zoo_diagnose:
    input:
        unpack(_zoo_diagnose_inputs),
    output:
        audit=ZOO_DIAG_DIR + "/audit.json",
    log:
        ZOO_LOG.format(rule="zoo_diagnose", exp="{exp}", zoo="{zoo}", eps="{eps}") + ".log",
    benchmark:
        ZOO_BENCH.format(rule="zoo_diagnose", exp="{exp}", zoo="{zoo}", eps="{eps}") + ".tsv"
    params:
        slot=gpu_slot_prefix("diagnose"),
        subject=_zoo_subject_args,
        out=lambda wc, output: os.path.dirname(output.audit),
        args=_zoo_diagnose_args,
    priority: 1
    threads: resources("diagnose")["threads"]
    resources:
        **job_resources("diagnose"),
    shell:
        "{params.slot}{GMR} diagnose {params.subject} --out {params.out:q} {params.args} --threads {threads} > {log:q} 2>&1"
