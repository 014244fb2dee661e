# One rule per technique stage, from the technique registry: a new technique package brings its rules.
for st in techniques.stages():

    rule:
        name:
            st.section
        input:
            code=codedeps.files(codedeps.stage_module(st.call)),
            **{arg: f"artifacts/{folder}" for arg, folder in st.inputs.items()},
        output:
            directory(f"artifacts/{st.out}"),
        params:
            section=config[st.section],
            # the command is bound here: a shell body is formatted at run time, after the loop has moved on
            cmd=f"adaptive-inference {st.name} --params params.yaml "
            + "".join(f"--{arg} artifacts/{folder} " for arg, folder in st.inputs.items())
            + f"--out artifacts/{st.out}",
        log:
            f"logs/{st.section}.log",
        threads: res("technique", "cpus")
        resources:
            mem_mb=res("technique", "mem_mb"),
            runtime=res("technique", "runtime"),
        cache: "omit-software"  # shareable between checkouts: --cache with SNAKEMAKE_OUTPUT_CACHE
        conda:
            "../envs/adaptive-inference.yaml"
        shell:
            "{params.cmd} > {log} 2>&1"
