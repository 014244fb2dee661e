"""Every artifact folder carries MANIFEST.json: input hashes by role, params, the hash of the stage's own code,
package versions. Nothing volatile (time, host, paths, git state) goes in it, so a deterministic stage gives a
byte-identical folder for identical inputs, params and code wherever it runs; those facts go to the log."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import __version__, atomic
from .errors import UserError

MANIFEST = "MANIFEST.json"
_PACKAGES = ("torch", "transformers", "mlx", "mlx-lm", "numpy", "safetensors", "faiss-cpu")
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """Hash of a file, or of a folder's files (relative names + contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise UserError(f"input not found: {path}")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def input_digest(path: str | Path) -> str:
    """An artifact folder is named by its manifest's digest (cheap); anything else is hashed."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return read(path)["digest"]
    return sha256_path(path)


def code_version() -> str:
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return f"{__version__}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def code_digest(stage: str) -> str | None:
    """sha256 over the source files the stage's code reaches (codedeps); None for a stage it does not know."""
    from . import codedeps

    files = codedeps.stage_files(stage)
    if not files:
        return None
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode())
        h.update(sha256_file(root / f).encode())
    return h.hexdigest()


def write(folder: str | Path, *, stage: str, inputs: dict[str, str | Path], params: dict,
          outputs: dict | None = None, extra: dict | None = None) -> dict:
    """Write MANIFEST.json into `folder` (usually the temp dir of atomic.output_dir)."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): sha256_file(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    body = {
        "stage": stage,
        "inputs": {k: {"sha256": input_digest(v)} for k, v in inputs.items()},
        "params": params,
        "code": code_digest(stage),
        "files": files,
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    manifest = {**body, "digest": digest, "outputs": outputs or {}, "version": __version__,
                "packages": package_versions(), **(extra or {})}
    atomic.write_json(folder / MANIFEST, manifest)
    print(f"{stage}: wrote digest {digest[:12]} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} on "
          f"{socket.gethostname()} ({platform.system()}-{platform.machine()}), code {code_version()}",
          file=sys.stderr, flush=True)
    return manifest


def read(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"artifact has no {MANIFEST}: {folder} (run its stage first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt manifest {path}: {e.msg}") from None


def verify(folder: str | Path, *, stage: str | None = None) -> dict:
    """Check that an artifact folder is whole: every listed file present with its hash."""
    folder = Path(folder)
    m = read(folder)
    if stage and m.get("stage") != stage:
        raise UserError(f"{folder} was made by stage {m.get('stage')!r}, expected {stage!r}")
    for rel, digest in m.get("files", {}).items():
        f = folder / rel
        if not f.is_file():
            raise UserError(f"corrupt artifact {folder}: missing {rel}")
        if sha256_file(f) != digest:
            raise UserError(f"corrupt artifact {folder}: {rel} does not match its manifest hash")
    return m


def read_json(folder: str | Path, stage: str, name: str) -> dict:
    """A JSON file of a verified artifact of `stage`; a corrupt one is a one-line UserError."""
    verify(folder, stage=stage)
    try:
        return json.loads((Path(folder) / name).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt artifact {folder}: {name}: {e}") from None
