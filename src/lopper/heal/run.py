"""`lopper heal`: train a pruned model back toward the original by distillation (or plain fine-tuning), all
parameters or LoRA (merged at the end), and save it as a standard checkpoint beside its plan and report.

Scaling is accelerate's: model, optimizer, data loader and scheduler go through `Accelerator.prepare`, so
`accelerate launch` runs the same code as DDP. The data order depends on the seed alone and a global step always
trains on the same items (see data.py), so 1 process with --batch 2B and 2 processes with --batch B train the same
model. Checkpoints (accelerate's save_state: model, optimizer, scheduler, RNG, plus the step, which fixes the data
position) go to OUT.heal-work/, which is removed once the output is written.

Read in order: `heal` (the outline), setup (folders, accelerate, models, data, optimizer, resume), the step loop
(`step_loss`, `train`, `checkpoint`), evaluation (`evaluate`, `_measure`) and the output with its report
(`write_output`). One `Run` carries the state between them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..version import __version__
from ..arch import adapter_class
from ..errors import LopperError
from ..evaluate import count_params, perplexity
from ..io import PLAN_FILE, REPORT_FILE, check_output, checkpoint_dtype, load_model, read_config, save
from ..options import flag, resolve_args, set_quiet
from ..plan import Plan
from . import data
from .args import HealArgs
from .losses import decoder_loss, embedding_loss, encoder_embeddings

log = logging.getLogger("lopper")
# Options that may change between an interrupted run and its --resume.
RESUME_MAY_CHANGE = ("resume", "force", "quiet", "max_steps", "save_every")


def work_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.heal-work"


class TrainState:
    """What a checkpoint holds besides model, optimizer, scheduler and RNG: the step (which fixes the data position),
    and the measurements so far."""

    def __init__(self):
        self.step = 0
        self.seconds = 0.0
        self.losses: list = []      # [step, mean loss over the global batch]
        self.evals: list = []       # [step, metric]
        self.best: list | None = None  # [step, metric, file in the work folder]
        self.teacher_metric: float | None = None
        self.resumed_from: list = []

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


@dataclass
class Run:
    """What one heal holds from setup through the step loop, the evaluations and the report."""

    args: HealArgs
    acc: Any                  # accelerate.Accelerator
    out: Path
    work: Path                # OUT.heal-work: run.json, checkpoints, the best step's weights
    config: Any               # the student's config as read from disk
    encoder: bool
    bf16: bool
    teacher: nn.Module | None
    tok: Any
    adapter: Any
    plan: Plan | None
    keep: torch.Tensor | None  # encoders with a cut hidden width: the teacher's channels the student kept
    seq_len: int
    global_batch: int
    steps: int
    tokens_trained: int
    loader: Any = None
    model: nn.Module | None = None   # as prepared by accelerate (DDP-wrapped on several processes)
    net: nn.Module | None = None     # the model itself (a PeftModel with --lora), for evaluation and saving
    optimizer: Any = None
    scheduler: Any = None
    warmup: int = 0
    trainable: int = 0
    use_cache: bool | None = None
    state: TrainState = field(default_factory=TrainState)
    t_start: float = field(default_factory=time.time)
    seconds_before: float = 0.0  # the earlier runs' seconds, when resumed

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def metric(self) -> str:
        return "embedding_loss" if self.encoder else "perplexity"


def heal(args: HealArgs | None = None, /, **kwargs) -> dict | None:
    """Heal a pruned model; returns the report also written as OUT/lopper_report.json (its `heal` section is new) on
    the main process and None on the others. A run stopped by --max-steps returns {"stopped_at_step", "work"}."""
    args = resolve_args(HealArgs, args, kwargs)
    args.check()
    run = setup(args)
    try:
        return _heal(run)
    except BaseException:
        if run.main and not args.resume and not _checkpoints(run.work):  # nothing to resume: leave no work folder
            shutil.rmtree(run.work, ignore_errors=True)
        raise


def _heal(run: Run) -> dict | None:
    args = run.args
    if args.eval_text and not run.state.evals:
        evaluate(run)
    if not train(run):
        log.info("stopped after step %d (--max-steps): continue with --resume (last checkpoint: %s)", run.state.step,
                 (_checkpoints(run.work) or ["none"])[-1])
        return {"stopped_at_step": run.state.step, "work": str(run.work)} if run.main else None
    if args.eval_text:
        evaluate(run)
    best = run.state.best
    if best is not None and best[0] != run.state.step:
        missing, unexpected = run.net.load_state_dict(load_file(run.work / best[2]), strict=False)
        assert not unexpected, unexpected
        log.info("output: the weights of step %d, the best on --eval-text", best[0])
    report = write_output(run) if run.main else None
    run.acc.wait_for_everyone()
    return report


# ---- setup ----------------------------------------------------------------------------------------------------------
def setup(args: HealArgs) -> Run:
    """Check the folders, start accelerate, load student and teacher, make the data, the optimizer and the schedule,
    and either resume from the last checkpoint or start a fresh work folder."""
    out = check_output(args.out, args.force, args.model)
    config = read_config(args.model)
    encoder = adapter_class(config.model_type).is_encoder
    if encoder and not args.teacher:
        raise LopperError("encoders are healed by distilling their sentence embeddings: pass --teacher ORIGINAL")
    use_teacher = encoder or args.kd_weight > 0
    if use_teacher:
        try:
            read_config(args.teacher)  # before anything loads
        except LopperError as e:
            raise LopperError(f"--teacher {args.teacher}: {e}") from None
    if use_teacher and Path(args.teacher).exists() and out.resolve() == Path(args.teacher).resolve():
        raise LopperError(f"--out {out} is the teacher: write the healed model to another folder")
    work = work_dir(out)
    if args.resume and not _checkpoints(work):
        raise LopperError(f"--resume: {work} holds no checkpoint to continue from: run without --resume")
    if not args.resume and work.exists() and not args.force:
        raise LopperError(f"{work} holds an interrupted run: continue it with --resume, or pass --force to start over")
    acc, bf16 = _accelerator(args, encoder)
    set_quiet(args.quiet or not acc.is_main_process)
    if args.quiet or not acc.is_main_process:
        logging.getLogger("accelerate").setLevel(logging.ERROR)
    if args.resume:
        _check_resume(work, args, acc.num_processes)
    t_start = time.time()
    model, tok, adapter, teacher = _load(args, acc, bf16, use_teacher)
    plan = Plan.load(Path(args.model) / PLAN_FILE) if (Path(args.model) / PLAN_FILE).is_file() else None
    keep = _teacher_channels(args, model, teacher, plan) if encoder else None
    seq_len = min(args.seq_len, getattr(config, "max_position_embeddings", None) or args.seq_len)
    run = Run(args=args, acc=acc, out=out, work=work, config=config, encoder=encoder, bf16=bf16, teacher=teacher,
              tok=tok, adapter=adapter, plan=plan, keep=keep.to(acc.device) if keep is not None else None,
              seq_len=seq_len, global_batch=args.batch * args.grad_accum * acc.num_processes, steps=0,
              tokens_trained=0, t_start=t_start)
    _data(run)
    _optimizer(run, model)
    _start_or_resume(run)
    return run


def _accelerator(args: HealArgs, encoder: bool):
    """The Accelerator for --device / --dtype, and whether it autocasts to bf16."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LopperError("--device cuda, but no CUDA device is visible: use --device cpu")
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device == "cuda" and torch.cuda.is_bf16_supported())
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if encoder else None  # e.g. the pooler
    try:
        acc = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if bf16 else "no",
                          gradient_accumulation_steps=args.grad_accum, step_scheduler_with_optimizer=False,
                          kwargs_handlers=handlers)
    except ValueError as e:  # accelerate's state is per process: one device and precision per process
        raise LopperError(f"accelerate is already set up differently in this process ({e}): run heals with another "
                          "--device or --dtype in a process of their own")
    return acc, bf16


