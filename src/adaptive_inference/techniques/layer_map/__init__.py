"""Category layer map (seed 001, AIS): a FAISS map from the prompt's early-layer embedding to a category,
each category with its own layers to skip (hard) or blend (soft)."""

from .. import Stage, Technique

TECHNIQUES = [Technique("category_map", artifacts={"layer_map": "build_layer_map", "layer_importance": "layer_importance"},
                        policy=".layer_map.apply:policy",
                        options={"mode": "hard", "budget": 0.25, "alpha": 0.7, "scope": "category"})]
STAGES = [
    Stage("build-layer-map", "build_layer_map", ".layer_map.map:build",
          "FAISS map from early-layer prompt embeddings (hidden cache) to categories; k-NN accuracy on eval.",
          out="layer_map", inputs={"hidden": "hidden", "corpus": "corpus", "model": "model"}),
    Stage("layer-importance", "layer_importance", ".layer_map.importance:build",
          "Per category and layer, the KL of skipping that layer alone; skip sets per budget.",
          out="layer_importance", inputs={"model": "model", "corpus": "corpus", "map": "layer_map"}),
]
SUMMARIES = {"build_layer_map": ".layer_map.summary:map_blocks", "layer_importance": ".layer_map.summary:importance_blocks"}
