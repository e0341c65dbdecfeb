# Evaluation: the white-box suite on the first n test points, for the selected (best) and the last
# model, and AutoAttack (standard) on its own, usually smaller, subset. The last model's job depends on
# the selected model's result and passes it as `gmr evaluate --reuse-from`: when the run selected its
# last epoch (same weights, seeded attacks) the result is copied instead of computed again.


def _eval_inputs(kind):
    def inputs(wc):
        files = {"run": (RUN_DIR + "/run.json").format(**wc)}
        if _reuse_best(wc, kind):
            files["best"] = (EVAL_DIR + "/best{kind}.json").format(**wc, kind=kind)
        return files
    return inputs


def _reuse_best(wc, kind) -> bool:
    ev = experiment(wc)["evaluate"]
    checkpoints = ev["autoattack"]["checkpoints"] if kind else ev["checkpoints"]
    return wc.ckpt == "last" and "best" in checkpoints


def _reuse_arg(kind):
    def arg(wc, input):
        return f"--reuse-from {shlex.quote(input.best)}" if _reuse_best(wc, kind) else ""
    return arg


def _whitebox_args(wc) -> str:
    ev = experiment(wc)["evaluate"]
    return " ".join([
        "--attacks", ",".join(ev["attacks"]), n_test_arg(ev["n_test"]),
        "--batch-size", str(ev["batch_size"]), "--seed", str(ev["seed"]),
        "--device", config["device"], attack_params_args(ev, ev["attacks"])])


def _autoattack_args(wc) -> str:
    # PGD runs again on the AutoAttack subset (cheap): the audit compares the two on the same points.
    ev = experiment(wc)["evaluate"]
    attacks = [a for a in ("clean", "pgd") if a in ev["attacks"]] + ["autoattack"]
    return " ".join([
        "--attacks", ",".join(attacks), n_test_arg(ev["autoattack"]["n_test"]),
        attack_params_args(ev, attacks),
        "--batch-size", str(ev["batch_size"]), "--seed", str(ev["seed"]), "--device", config["device"]])


rule evaluate:
    input:
        unpack(_eval_inputs("")),
    output:
        json=EVAL_DIR + "/{ckpt}.json",
        npz=EVAL_DIR + "/{ckpt}.npz",
    log:
        LOG.format(rule="evaluate", exp="{exp}", method="{method}", eps="{eps}", seed="{seed}") + "-{ckpt}.log",
    benchmark:
        BENCH.format(rule="evaluate", exp="{exp}", method="{method}", eps="{eps}", seed="{seed}") + "-{ckpt}.tsv"
    params:
        run=lambda wc, input: os.path.dirname(input.run),
        args=_whitebox_args,
        reuse=_reuse_arg(""),
    threads: resources("evaluate")["threads"]
    resources:
        **job_resources("evaluate"),
    shell:
        "{GMR} evaluate --run {params.run:q} --checkpoint {wildcards.ckpt} {params.args} {params.reuse} "
        "--threads {threads} --out {output.json:q} > {log:q} 2>&1"


rule autoattack:
    input:
        unpack(_eval_inputs("-autoattack")),
    output:
        json=EVAL_DIR + "/{ckpt}-autoattack.json",
        npz=EVAL_DIR + "/{ckpt}-autoattack.npz",
    log:
        LOG.format(rule="autoattack", exp="{exp}", method="{method}", eps="{eps}", seed="{seed}") + "-{ckpt}.log",
    benchmark:
        BENCH.format(rule="autoattack", exp="{exp}", method="{method}", eps="{eps}", seed="{seed}") + "-{ckpt}.tsv"
    params:
        run=lambda wc, input: os.path.dirname(input.run),
        args=_autoattack_args,
        reuse=_reuse_arg("-autoattack"),
    # on the path to the audit and the last jobs of a study: start them as soon as they are ready
    priority: 1
    threads: resources("autoattack")["threads"]
    resources:
        **job_resources("autoattack"),
    shell:
        "{GMR} evaluate --run {params.run:q} --checkpoint {wildcards.ckpt} {params.args} {params.reuse} "
        "--threads {threads} --out {output.json:q} > {log:q} 2>&1"