def _load(args: HealArgs, acc, bf16: bool, use_teacher: bool):
    """Student (float32 master weights; autocast gives the speed), its tokenizer and adapter, and the teacher."""
    model, tok, adapter = load_model(args.model, "cpu", "float32")
    teacher = None
    if use_teacher:
        teacher, t_tok, _ = load_model(args.teacher, "cpu", "bfloat16" if bf16 and acc.device.type == "cuda"
                                       else "float32")
        _check_same_vocab(args, model, tok, teacher, t_tok)
        teacher.requires_grad_(False).to(acc.device).eval()
        tok = tok or t_tok
    elif args.teacher:
        log.info("--kd-weight 0: plain fine-tuning; the teacher is not loaded")
    if tok is None:
        raise LopperError(f"{args.model} has no tokenizer files, which reading --text needs: add them")
    return model, tok, adapter, teacher


def _data(run: Run) -> None:
    """Training items (decoder windows or encoder lines), cut to whole global batches, and their loader."""
    args, tok = run.args, run.tok
    if run.encoder:
        items = data.encoder_items(tok, args.text, run.seq_len, args.encoder_data, args.seed, args.tokens)
        collate = data.Pad(tok.pad_token_id if tok.pad_token_id is not None else 0)
    else:
        items, collate = data.windows(tok, args.text, run.seq_len, args.seed, args.tokens), data.stack
    run.steps = len(items) // run.global_batch
    if run.steps == 0:
        raise LopperError(f"--text gives {len(items)} training items but one step takes {run.global_batch} (--batch x "
                          "--grad-accum x processes): give more text, or lower --batch / --grad-accum / --seq-len")
    items = items[:run.steps * run.global_batch]
    run.tokens_trained = items.numel() if torch.is_tensor(items) else sum(len(x) for x in items)
    run.loader = DataLoader(data.Items(items), batch_size=args.batch, shuffle=False, collate_fn=collate)
    log.info("training on %d tokens: %d steps of %d items (%d per process and micro-batch)", run.tokens_trained,
             run.steps, run.global_batch, args.batch)


