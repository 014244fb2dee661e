rule benchmark:
    input:
        code=[
            "src/adaptive_inference/benchmark.py",
            "src/adaptive_inference/generation.py",
            "src/adaptive_inference/torch_backend.py",
            "src/adaptive_inference/mlx_backend.py",
            "src/adaptive_inference/techniques/__init__.py",
            "src/adaptive_inference/techniques/lobotomy/stages.py",
            "src/adaptive_inference/techniques/vocab_router/train.py",
        ],
        model="artifacts/model",
        corpus="artifacts/corpus",
        router="artifacts/router",
        lobotomy="artifacts/lobotomy",
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
        "adaptive-inference benchmark --params params.yaml --model {input.model} --corpus {input.corpus} --artifacts {input.router} {input.lobotomy} --out {output} > {log} 2>&1"
