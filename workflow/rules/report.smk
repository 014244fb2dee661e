rule report:
    input:
        code=[
            "src/adaptive_inference/report.py",
        ],
        results="artifacts/benchmark",
    output:
        md="reports/report.md",
        html="reports/report.html",
        metrics="reports/metrics.json",
        plots=expand("reports/{plot}.png", plot=["speed_quality", "batch_throughput"]),
    params:
        section=config["report"],
    log:
        "logs/report.log",
    conda:
        "../envs/adaptive-inference.yaml"
    shell:
        "adaptive-inference report --params params.yaml --results {input.results} --out reports > {log} 2>&1"
