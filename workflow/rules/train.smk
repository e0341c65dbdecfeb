# Training: one job per (experiment, method, eps, seed).
#
# Only run.json is declared as output: it is written last, atomically, once the run is complete.
# The checkpoints beside it (checkpoint.pt, model_*.pt, train_log.csv) are not outputs, so when a job
# is interrupted or fails, Snakemake deletes nothing of them, and the next invocation of the workflow
# starts the job again and `gmr train` resumes after the last finished epoch.
#
# Every key of the train section becomes a `gmr train` option (train_args), train.precision too. A job
# of a GPU study (resources.train.gpu > 0) starts through gmr/gpu_slots.py, which gives it its own GPU,
# or a place on one shared by gpus.jobs_per_gpu jobs (gpu_slot_prefix; empty for CPU jobs).


rule train:
    input:
        data=lambda wc: R + f"/data/{experiment(wc)['dataset']}.txt",
    output:
        run=RUN_DIR + "/run.json",
    log:
        LOG.format(rule="train", exp="{exp}", method="{method}", eps="{eps}", seed="{seed}") + ".log",
    benchmark:
        BENCH.format(rule="train", exp="{exp}", method="{method}", eps="{eps}", seed="{seed}") + ".tsv"
    params:
        out=lambda wc, output: os.path.dirname(output.run),
        args=train_args,
        slot=gpu_slot_prefix("train"),
    threads: resources("train")["threads"]
    resources:
        **job_resources("train"),
    shell:
        "{params.slot}{GMR} train --out {params.out:q} {params.args} --threads {threads} --no-progress > {log:q} 2>&1"
