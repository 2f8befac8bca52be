"""PEFT LoRA on a patched model: the merged-weight path (core.Merged) against calling the wrappers.

ALBERT-base (random weights), PEFT LoRA r=8, alpha 16, on query / value / ffn / ffn_output
(init_lora_weights=False: B random too), patch_hf(backend="cpp"), B=8, L=128 with realistic
padding (tools.workloads.realistic_lengths), fp32. Contenders, timed interleaved in one process
(one call of each per round; the ratio is taken per round):

- no-grad (torch.inference_mode): "called" = the wrappers called as modules (core.lora_adapters
  made to answer None, the code path before the merged one), "merged" = the default;
- with --train also a training step (forward + backward of a squared-output loss): the merged
  path is not taken with autograd, so both run the same code (a control for the noise).

Prints the outputs' largest difference from transformers + PEFT unpatched, then per contender the
median and min-max time, and the per-round ratio called / merged (median and range).

    python benchmarks/lora_merged_vs_called.py [--rounds 30] [--threads 1] [--train]
"""
import argparse
import copy
import statistics
import time

import torch

import albert_kernels as ak
from albert_kernels.model import core
from albert_kernels.tools.workloads import realistic_lengths


def main() -> None:
    import peft
    import transformers
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(hidden_size=768, num_attention_heads=12,
                                    intermediate_size=3072, embedding_size=128,
                                    num_hidden_layers=12, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["query", "value", "ffn", "ffn_output"])
    ref = peft.get_peft_model(transformers.AlbertModel(cfg), lora).eval()
    ours = ak.patch_hf(copy.deepcopy(ref), backend="cpp").eval()
    batch, seqlen = 8, 128
    lengths = realistic_lengths(batch, seqlen, "realistic")
    ids = torch.randint(5, cfg.vocab_size, (batch, seqlen))
    mask = (torch.arange(seqlen)[None] < lengths[:, None]).long()
    adapters = core.lora_adapters

    def use(merged: bool) -> None:
        core.lora_adapters = adapters if merged else (lambda module: None)

    def forward(merged: bool) -> torch.Tensor:
        use(merged)
        with torch.inference_mode():
            return ours(input_ids=ids, attention_mask=mask).last_hidden_state

    def step(merged: bool) -> None:
        use(merged)
        out = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        (out ** 2).mean().backward()

    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    print(f"ALBERT-base LoRA r=8, B{batch} L{seqlen} realistic padding ({int(real.sum())} real "
          f"tokens), {args.threads} thread(s)")
    for merged in (False, True):
        err = float((forward(merged) - want)[real].abs().max())
        print(f"{'merged' if merged else 'called'}: max |ours - transformers+PEFT| = {err:.2e}")
    fns = {"no-grad called": lambda: forward(False), "no-grad merged": lambda: forward(True)}
    if args.train:
        fns.update({"train called": lambda: step(False), "train merged": lambda: step(True)})
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    use(True)
    for name, ts in times.items():
        print(f"{name:15s} median {statistics.median(ts) * 1e3:8.1f} ms  "
              f"min-max {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}")
    for kind in ("no-grad", "train") if args.train else ("no-grad",):
        ratios = [c / m for c, m in zip(times[f"{kind} called"], times[f"{kind} merged"])]
        print(f"{kind}: called / merged per round: median {statistics.median(ratios):.3f}, "
              f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
