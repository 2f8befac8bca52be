"""Ids outside the embedding tables: a ValueError naming the argument, the value and the valid
range, instead of torch's bare IndexError on the CPU; no host read on other devices
unless asked (albert_kernels/model/id_checks.py)."""
import pytest
import torch

import albert_kernels as ak
from albert_kernels.model import id_checks

CFG = dict(vocab_size=50, embedding_size=8, hidden_size=32, num_attention_heads=2,
           intermediate_size=40, num_hidden_layers=1, max_position_embeddings=16,
           type_vocab_size=2)


@pytest.mark.parametrize("cls", ["AlbertModel", "AlbertForSequenceClassification",
                                 "AlbertForMaskedLM"])
def test_out_of_range_ids_raise_value_error(cls):
    model = getattr(ak, cls)(ak.AlbertConfig(**CFG), backend="reference").eval()
    ids = torch.randint(1, 50, (2, 6))
    model(ids)                                                    # in range: runs
    bad = ids.clone()
    bad[1, 3] = 50
    with pytest.raises(ValueError, match=r"input_ids holds 50, outside the embedding table: "
                                         r"valid ids are 0 \.\.\. 49 \(config.vocab_size = 50\)"):
        model(bad)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match=r"input_ids holds -1"):
        model(bad)
    with pytest.raises(ValueError, match=r"token_type_ids holds 2, .* 0 \.\.\. 1 \(config.type_vocab_size"):
        model(ids, token_type_ids=torch.full_like(ids, 2))
    positions = torch.arange(6).expand(2, 6).clone()
    positions[0, 5] = 16
    with pytest.raises(ValueError, match=r"position_ids holds 16, .* 0 \.\.\. 15 \(config.max_position"):
        model(ids, position_ids=positions)


def test_without_the_check_torch_gives_a_bare_index_error():
    """What the check replaces (the test can fail: torch's own error is not a ValueError)."""
    emb = torch.nn.Embedding(50, 8)
    with pytest.raises(IndexError):
        emb(torch.tensor([[50]]))


def test_no_host_read_off_the_cpu_unless_asked(monkeypatch):
    """Off the CPU (meta tensors stand in for CUDA here) the check is the device-side assertion:
    nothing is read back; with on_host=True (model.check_ids) min/max are read."""
    config = ak.AlbertConfig(**CFG)
    ids = torch.zeros(2, 6, dtype=torch.long, device="meta")
    calls = []
    monkeypatch.setattr(torch, "_assert_async", lambda *a: calls.append("device"))
    real_aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: calls.append("host") or real_aminmax(t))
    id_checks.check_id_ranges(config, False, input_ids=ids, token_type_ids=ids)
    assert calls == ["device", "device"]
    calls.clear()
    with pytest.raises(RuntimeError, match="meta"):   # meta tensors hold no values to read
        id_checks.check_id_ranges(config, True, input_ids=ids)
    assert calls == ["host"]
    calls.clear()
    id_checks.check_id_ranges(config, False, input_ids=torch.zeros(2, 6, dtype=torch.long))
    assert calls == ["host"]                   # the CPU always checks on the host
