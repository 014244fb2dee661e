# Wiring only: every rule calls one `adaptive-inference` stage; dvc.yaml calls the same commands.
from snakemake.utils import min_version, validate

min_version("8.20")


configfile: "params.yaml"


validate(config, "workflow/schemas/params.schema.yaml")


include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/techniques.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        "artifacts/hidden",
        "reports/report.html",
        "reports/metrics.json",
    default_target: True
