# Helpers shared by the rules: the technique registry, job lists and code deps (light imports only).
from adaptive_inference import codedeps, techniques
from adaptive_inference.bench import jobs

BENCH = config["benchmark"]
