"""Every model family users compress, end to end on a tiny random model (tests/model_matrix.py):
a data-aware recipe through ``lqframe run``, the checkpoint reloaded with ``lqframe.load`` and with
transformers' ``from_pretrained`` and compared with the model compressed in memory, the dense export
read by transformers in the model's own layout, the PEFT adapter by PEFT (where the format allows)."""

from __future__ import annotations

import pytest

from tests.model_matrix import FAMILIES, check_family


@pytest.mark.parametrize("family", FAMILIES, ids=[f.key for f in FAMILIES])
def test_family_compresses_saves_reloads_and_exports(family, tmp_path):
    record = check_family(family, tmp_path)
    assert record["compressed_fraction"] > 0.9
