# Helpers shared by the rules: the technique registry, job lists and code deps (light imports only).
from adaptive_inference import codedeps, techniques
from adaptive_inference.bench import jobs

BENCH = config["benchmark"]
RES = config["resources"]


def res(kind, key):
    """A job's resource from params.yaml's `resources` (its kind's value, else the default)."""
    return RES.get(kind, {}).get(key, RES["default"].get(key))