def _optimizer(run: Run, model: nn.Module) -> None:
    """Gradient checkpointing, LoRA, AdamW and the learning-rate schedule; everything through accelerate.prepare."""
    args = run.args
    run.use_cache = getattr(model.config, "use_cache", None)
    if not args.no_gradient_checkpointing and model.supports_gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if run.use_cache is not None:
        model.config.use_cache = False
    torch.manual_seed(args.seed)
    if args.lora:
        model = _add_lora(model, run.adapter, args)
    model.train()
    run.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.peak_lr(),
                                  betas=(0.9, 0.95), weight_decay=args.weight_decay)
    run.warmup = round(args.warmup * run.steps)
    scheduler = _scheduler(optimizer, args, run.steps, run.warmup)
    run.model, run.optimizer, run.loader, run.scheduler = run.acc.prepare(model, optimizer, run.loader, scheduler)
    run.net = run.acc.unwrap_model(run.model)


def _start_or_resume(run: Run) -> None:
    acc, work = run.acc, run.work
    acc.register_for_checkpointing(run.state)
    if run.args.resume:
        ckpt = _checkpoints(work)[-1]
        acc.load_state(str(ckpt))
        run.state.resumed_from.append(run.state.step)
        log.info("resuming from %s (step %d of %d)", ckpt, run.state.step, run.steps)
        return
    acc.wait_for_everyone()  # every process has checked the folders (in setup) before the main one changes them
    if run.main:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "run.json").write_text(json.dumps({"args": asdict(run.args), "processes": acc.num_processes},
                                                  indent=1) + "\n")
    acc.wait_for_everyone()


