rule benchmark:
    input:
        model="artifacts/model",
        corpus="artifacts/corpus",
    output:
        directory("artifacts/benchmark"),
    params:
        section=config["benchmark"],
    log:
        "logs/benchmark.log",
    threads: workflow.cores  # timings need the machine to themselves
    conda:
        "../envs/adaptive-inference.yaml"
    shell:
        "adaptive-inference benchmark --params params.yaml --model {input.model} --corpus {input.corpus} --out {output} > {log} 2>&1"
