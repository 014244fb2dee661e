rule build_corpus:
    input:
        code=codedeps.files("adaptive_inference.corpus"),
    output:
        directory("artifacts/corpus"),
    params:
        section=config["corpus"],
    log:
        "logs/build_corpus.log",
    threads: res("default", "cpus")
    resources:
        mem_mb=res("default", "mem_mb"),
        runtime=res("default", "runtime"),
    conda:
        "../envs/adaptive-inference.yaml"
    shell:
        "adaptive-inference build-corpus --params params.yaml --out {output} > {log} 2>&1"


rule cache_hidden:
    input:
        code=codedeps.files("adaptive_inference.hidden_cache"),
        model="artifacts/model",
        corpus="artifacts/corpus",
    output:
        directory("artifacts/hidden"),
    params:
        section=config["cache_hidden"],
    log:
        "logs/cache_hidden.log",
    threads: res("cache_hidden", "cpus")
    resources:
        mem_mb=res("cache_hidden", "mem_mb"),
        runtime=res("cache_hidden", "runtime"),
    conda:
        "../envs/adaptive-inference.yaml"
    cache: "omit-software"
    shell:
        "adaptive-inference cache-hidden --params params.yaml --model {input.model} --corpus {input.corpus} --out {output} > {log} 2>&1"
