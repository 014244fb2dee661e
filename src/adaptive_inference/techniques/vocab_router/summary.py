"""The router's block in the report."""

from __future__ import annotations

import json
from pathlib import Path


def blocks(artifact: Path) -> list[tuple]:
    from ... import manifest

    m = manifest.read(artifact)
    r = json.loads((artifact / "router.json").read_text())
    c = r["calib"]
    return [("p", f"Vocab router [{m['stage']}:{m['digest'][:12]}]: {r['sizes']['common_ids']} common ids "
                  f"({r['common']['share_of_vocab']:.1%} of the vocabulary) cover {r['common']['coverage']:.1%} "
                  f"of train tokens; router {r['sizes']['router_params']} params, threshold {r['threshold']:.3f}; "
                  f"on calib: recall of rare steps {c['recall']:.1%}, precision {c['precision']:.1%}, common head "
                  f"on {c['common_head_rate']:.1%} of steps (rare steps {c['rare_rate']:.1%}).")]
