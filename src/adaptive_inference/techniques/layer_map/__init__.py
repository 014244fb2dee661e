"""Category layer map (seed 001, AIS): a FAISS map from the prompt's early-layer embedding to a category,
each category with its own layers to skip (hard) or blend (soft)."""

from .. import Technique

TECHNIQUES = [Technique("category_map", artifacts={"layer_map": "build_layer_map", "layer_importance": "layer_importance"},
                        policy=".layer_map.apply:policy",
                        options={"mode": "hard", "budget": 0.25, "alpha": 0.7, "scope": "category"})]
STAGES = []
SUMMARIES = {}