# ---- the step loop --------------------------------------------------------------------------------------------------
def step_loss(run: Run, batch: dict) -> tuple[torch.Tensor, int]:
    """The loss of one micro-batch and the tokens it covers."""
    args, acc = run.args, run.acc
    if run.encoder:
        student = encoder_embeddings(run.model, batch)
        with torch.no_grad(), acc.autocast():
            target = encoder_embeddings(run.teacher, batch)
        target = target if run.keep is None else target[:, run.keep]
        return embedding_loss(student, target, args.encoder_loss), int(batch["attention_mask"].sum())
    ids = batch["input_ids"]
    logits = run.model(input_ids=ids, use_cache=False).logits
    target = None
    if args.kd_weight > 0:
        with torch.no_grad(), acc.autocast():
            target = run.teacher(input_ids=ids, use_cache=False).logits
    return decoder_loss(logits, target, ids, args.kd_weight, args.kd_temperature), ids.numel()


def train(run: Run) -> bool:
    """Optimizer steps until the end of the data (True) or --max-steps (False), evaluating every --eval-every steps
    and checkpointing every --save-every."""
    args, acc, state = run.args, run.acc, run.state
    bar = tqdm(total=run.steps, initial=state.step, desc="heal", unit="step", disable=args.quiet or not run.main,
               dynamic_ncols=True)
    t0, tokens_seen = time.time(), 0
    run.seconds_before = seconds0 = state.seconds  # seconds: over all runs, loading included
    loss_sum, micro, count = torch.zeros((), device=acc.device), 0, 0
    batches = acc.skip_first_batches(run.loader, state.step * args.grad_accum) if state.step else run.loader
    try:
        for batch in batches:
            with acc.accumulate(run.model):
                loss, n = step_loss(run, batch)
                acc.backward(loss)
                if acc.sync_gradients and args.max_grad_norm:
                    acc.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            micro, count = micro + 1, count + n
            if not acc.sync_gradients:
                continue
            run.scheduler.step()
            state.step += 1
            both = acc.gather(torch.stack([loss_sum / micro, torch.tensor(float(count), device=acc.device)]))
            both = both.reshape(-1, 2)
            value, tokens_seen = both[:, 0].mean().item(), tokens_seen + int(both[:, 1].sum().item())
            loss_sum.zero_()
            micro, count = 0, 0
            state.losses.append([state.step, round(value, 6)])
            state.seconds = seconds0 + time.time() - run.t_start
            bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens_seen / (time.time() - t0):,.0f}", refresh=False)
            bar.update()
            if state.step == run.steps:
                return True
            if args.eval_text and args.eval_every and state.step % args.eval_every == 0:
                evaluate(run)
            if args.save_every and state.step % args.save_every == 0:
                checkpoint(run)
            if args.max_steps and state.step >= args.max_steps:
                return False
        return True
    finally:
        bar.close()


def checkpoint(run: Run) -> None:
    """accelerate's save_state into OUT.heal-work/ckpt-STEP (written as a temporary folder, then renamed); older
    checkpoints and best-step files that are no longer the best are removed."""
    acc, work, state = run.acc, run.work, run.state
    tmp = work / f".tmp-ckpt-{state.step:08d}"
    if run.main:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if run.main:
        final = work / f"ckpt-{state.step:08d}"
        os.rename(tmp, final)
        for old in _checkpoints(work):
            if old != final:
                shutil.rmtree(old)
        for f in work.glob("best-*.safetensors"):
            if state.best is None or f.name != state.best[2]:
                f.unlink()
    acc.wait_for_everyone()


