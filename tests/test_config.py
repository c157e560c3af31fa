"""fastrlhf.config: the environment switches are read on every call, through config.env."""

import os

import pytest
import torch

import fastrlhf as fr
from fastrlhf import backend, config

NAME = "FASTRLHF_TEST_CONFIG_ENV"


@pytest.fixture(params=["store", "os.environ.get"])
def env_path(request, monkeypatch):
    """config.env both ways: os.environ's own store, and the fallback for a Python without it."""
    if request.param == "os.environ.get":
        monkeypatch.setattr(config, "_FAST", False)
    elif not config._FAST:
        pytest.skip("this Python's os.environ has no _data store")
    return request.param


def test_env_follows_every_change_of_os_environ(env_path, monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert config.env(NAME) is None
    assert config.env(NAME, "dflt") == "dflt"
    monkeypatch.setenv(NAME, "first")
    assert config.env(NAME) == "first" == os.environ.get(NAME)
    os.environ[NAME] = "second value with spaces é"  # plain assignment, not monkeypatch
    assert config.env(NAME, "dflt") == "second value with spaces é"
    del os.environ[NAME]
    assert config.env(NAME, "dflt") == "dflt"
    os.environ.update({NAME: ""})
    assert config.env(NAME, "dflt") == ""  # set but empty is not unset
    monkeypatch.delenv(NAME)
    assert config.env(NAME) is None


@pytest.mark.parametrize("value, on", [("0", False), (" OFF ", False), ("false", False),
                                       ("No", False), ("1", True), ("yes", True), ("", True),
                                       ("anything", True)])
def test_env_flag(env_path, monkeypatch, value, on):
    monkeypatch.setenv(NAME, value)
    assert config.env_flag(NAME) is on
    assert config.env_flag(NAME, default=False) is on  # the default is only for unset
    monkeypatch.delenv(NAME)
    assert config.env_flag(NAME) is True and config.env_flag(NAME, default=False) is False


def test_switches_apply_at_once(env_path, monkeypatch):
    # The ops' switches read through config.env: a change between two calls applies to the
    # second (here the token check and the backend preference).
    logits = torch.randn(3, 5)
    bad = torch.tensor([0, 7, 1])
    monkeypatch.delenv("FASTRLHF_CHECK_TOKENS", raising=False)
    assert config.check_tokens_enabled()
    with pytest.raises(ValueError, match="token"):
        fr.token_logprobs(logits, bad, backend="reference")
    monkeypatch.setenv("FASTRLHF_CHECK_TOKENS", "0")
    assert not config.check_tokens_enabled()
    monkeypatch.setenv("FASTRLHF_HUGEPAGES", "off")
    assert not config.hugepages_enabled()
    monkeypatch.setenv("FASTRLHF_BACKEND", "reference")
    assert backend.resolve("auto", logits.device, op="t", native_ok=True) == "reference"
    monkeypatch.setenv("FASTRLHF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTRLHF_BACKEND must be one of"):
        backend.resolve("auto", logits.device, op="t")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.interpret_env()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.interpret_env()
