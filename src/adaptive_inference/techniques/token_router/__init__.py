"""Token-level layer router (seed 003, DLR): after the first K layers a small MLP gives each token a
keep / skip decision for every later layer, trained by distillation toward a target skip ratio."""

from .. import Stage, Technique

TECHNIQUES = [Technique("token_router", artifacts={"token_router": "train_token_router"},
                        policy=".token_router.apply:policy", options={"target": 0.35})]
STAGES = [Stage("train-token-router", "train_token_router", ".token_router.train:build",
                "Per-token layer routers (Gumbel-softmax straight-through, distillation), one per target skip ratio.",
                out="token_router", inputs={"hidden": "hidden", "model": "model"})]
SUMMARIES = {"train_token_router": ".token_router.summary:blocks"}
