rule prepare_model:
    input:
        code=codedeps.files("adaptive_inference.prepare_model"),
    output:
        directory("artifacts/model"),
    params:
        section=config["model"],
    log:
        "logs/prepare_model.log",
    threads: res("default", "cpus")
    resources:
        mem_mb=res("default", "mem_mb"),
        runtime=res("default", "runtime"),
    conda:
        "../envs/adaptive-inference.yaml"
    cache: "omit-software"
    shell:
        "adaptive-inference prepare-model --params params.yaml --out {output} > {log} 2>&1"
