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
        slot=gpu_slot_prefix("evaluate"),
        run=lambda wc, input: os.path.dirname(input.run),
        args=_whitebox_args,
        reuse=_reuse_arg(""),
    threads: resources("evaluate")["threads"]
    resources:
        **job_resources("evaluate"),
    shell:
        "{params.slot}{GMR} evaluate --run {params.run:q} --checkpoint {wildcards.ckpt} {params.args} {params.reuse} "
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
        slot=gpu_slot_prefix("autoattack"),
        run=lambda wc, input: os.path.dirname(input.run),
        args=_autoattack_args,
        reuse=_reuse_arg("-autoattack"),
    # on the path to the audit and the last jobs of a study: start them as soon as they are ready
    priority: 1
    threads: resources("autoattack")["threads"]
    resources:
        **job_resources("autoattack"),
    shell:
        "{params.slot}{GMR} evaluate --run {params.run:q} --checkpoint {wildcards.ckpt} {params.args} {params.reuse} "
        "--threads {threads} --out {output.json:q} > {log:q} 2>&1"


# RobustBench models (`zoo_models:` of an experiment): the same white-box suite and AutoAttack, on the same
# test points and at each budget of the experiment, on the zoo model's published weights (`gmr evaluate
# --zoo`; a checkpoint missing from `zoo: model_dir:` is downloaded by the job).

ZOO_EVAL_DIR = R + "/eval/{exp}/zoo/{zoo}/eps{eps}"
ZOO_LOG = R + "/logs/{rule}/{exp}/zoo/{zoo}/eps{eps}"
ZOO_BENCH = R + "/benchmarks/{rule}/{exp}/zoo/{zoo}/eps{eps}"


class ZooEntry(NamedTuple):
    exp: str
    zoo: str
    eps: str      # label

    @property
    def wildcards(self) -> dict:
        return dict(exp=self.exp, zoo=self.zoo, eps=self.eps)


def all_zoo_entries() -> list[ZooEntry]:
    return [ZooEntry(name, model, label) for name, exp in EXPERIMENTS.items()
            for model in exp["zoo_models"] for label in exp["eps"]]


def zoo_evaluations(entry: ZooEntry) -> list[str]:
    """The evaluation files of a zoo model: white-box, and AutoAttack where the experiment runs it."""
    files = [(ZOO_EVAL_DIR + "/published.json").format(**entry.wildcards)]
    if EXPERIMENTS[entry.exp]["evaluate"]["autoattack"]["n_test"] != 0:
        files.append((ZOO_EVAL_DIR + "/published-autoattack.json").format(**entry.wildcards))
    return files


def all_zoo_evaluations() -> list[str]:
    return [f for e in all_zoo_entries() for f in zoo_evaluations(e)]


def _zoo_subject_args(wc) -> str:
    exp = experiment(wc)
    if wc.zoo not in exp["zoo_models"] or wc.eps not in exp["eps"]:
        raise ValueError(f"no zoo model {wc.zoo} at eps{wc.eps} in experiment {wc.exp}")
    return " ".join(shlex.quote(a) for a in [
        "--zoo", wc.zoo, "--dataset", exp["dataset"], "--model-dir", config["zoo"]["model_dir"],
        "--data-root", config["data_root"], "--eps", repr(exp["eps"][wc.eps])])


def _zoo_data(wc) -> str:
    return f"{R}/data/{experiment(wc)['dataset']}.txt"


rule zoo_evaluate:
    input:
        _zoo_data,
    output:
        json=ZOO_EVAL_DIR + "/published.json",
        npz=ZOO_EVAL_DIR + "/published.npz",
    log:
        ZOO_LOG.format(rule="zoo_evaluate", exp="{exp}", zoo="{zoo}", eps="{eps}") + ".log",
    benchmark:
        ZOO_BENCH.format(rule="zoo_evaluate", exp="{exp}", zoo="{zoo}", eps="{eps}") + ".tsv"
    params:
        slot=gpu_slot_prefix("evaluate"),
        subject=_zoo_subject_args,
        args=_whitebox_args,
    threads: resources("evaluate")["threads"]
    resources:
        **job_resources("evaluate"),
    shell:
        "{params.slot}{GMR} evaluate {params.subject} {params.args} --threads {threads} --out {output.json:q} > {log:q} 2>&1"


rule zoo_autoattack:
    input:
        _zoo_data,
    output:
        json=ZOO_EVAL_DIR + "/published-autoattack.json",
        npz=ZOO_EVAL_DIR + "/published-autoattack.npz",
    log:
        ZOO_LOG.format(rule="zoo_autoattack", exp="{exp}", zoo="{zoo}", eps="{eps}") + ".log",
    benchmark:
        ZOO_BENCH.format(rule="zoo_autoattack", exp="{exp}", zoo="{zoo}", eps="{eps}") + ".tsv"
    params:
        slot=gpu_slot_prefix("autoattack"),
        subject=_zoo_subject_args,
        args=_autoattack_args,
    priority: 1
    threads: resources("autoattack")["threads"]
    resources:
        **job_resources("autoattack"),
    shell:
        "{params.slot}{GMR} evaluate {params.subject} {params.args} --threads {threads} --out {output.json:q} > {log:q} 2>&1"
