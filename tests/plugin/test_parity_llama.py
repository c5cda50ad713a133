"""vLLM with an adapter == HF with the adapter as past_key_values: tiny Llama (GQA)."""

import pytest

from tests.helpers.parity_suite import ParitySuite

pytestmark = pytest.mark.engine


class TestLlamaParity(ParitySuite):
    kind = "llama"
