# gpu_bench: only where params.yaml's gpu_bench.enabled (a CUDA machine); the report then shows its results first.
GPU_RUNS = ["artifacts/gpu_bench"] if config.get("gpu_bench", {}).get("enabled") else []

if GPU_RUNS:

    rule gpu_bench:
        input:
            code=codedeps.files("adaptive_inference.bench.cuda_techniques"),
        output:
            directory("artifacts/gpu_bench"),
        params:
            section=config["gpu_bench"],
        log:
            "logs/gpu_bench.log",
        threads: res("benchmark", "cpus")
        resources:
            mem_mb=res("benchmark", "mem_mb"),
            runtime=res("benchmark", "runtime"),
            gpu=1,
        conda:
            "../envs/adaptive-inference.yaml"
        shell:
            "adaptive-inference gpu-bench --params params.yaml --out {output} > {log} 2>&1"
