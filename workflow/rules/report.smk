rule report:
    input:
        code=codedeps.files("adaptive_inference.report"),
        results=jobs.job_folders(BENCH),
        techniques=jobs.technique_folders(BENCH),
        gpu=config["report"]["gpu_results"],
        gpu_runs=GPU_RUNS,
    output:
        md="reports/report.md",
        html="reports/report.html",
        metrics="reports/metrics.json",
        plots=expand("reports/{plot}.png", plot=["speed_quality", "batch_throughput", "pareto"]),
    params:
        section=config["report"],
        gpu_runs=" ".join(["--gpu-runs", *GPU_RUNS]) if GPU_RUNS else "",
    log:
        "logs/report.log",
    threads: res("report", "cpus")
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../envs/adaptive-inference.yaml"
    shell:
        "adaptive-inference report --params params.yaml --results {input.results} --artifacts {input.techniques} {params.gpu_runs} --out reports > {log} 2>&1"
