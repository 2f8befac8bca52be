"""Model benchmark workloads: ALBERT forward (or a training step) on a padded batch, ours against
transformers (eager, sdpa, torch.compile) on the same weights and inputs, and the GEMM floor."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import AlbertConfig, AlbertForPreTraining, AlbertModel
from ..model.config import PRESETS
from .workloads import Workload, ours_backends, padding_mask, realistic_lengths


def _inputs(cfg: AlbertConfig, batch: int, seqlen: int, padding: str, device):
    lengths = realistic_lengths(batch, seqlen, padding)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, cfg.vocab_size, (batch, seqlen), generator=gen)
    mask = padding_mask(lengths, seqlen, "cpu").long()
    ids = ids * mask  # pad id 0 at padded positions
    labels = torch.where((torch.rand(ids.shape, generator=gen) < 0.15) & (mask == 1), ids, -100)
    sop = torch.randint(0, 2, (batch,), generator=gen)
    return [t.to(device) for t in (ids, mask, labels, sop)], int(lengths.sum())


def _hf_models(cfg: AlbertConfig, mode: str, dtype, device):
    """transformers models with our config's weights, one per attention implementation."""
    try:
        import transformers
    except ImportError:
        return {}
    cls = transformers.AlbertForPreTraining if mode == "train" else transformers.AlbertModel
    models = {}
    for impl in ("eager", "sdpa"):
        hf_cfg = transformers.AlbertConfig(**{k: v for k, v in cfg.to_dict().items()
                                              if k not in ("extra", "model_type")},
                                           attn_implementation=impl)
        torch.manual_seed(0)
        models[impl] = cls(hf_cfg).to(device=device, dtype=dtype).train(mode == "train")
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    return models


def _step(model, batch, mode: str, hf: bool):
    """One call: inference forward, or forward + backward of the MLM + SOP loss."""
    ids, mask, labels, sop = batch
    if mode == "forward":
        def run():
            with torch.inference_mode():
                return model(ids, attention_mask=mask) if hf else model(ids, mask)
        return run

    def train():
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask, labels=labels, sentence_order_label=sop) if hf \
            else model(ids, mask, labels=labels, sentence_order_label=sop)
        out.loss.backward()
    return train


def gemm_floor(cfg: AlbertConfig, tokens: int, mode: str, dtype, device, group: str) -> Workload:
    """The encoder's matrix products alone on the real tokens (the floor: they can't be skipped).

    Counts the embedding projection and, per layer application, Q, K, V, the attention output,
    ffn and ffn_output (forward; plus both gradient GEMMs of each in training). The attention
    score products add ~2% at L=128 and are left out; so is the MLM head.
    """
    E, H, I = cfg.embedding_size, cfg.hidden_size, cfg.intermediate_size
    mk = lambda *shape: (torch.randn(*shape, device=device) * 0.02).to(dtype)
    acts = {n: mk(tokens, n) for n in (E, H, I)}          # layer inputs, by width
    grads = {n: mk(tokens, n) for n in (H, I)}            # upstream gradients, by width
    layer = [(H, H)] * 4 + [(I, H), (H, I)]               # (out, in): Q, K, V, dense, ffn, ffn_output
    seq = [(H, E)] + layer * (cfg.num_hidden_layers * cfg.inner_group_num)
    weights = {shape: mk(*shape) for shape in set(seq)}

    def run():
        with torch.inference_mode():
            for out_f, in_f in seq:
                w = weights[(out_f, in_f)]
                F.linear(acts[in_f], w)
                if mode == "train":
                    torch.matmul(grads[out_f], w)                 # grad of the input
                    torch.matmul(grads[out_f].t(), acts[in_f])    # grad of the weight
    return Workload(group, "GEMM floor (encoder GEMMs on real tokens)", run, tokens, "tokens/s",
                    ceiling=True)


def model_workloads(preset: str, batch: int, seqlen: int, padding: str, mode: str, dtype,
                    device, compile_baseline: bool = True) -> list[Workload]:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if mode not in ("forward", "train"):
        raise ValueError(f"mode must be 'forward' or 'train', got {mode!r}")
    cfg = AlbertConfig.preset(preset)
    batch_tensors, tokens = _inputs(cfg, batch, seqlen, padding, device)
    group = (f"ALBERT-{preset} {mode} B{batch} L{seqlen} padding={padding} "
             f"{str(dtype).replace('torch.', '')} ({tokens} real tokens)")
    out = [gemm_floor(cfg, tokens, mode, dtype, device, group)]
    hf = _hf_models(cfg, mode, dtype, device)
    if hf:
        out.append(Workload(group, "transformers eager", _step(hf["eager"], batch_tensors, mode, True),
                            tokens, "tokens/s"))
        out.append(Workload(group, "transformers sdpa", _step(hf["sdpa"], batch_tensors, mode, True),
                            tokens, "tokens/s", baseline=True))
        if compile_baseline:
            compiled = torch.compile(hf["sdpa"], dynamic=False)
            out.append(Workload(group, "torch.compile(transformers sdpa)",
                                _step(compiled, batch_tensors, mode, True), tokens, "tokens/s"))
    cls = AlbertForPreTraining if mode == "train" else AlbertModel
    for backend in ["reference"] + ours_backends(device):
        if hf:
            model = cls.from_hf(hf["sdpa"], backend=backend)
        else:
            torch.manual_seed(0)
            model = cls(cfg, backend=backend)
        model = model.to(device=device, dtype=dtype).train(mode == "train")
        out.append(Workload(group, f"ours ({backend})", _step(model, batch_tensors, mode, False),
                            tokens, "tokens/s", baseline=not hf and backend == "reference"))
    if compile_baseline and mode == "forward":
        # torch.compile of ours: one graph on the padded layout (static shapes), so it computes
        # on padding; its first call (compile time) is reported as first_call_s.
        out.append(Workload(group, f"torch.compile(ours ({backend}))",
                            _step(torch.compile(model, dynamic=False), batch_tensors, mode, False),
                            tokens, "tokens/s"))
    return out