# ---- evaluation -----------------------------------------------------------------------------------------------------
def evaluate(run: Run) -> None:
    """Measure on the main process and share with the others; keep the best step's trainable weights in the work
    folder."""
    from accelerate.utils import broadcast_object_list

    args, acc, state = run.args, run.acc, run.state
    result = [None]
    if run.main:
        try:
            value = _measure(run.net, args, run.tok, run.seq_len, acc, run.encoder, run.teacher, run.keep)
            teacher_value = _measure(run.teacher, args, run.tok, run.seq_len, acc, False, None, None) \
                if run.teacher is not None and not run.encoder and state.teacher_metric is None else None
            result[0] = (None, value, teacher_value)
        except LopperError as e:  # raised on every process, not only here (the others would wait forever)
            result[0] = (str(e), None, None)
    error, value, teacher_value = broadcast_object_list(result)[0]
    if error:
        raise LopperError(error)
    if teacher_value is not None:
        state.teacher_metric = teacher_value
    state.evals.append([state.step, value])
    log.info("step %d: %s %.4f", state.step, run.metric, value)
    if state.step > 0 and (state.best is None or value < state.best[1]):
        state.best = [state.step, value, f"best-{state.step:08d}.safetensors"]
        if run.main:
            save_file({n: p.detach().to("cpu", copy=True).contiguous()
                       for n, p in run.net.named_parameters() if p.requires_grad}, run.work / state.best[2])
    acc.wait_for_everyone()


# ---- the output and its report ----------------------------------------------------------------------------------
def write_output(run: Run) -> dict:
    """On the main process: merge LoRA, restore the config, save the healed model with the input's plan and a report
    that adds a `heal` section to the input's; the work folder is removed."""
    args = run.args
    final = run.net.merge_and_unload() if args.lora else run.net
    if run.use_cache is not None:
        final.config.use_cache = run.use_cache
    if getattr(run.config, "lopper_layout", None):
        final.config.lopper_layout = run.config.lopper_layout  # lopper.load() replays the plan, as for the input
    final.eval()
    source = json.loads((Path(args.model) / REPORT_FILE).read_text()) \
        if (Path(args.model) / REPORT_FILE).is_file() else {"lopper_version": __version__, "source": args.model}
    report = {**source, "heal": _heal_section(run, final)}
    save(final, run.out, source=args.model, tokenizer=run.tok, plan=run.plan, report=report,
         dtype=checkpoint_dtype(run.config), force=args.force)
    shutil.rmtree(run.work, ignore_errors=True)
    return report


