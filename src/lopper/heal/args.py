"""The arguments of `lopper heal` (the CLI flags are generated from this dataclass, as for prune)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LopperError
from ..options import Options, arg_field, existing, files_field, flag


@dataclass(kw_only=True)
class HealArgs(Options):
    """Model, data and training"""

    REPORT_SECTION = "heal"  # a healed model's lopper_report.json replays its heal (--config)

    model: str = arg_field("", "pruned model folder to heal (never modified)", positional=True)
    teacher: str = arg_field("", "the original model to distil from (same tokenizer); not needed with --kd-weight 0")
    text: list[str] = files_field("training text files, tokenized as one stream", required=True)
    out: str = arg_field("", "output model folder (written atomically)", required=True)
    tokens: int = arg_field(0, "tokens to train on (0: one pass over --text; more than it holds repeats it, reshuffled)")
    seq_len: int = arg_field(512, "tokens per training window (at most the model's context)")
    lr: float = arg_field(0.0, "peak learning rate (0: 1e-4, or 5e-4 with --lora)")
    batch: int = arg_field(8, "windows per process and micro-batch (global batch = batch x grad-accum x processes)")
    grad_accum: int = arg_field(1, "micro-batches per optimizer step")
    warmup: float = arg_field(0.05, "fraction of the steps with a linear learning-rate warmup")
    schedule: str = arg_field("cosine", "after the warmup: cosine to 0, or wsd (warmup-stable-decay: the peak held, "
                              "then a cosine to 0 over the last --decay of the steps)", choices=("cosine", "wsd"))
    decay: float = arg_field(0.2, "wsd: fraction of the steps in the final decay")
    weight_decay: float = arg_field(0.0, "AdamW weight decay")
    max_grad_norm: float = arg_field(1.0, "clip the gradient norm to this (0: no clipping)")
    kd_temperature: float = arg_field(1.0, "distillation temperature T")
    kd_weight: float = arg_field(1.0, "A in A*T^2*KL(teacher||student) + (1-A)*cross-entropy; 0: plain fine-tuning")
    encoder_loss: str = arg_field("cosine", "encoders: loss between mean-pooled sentence embeddings of student and "
                             "teacher (cosine: 1 - cos)", choices=("cosine", "mse"))
    encoder_data: str = arg_field("lines", "encoders: train on the lines of --text, or on windows of --seq-len tokens",
                             choices=("lines", "windows"))
    lora: int = arg_field(0, "LoRA rank on the linear layers of the blocks, merged into the output (0: train all "
                     "parameters)")
    lora_alpha: float = arg_field(0.0, "LoRA alpha (0: 2 x rank)")
    no_gradient_checkpointing: bool = arg_field(False, "keep activations instead of recomputing them (more memory)")
    seed: int = arg_field(0, "seed of the data order and of the LoRA initialisation")
    device: str = arg_field("auto", "auto (cuda when available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = arg_field("auto", "auto (bf16 autocast on CUDA, float32 on CPU), float32 or bfloat16 (autocast; "
                      "weights stay float32)", choices=("auto", "float32", "bfloat16"))
    eval_text: str = arg_field("", "held-out text, evaluated before, every --eval-every steps and at the end; the best "
                          "step becomes the output")
    eval_every: int = arg_field(0, "steps between evaluations on --eval-text (0: before and at the end only)")
    eval_max_tokens: int = arg_field(32768, "cap on --eval-text tokens per evaluation (0: all)")
    save_every: int = arg_field(100, "steps between checkpoints in OUT.heal-work/ for --resume (0: none)")
    resume: bool = arg_field(False, "continue an interrupted run from its last checkpoint in OUT.heal-work/")
    max_steps: int = arg_field(0, "stop after this step without writing --out, as an interruption would; --resume "
                          "continues (0: run to the end)")
    force: bool = arg_field(False, "replace an existing --out; without --resume, also discard an interrupted run")
    quiet: bool = arg_field(False, "no progress bars or logs")
    config: str = arg_field("", "recipe: a YAML or JSON file of these options (a heal lopper_report.json replays "
                            "its run); flags override it")

    def check_group(self) -> None:
        if not self.model:
            raise LopperError("no model given: pass the pruned model folder to heal")
        if not self.out:
            raise LopperError("no --out given: name the output folder")
        if not self.text:
            raise LopperError("no --text given: name one or more training text files")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise LopperError(f"--kd-weight {self.kd_weight} is out of range: use 0 <= A <= 1")
        if self.kd_temperature <= 0:
            raise LopperError(f"--kd-temperature {self.kd_temperature} must be positive")
        if self.kd_weight > 0 and not self.teacher:
            raise LopperError("distillation needs the original model: pass --teacher ORIGINAL, or --kd-weight 0 "
                              "for plain fine-tuning")
        for name in ("batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise LopperError(f"{flag(name)} {getattr(self, name)} must be at least 1")
        for name in ("tokens", "lora", "eval_every", "eval_max_tokens", "save_every", "max_steps"):
            if getattr(self, name) < 0:
                raise LopperError(f"{flag(name)} {getattr(self, name)} must not be negative")
        if self.seq_len < 2:
            raise LopperError(f"--seq-len {self.seq_len} is too small: use at least 2")
        if not 0.0 <= self.warmup < 1.0:
            raise LopperError(f"--warmup {self.warmup} is out of range: give a fraction of the steps, 0 <= F < 1")
        if self.schedule == "wsd" and not 0.0 < self.decay <= 1.0 - self.warmup:
            raise LopperError(f"--decay {self.decay} is out of range: give a fraction of the steps, 0 < F <= 1 - "
                              f"--warmup ({1.0 - self.warmup:g})")
        if self.lr < 0:
            raise LopperError(f"--lr {self.lr} must not be negative")
        if self.eval_every and not self.eval_text:
            raise LopperError("--eval-every needs --eval-text: name a held-out text file")
        for name, path in [("text", p) for p in self.text] + [("eval_text", self.eval_text)]:
            existing(name, path, "the path of a UTF-8 text file")

    def peak_lr(self) -> float:
        return self.lr or (5e-4 if self.lora else 1e-4)
