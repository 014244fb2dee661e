rule prepare_model:
    input:
        code=[
            "src/adaptive_inference/prepare_model.py",
        ],
    output:
        directory("artifacts/model"),
    params:
        section=config["model"],
    log:
        "logs/prepare_model.log",
    conda:
        "../envs/adaptive-inference.yaml"
    cache: "omit-software"
    shell:
        "adaptive-inference prepare-model --params params.yaml --out {output} > {log} 2>&1"