def _heal_section(run: Run, final: nn.Module) -> dict:
    args, state = run.args, run.state
    k = max(1, min(10, len(state.losses) // 4))  # steps averaged for the first and last loss
    section = {
        "lopper_version": __version__, "student": args.model, "teacher": args.teacher if run.teacher is not None
        else None, "loss": _loss_name(args, run.encoder), "lora_rank": args.lora or None,
        "trainable_params": run.trainable, **count_params(final, run.adapter), "processes": run.acc.num_processes,
        "distributed": run.acc.distributed_type.value, "device": str(run.acc.device),
        "autocast": "bfloat16" if run.bf16 else None, "seq_len": run.seq_len,
        "global_batch": run.global_batch, "steps": run.steps, "tokens_trained": run.tokens_trained,
        "lr": args.peak_lr(), "schedule": args.schedule, "warmup_steps": run.warmup,
        "loss_first": _mean([v for _, v in state.losses[:k]]),
        "loss_last": _mean([v for _, v in state.losses[-k:]]),
        "loss_history": state.losses[::max(1, len(state.losses) // 100)],
        "seconds": round(run.seconds_before + time.time() - run.t_start, 2),
        "resumed_from": state.resumed_from, "args": asdict(args),
    }
    if state.evals:
        section.update({"metric": run.metric, "evals": state.evals, f"{run.metric}_before": state.evals[0][1],
                        f"{run.metric}_after": state.best[1], "best_step": state.best[0]})
        if state.teacher_metric is not None:
            section[f"teacher_{run.metric}"] = state.teacher_metric
    return section


def _measure(model, args: HealArgs, tok, seq_len: int, acc, encoder: bool, teacher, keep) -> float:
    """The held-out metric: perplexity on --eval-text (decoders), or the embedding loss to the teacher (encoders)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), acc.autocast():
            if not encoder:
                return perplexity(model, tok, args.eval_text, seq_len, args.eval_max_tokens, quiet=True)["perplexity"]
            items = data.encoder_items(tok, [args.eval_text], seq_len, args.encoder_data, args.seed,
                                       args.eval_max_tokens)
            pad, total = data.Pad(tok.pad_token_id if tok.pad_token_id is not None else 0), 0.0
            for i in range(0, len(items), args.batch):
                batch = {k: v.to(acc.device) for k, v in pad(items[i:i + args.batch]).items()}
                target = encoder_embeddings(teacher, batch)
                target = target if keep is None else target[:, keep]
                total += embedding_loss(encoder_embeddings(model, batch), target, args.encoder_loss).item() * \
                    len(batch["input_ids"])
            return total / len(items)
    finally:
        model.train(was_training)


def _add_lora(model, adapter, args: HealArgs):
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    blocks = adapter.layers()
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    targets = [n for n, m in model.named_modules()
               if n.startswith(prefix + ".") and isinstance(m, (nn.Linear, Conv1D))]
    cfg = LoraConfig(r=args.lora, lora_alpha=args.lora_alpha or 2 * args.lora, lora_dropout=0.0,
                     target_modules=targets, bias="none")
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, cfg)


def _scheduler(optimizer, args: HealArgs, steps: int, warmup: int):
    """Linear warmup, then cosine to 0 over the rest, or WSD (warmup-stable-decay, MiniCPM, arXiv:2404.06395): the
    peak held until the last `--decay` of the steps, for short runs where a cosine spends most steps at a low rate."""
    from transformers.optimization import get_cosine_schedule_with_warmup, get_wsd_schedule

    if args.schedule == "wsd":
        decay = max(1, round(args.decay * steps))
        return get_wsd_schedule(optimizer, warmup, decay, num_stable_steps=max(0, steps - warmup - decay))
    return get_cosine_schedule_with_warmup(optimizer, warmup, steps)


def _checkpoints(work: Path) -> list[Path]:
    return sorted(p for p in work.glob("ckpt-*") if p.is_dir()) if work.is_dir() else []


def _check_resume(work: Path, args: HealArgs, world: int) -> None:
    run = json.loads((work / "run.json").read_text())
    old, new = run["args"], asdict(args)
    changed = [f"{flag(k)} {old.get(k)!r} -> {v!r}" for k, v in new.items()
               if k not in RESUME_MAY_CHANGE and old.get(k) != v]
    if changed:
        raise LopperError(f"--resume with other options than the interrupted run ({'; '.join(changed)}): give the "
                          "same options, or --force without --resume to start over")
    if run["processes"] != world:
        raise LopperError(f"--resume on {world} processes, but the run started on {run['processes']}: launch the "
                          "same number")


def _check_same_vocab(args: HealArgs, student, s_tok, teacher, t_tok) -> None:
    sv, tv = (m.get_input_embeddings().weight.shape[0] for m in (student, teacher))
    if sv != tv or (s_tok is not None and t_tok is not None and s_tok.get_vocab() != t_tok.get_vocab()):
        raise LopperError(f"{args.model} and --teacher {args.teacher} have different vocabularies ({sv} and {tv} "
                          "tokens, or other tokenizers): distil from the model the student was pruned from")


def _teacher_channels(args: HealArgs, student, teacher, plan: Plan | None) -> torch.Tensor | None:
    """Encoders whose hidden width was pruned are compared with the teacher's embedding on the kept channels."""
    ds, dt = (m.get_input_embeddings().weight.shape[1] for m in (student, teacher))
    if ds == dt:
        return None
    if plan is None or len(plan.hidden) != ds:
        raise LopperError(f"{args.model} has hidden size {ds} and --teacher {dt}, and no lopper_plan.json says "
                          "which channels it kept: give the folder written by lopper prune")
    return torch.tensor(plan.hidden, dtype=torch.long)


def _loss_name(args: HealArgs, encoder: bool) -> str:
    if encoder:
        return f"embedding {args.encoder_loss}"
    if args.kd_weight == 0:
        return "cross-entropy"
    kd = f"{args.kd_weight:g}*T^2*KL (T={args.kd_temperature:g})"
    return kd if args.kd_weight == 1 else f"{kd} + {1 - args.kd_weight:g}*cross-entropy"


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None
