# Data: fill the data root once per dataset (MNIST from the offline copy, others from torchvision).


rule prepare_data:
    output:
        R + "/data/{dataset}.txt",
    log:
        R + "/logs/prepare_data/{dataset}.log",
    params:
        root=config["data_root"],
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "{GMR} prepare-data --dataset {wildcards.dataset} --data-root {params.root:q} > {output:q} 2> {log:q}"
