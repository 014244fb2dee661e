"""Surprisal vocab router (seed 000, stage 1): a small MLP on the final hidden state predicts whether the
model's next token is outside a common-id set; when it is not, the step uses a pre-sliced common head."""

from .. import Stage, Technique

TECHNIQUES = [Technique("router", artifacts={"router": "train_vocab_router"}, policy=".vocab_router.head:policy")]
STAGES = [Stage("train-vocab-router", "train_vocab_router", ".vocab_router.train:build",
                "Pick common ids, train the surprisal router on cached hidden states, calibrate its threshold.",
                out="router", inputs={"hidden": "hidden"})]
SUMMARIES = {"train_vocab_router": ".vocab_router.summary:blocks"}
