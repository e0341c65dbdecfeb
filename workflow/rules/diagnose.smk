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
        run=lambda wc, input: os.path.dirname(input.run),
        out=lambda wc, output: os.path.dirname(output.audit),
        args=_diagnose_args,
    # on the path to the audit and the last jobs of a study: start them as soon as they are ready
    priority: 1
    threads: resources("diagnose")["threads"]
    resources:
        **job_resources("diagnose"),
    shell:
        "{GMR} diagnose --run {params.run:q} --out {params.out:q} {params.args} --threads {threads} "
        "> {log:q} 2>&1"
