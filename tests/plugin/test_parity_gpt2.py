"""vLLM with an adapter == HF with the adapter as past_key_values: tiny GPT-2
(learned absolute positions: the query must sit at positions L..)."""

import pytest

from tests.helpers.parity_suite import ParitySuite

pytestmark = pytest.mark.engine


class TestGPT2Parity(ParitySuite):
    kind = "gpt2"
