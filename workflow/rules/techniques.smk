rule train_vocab_router:
    input:
        code=[
            "src/adaptive_inference/techniques/vocab_router/train.py",
        ],
        hidden="artifacts/hidden",
    output:
        directory("artifacts/router"),
    params:
        section=config["train_vocab_router"],
    log:
        "logs/train_vocab_router.log",
    conda:
        "../envs/adaptive-inference.yaml"
    shell:
        "adaptive-inference train-vocab-router --params params.yaml --hidden {input.hidden} --out {output} > {log} 2>&1"


rule profile_ffn:
    input:
        code=[
            "src/adaptive_inference/techniques/lobotomy/stages.py",
            "src/adaptive_inference/torch_backend.py",
        ],
        model="artifacts/model",
        corpus="artifacts/corpus",
    output:
        directory("artifacts/profile_ffn"),
    params:
        section=config["profile_ffn"],
    log:
        "logs/profile_ffn.log",
    conda:
        "../envs/adaptive-inference.yaml"
    threads: workflow.cores
    shell:
        "adaptive-inference profile-ffn --params params.yaml --model {input.model} --corpus {input.corpus} --out {output} > {log} 2>&1"


rule make_lobotomy:
    input:
        code=[
            "src/adaptive_inference/techniques/lobotomy/stages.py",
        ],
        profile="artifacts/profile_ffn",
        model="artifacts/model",
        corpus="artifacts/corpus",
    output:
        directory("artifacts/lobotomy"),
    params:
        section=config["make_lobotomy"],
    log:
        "logs/make_lobotomy.log",
    conda:
        "../envs/adaptive-inference.yaml"
    threads: workflow.cores
    shell:
        "adaptive-inference make-lobotomy --params params.yaml --profile {input.profile} --model {input.model} --corpus {input.corpus} --out {output} > {log} 2>&1"
