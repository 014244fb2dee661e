rule report:
    input:
        code=[
            "src/adaptive_inference/report.py",
        ],
        results="artifacts/benchmark",
        techniques=["artifacts/profile_ffn", "artifacts/lobotomy", "artifacts/router"],
    output:
        md="reports/report.md",
        html="reports/report.html",
        metrics="reports/metrics.json",
        plots=expand("reports/{plot}.png", plot=["speed_quality", "batch_throughput", "ffn_profile"]),
    params:
        section=config["report"],
    log:
        "logs/report.log",
    conda:
        "../envs/adaptive-inference.yaml"
    shell:
        "adaptive-inference report --params params.yaml --results {input.results} --artifacts {input.techniques} --out reports > {log} 2>&1"
