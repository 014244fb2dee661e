"""params.yaml: loaded once, validated against the schema, sliced per stage."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from .errors import UserError

SCHEMA_PATH = Path(__file__).with_name("params.schema.yaml")


def schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return ".".join(filter(None, [path, extra[0] if extra else ""]))
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return ".".join(filter(None, [path, missing[0] if missing else ""]))
    return path or "<root>"


def validate(params: dict, source: str = "params") -> dict:
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(params), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        e = errors[0]
        what = {
            "additionalProperties": "unknown key",
            "required": "missing key",
        }.get(e.validator, e.message)
        raise UserError(f"{source}: {_key(e)}: {what}")
    return params


def load(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping of stage sections")
    return validate(params, str(path))
