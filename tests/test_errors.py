"""errors.env_choice: the switches set in the environment (the CUDA kernels' ADAPTIVE_INFERENCE_W4_PAIRS and
ADAPTIVE_INFERENCE_W4_BLOCK, the CPU GEMV's layout) are refused in one line when mistyped, like params."""

import pytest

from adaptive_inference.errors import UserError, env_choice

NAME = "ADAPTIVE_INFERENCE_W4_BLOCK"
CHOICES = ("triton", "gluon", "gluon-serial")


def test_unset_or_empty_takes_the_default(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert env_choice(NAME, CHOICES, "triton") == "triton"
    assert env_choice(NAME, CHOICES, None) is None
    monkeypatch.setenv(NAME, "")
    assert env_choice(NAME, CHOICES, "triton") == "triton"


def test_a_choice_is_taken_and_a_typo_refused(monkeypatch):
    monkeypatch.setenv(NAME, "gluon-serial")
    assert env_choice(NAME, CHOICES, "triton") == "gluon-serial"
    monkeypatch.setenv(NAME, "gluonn")  # once taken for "gluon" by a prefix test
    with pytest.raises(UserError, match=r"^ADAPTIVE_INFERENCE_W4_BLOCK='gluonn': expected one of triton, gluon, "
                                        r"gluon-serial$"):
        env_choice(NAME, CHOICES, "triton")
    monkeypatch.setenv("ADAPTIVE_INFERENCE_W4_PAIRS", "yes")
    with pytest.raises(UserError, match="ADAPTIVE_INFERENCE_W4_PAIRS='yes': expected one of 0, 1"):
        env_choice("ADAPTIVE_INFERENCE_W4_PAIRS", ("0", "1"), "0")
