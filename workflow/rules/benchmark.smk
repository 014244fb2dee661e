# The benchmark matrix: one job per (backend, configuration) and one library-reference job per backend.
# Timing jobs take the `timing` resource (one unit exists: workflow/profiles/default), so two never overlap;
# cpus / mem_mb / runtime / gpu come from params.yaml `resources` (what a cluster scheduler is asked for).


rule benchmark:
    input:
        code=lambda w: jobs.job_code(BENCH, w.cfg),
        model="artifacts/model",
        corpus="artifacts/corpus",
        artifacts=lambda w: jobs.job_artifacts(BENCH, w.cfg),
    output:
        directory("artifacts/benchmark/{backend}/{cfg}"),
    wildcard_constraints:
        backend="|".join(BENCH["backends"]),
        cfg="|".join(BENCH["configs"]),
    params:
        job=lambda w: jobs.job_params(BENCH, w.cfg),
    log:
        "logs/benchmark/{backend}/{cfg}.log",
    threads: res("benchmark", "cpus")
    resources:
        mem_mb=res("benchmark", "mem_mb"),
        runtime=res("benchmark", "runtime"),
        gpu=lambda w: RES.get("gpus", {}).get(w.backend, 0),
        timing=1,
    conda:
        "../envs/adaptive-inference.yaml"
    shell:
        "adaptive-inference benchmark --params params.yaml --backend {wildcards.backend} --config {wildcards.cfg} --model {input.model} --corpus {input.corpus} --artifacts {input.artifacts} --out {output} > {log} 2>&1"


rule benchmark_reference:
    input:
        code=jobs.job_code(BENCH, None),
        model="artifacts/model",
        corpus="artifacts/corpus",
    output:
        directory("artifacts/benchmark/{backend}/reference"),
    wildcard_constraints:
        backend="|".join(BENCH["backends"]),
    params:
        job=jobs.job_params(BENCH, None),
    log:
        "logs/benchmark/{backend}/reference.log",
    threads: res("benchmark", "cpus")
    resources:
        mem_mb=res("benchmark", "mem_mb"),
        runtime=res("benchmark", "runtime"),
        gpu=lambda w: RES.get("gpus", {}).get(w.backend, 0),
        timing=1,
    conda:
        "../envs/adaptive-inference.yaml"
    shell:
        "adaptive-inference benchmark-reference --params params.yaml --backend {wildcards.backend} --model {input.model} --corpus {input.corpus} --out {output} > {log} 2>&1"
