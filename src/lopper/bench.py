"""`lopper bench`: what a pruned model costs to run, beside what its size says it should.

For every model of one run (loaded with lopper.io.load_model, so lopper layouts work too):

- parameters: total (tied ones once) and non-embedding (without embeddings and lm_head);
- FLOPs per token at the prompt length P, forward only, lm_head excluded:
      flops_per_token = 2 * M + 4 * P * sum over layers of (heads_l * head_dim)
  where M = the non-embedding matmul parameters (every weight of >= 2 dimensions inside the layers: the Linear /
  Conv1D weights; norms and biases excluded). 2 * M: one multiply-add per weight; 4 * P * d_attn: the attention
  scores Q.K^T (2 * P * d_attn) and the weighted sum of values (2 * P * d_attn) against the full context of P
  positions (the causal mask's halving is not taken off);
- weights: bytes of the weight files on disk (for a folder), and bytes of the parameters in memory at --dtype (the
  "bytes" of the decode limit: one decode step reads every weight once);
- peak memory: CUDA: torch.cuda.max_memory_allocated over the model's runs; CPU: an estimate, parameter + buffer
  bytes (no activation memory), named in memory_method;
- prefill: tokens/s of one forward without cache at batch B and length P (causal LMs: logits of the last position
  only, as generation needs);
- decode (causal LMs; encoders: n/a): ms per new token at batch 1 and at batch B, greedy generate of a P-token
  prompt with min_new_tokens = max_new_tokens = N; prefill excluded by timing generate with N and with 1 new token
  (the 1-token run is the prefill): (t_N - t_1) / (N - 1). On CUDA the decode uses a static KV cache and a
  torch.compile'd forward (mode reduce-overhead).

Every figure is the median of --repeats runs after --warmup runs, the models taking turns (on CPU all models
are loaded together and run 1, 2, ..., 1, 2, ...: a change of load on a shared machine falls on all alike); the spread printed is min-max; the JSON keeps every
run. Ratios are against the first model: measured speed-ups beside the limits that FLOPs (prefill:
flops_first / flops_model) and weight bytes (decode: bytes_first / bytes_model) allow."""
from __future__ import annotations

import inspect
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from .version import __version__
from .errors import LopperError
from .evaluate import count_params, weights_size
from .io import load_model, resolve_dtype
from .options import Options, arg_field, files_field, flag, resolve_args, set_quiet

log = logging.getLogger("lopper")


@dataclass(kw_only=True)
class BenchArgs(Options):
    """Models and measurement"""

    models: list[str] = files_field("model folders (standard or saved by lopper) or .gguf files; ratios are against "
                                    "the first", positional=True)
    device: str = arg_field("cpu", "cpu or cuda", choices=("cpu", "cuda"))
    dtype: str = arg_field("auto", "compute dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    batch: int = arg_field(8, "batch B of the prefill and of the second decode figure")
    prompt_len: int = arg_field(256, "prompt length P in tokens")
    new_tokens: int = arg_field(32, "tokens N generated per decode run (at least 2)")
    repeats: int = arg_field(5, "timed runs per figure; the median is reported")
    warmup: int = arg_field(1, "untimed runs first")
    json: str = arg_field("", "write all figures and every timed run to this JSON file")
    markdown: str = arg_field("", "also write the Markdown table to this file")
    quiet: bool = arg_field(False, "no table printed, no logs")

    def check_group(self) -> None:
        if not self.models:
            raise LopperError("no model given: pass one or more model folders")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise LopperError("--device cuda but CUDA is not available here: use --device cpu")
        for name in ("batch", "prompt_len", "repeats"):
            if getattr(self, name) < 1:
                raise LopperError(f"{flag(name)} must be at least 1")
        if self.new_tokens < 2:
            raise LopperError("--new-tokens must be at least 2 (decode time is (t_N - t_1) / (N - 1))")
        if self.warmup < 0:
            raise LopperError("--warmup must be at least 0")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleaved(fns: list, repeats: int, warmup: int) -> list[list]:
    """Warm-up runs, then `repeats` rounds that run every function once in turn (model 1, 2, ..., 1, 2, ...): on a
    shared machine a change of load then falls on every model alike instead of on whichever ran at the time."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    runs: list[list] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            runs[i].append(fn())
    return runs


def _summary(values: list[float], unit: str) -> dict:
    return {unit: statistics.median(values), "min": min(values), "max": max(values), "repeats": values}


def static_figures(model, adapter, prompt_len: int) -> dict:
    """Parameters, matmul parameters, attention width and FLOPs per token (formula in the module docstring)."""
    counts = count_params(model, adapter)
    layers = adapter.layers()
    matmul = sum({id(p): p.numel() for p in layers.parameters() if p.dim() >= 2}.values())
    d_attn = sum(adapter.layer_widths(l)["heads"] * adapter.head_dim() for l in layers)
    unique = {id(p): p for p in model.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in unique.values())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    return {**counts, "matmul_params_non_embedding": matmul, "attention_width_total": d_attn,
            "flops_per_token": 2 * matmul + 4 * prompt_len * d_attn, "weights_bytes": param_bytes,
            "buffer_bytes": buffer_bytes}


def random_ids(model, batch: int, length: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return torch.randint(min(4, vocab - 1), vocab, (batch, length), generator=g).to(device)


def prefill_fn(model, batch: int, length: int, device: str):
    """() -> seconds of one forward of random ids [batch, length] without cache (causal LMs: the last position's
    logits only, as generation needs). The one prefill timer: `lopper bench` and --target-speedup both use it."""
    ids = random_ids(model, batch, length, device)
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        kw["use_cache"] = False
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1

    @torch.inference_mode()
    def once():
        return timed(lambda: model(**kw), device)

    return once


def _prefill_summary(seconds: list[float], args: BenchArgs) -> dict:
    tps = [args.batch * args.prompt_len / s for s in seconds]
    return {**_summary(tps, "tokens_per_s"), "seconds": seconds}


def _decode_fn(model, args: BenchArgs, batch: int):
    """() -> {t1, tn, ms_per_token}: greedy generate of 1 and of N new tokens from a P-token prompt."""
    ids = random_ids(model, batch, args.prompt_len, args.device)
    cuda = args.device.startswith("cuda")
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.inference_mode()
    def generate(n: int) -> float:
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                  min_new_tokens=n, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        if cuda:
            kw["cache_implementation"] = "static"
        return timed(lambda: model.generate(**kw), args.device)

    def once():
        t1, tn = generate(1), generate(args.new_tokens)
        return {"t1": t1, "tn": tn, "ms_per_token": 1000 * max(tn - t1, 0.0) / (args.new_tokens - 1)}

    return once


def _decode_summary(runs: list[dict], args: BenchArgs, batch: int) -> dict:
    return {**_summary([r["ms_per_token"] for r in runs], "ms_per_token"), "batch": batch,
            "generate_seconds": [{"1": r["t1"], str(args.new_tokens): r["tn"]} for r in runs]}


def _load(path: str, args: BenchArgs):
    model, _, adapter = load_model(path, args.device, args.dtype)
    causal = not adapter.is_encoder and hasattr(model, "generate") and hasattr(model, "lm_head")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if adapter.is_encoder and max_pos and args.prompt_len > max_pos:
        raise LopperError(f"{path} takes at most {max_pos} positions, fewer than --prompt-len {args.prompt_len}: "
                          "give a smaller --prompt-len")
    r = {"model": path, "model_type": model.config.model_type, "encoder": not causal,
         **static_figures(model, adapter, args.prompt_len)}
    if Path(path).exists():  # a folder, or a .gguf file
        r["weights_bytes_disk"] = weights_size(path)
    return model, causal, r


def bench_group(paths: list[str], args: BenchArgs) -> list[dict]:
    """Load the models of `paths` together and measure them interleaved (CPU: all models in one group; CUDA: one
    model per group, so that max_memory_allocated is that model's)."""
    cuda = args.device.startswith("cuda")
    loaded = [_load(p, args) for p in paths]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    log.info(f"prefill: {', '.join(paths)}")
    prefills = [prefill_fn(m, args.batch, args.prompt_len, args.device) for m, _, _ in loaded]
    for (model, causal, r), secs in zip(loaded, interleaved(prefills, args.repeats, args.warmup)):
        r["prefill"] = _prefill_summary(secs, args)
        r["decode"] = {} if causal else None
    causal = [(m, r) for m, c, r in loaded if c]
    if causal and cuda:  # static KV cache + compiled forward; the warm-up runs pay for the compilation
        for m, _ in causal:
            m.forward = torch.compile(m.forward, mode="reduce-overhead", fullgraph=True)
    for batch in dict.fromkeys((1, args.batch)):
        log.info(f"decode at batch {batch}")
        decodes = [_decode_fn(m, args, batch) for m, _ in causal]
        for (m, r), runs in zip(causal, interleaved(decodes, args.repeats, args.warmup)):
            r["decode"][f"batch_{batch}"] = _decode_summary(runs, args, batch)
    for _, _, r in loaded:
        if cuda:
            r["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            r["memory_method"] = "torch.cuda.max_memory_allocated"
        else:
            r["peak_memory_bytes"] = r["weights_bytes"] + r["buffer_bytes"]
            r["memory_method"] = "estimate: parameter + buffer bytes (no activations)"
    results = [r for _, _, r in loaded]
    del loaded, causal
    if cuda:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return results


def ratios(results: list[dict], batch: int) -> list[dict]:
    """Each model against the first: sizes (model / first), measured speed-ups (> 1: faster) and their limits."""
    first, out = results[0], []
    key = f"batch_{batch}"
    for r in results:
        row = {"model": r["model"],
               "params": r["params"] / first["params"],
               "params_non_embedding": r["params_non_embedding"] / first["params_non_embedding"],
               "flops": r["flops_per_token"] / first["flops_per_token"],
               "bytes": r["weights_bytes"] / first["weights_bytes"],
               "prefill_speedup": r["prefill"]["tokens_per_s"] / first["prefill"]["tokens_per_s"],
               "prefill_limit": first["flops_per_token"] / r["flops_per_token"],
               "decode_limit": first["weights_bytes"] / r["weights_bytes"]}
        if r["decode"] and first["decode"]:
            for k in dict.fromkeys(("batch_1", key)):  # None where a time rounds to 0 (tiny models, N = 2)
                a, b = first["decode"][k]["ms_per_token"], r["decode"][k]["ms_per_token"]
                row[f"decode_speedup_{k}"] = a / b if a > 0 and b > 0 else None
        out.append(row)
    return out


def markdown(report: dict) -> str:
    """One column per model: figures (median, min-max), then ratios against the first model."""
    results, rats, b = report["models"], report["ratios"], report["args"]["batch"]
    p, n = report["args"]["prompt_len"], report["args"]["new_tokens"]
    spread = lambda d, k, f: f"{f(d[k])} ({f(d['min'])}-{f(d['max'])})"
    num = lambda v: f"{v:,.0f}"
    ms = lambda v: f"{v:.2f}"
    x = lambda v: f"{v:.2f}x"

    def dec(r, k):
        return spread(r["decode"][k], "ms_per_token", ms) if r["decode"] else "n/a"

    def rat(q, k):
        return x(q[k]) if q.get(k) is not None else "n/a"

    rows = [
        ("params", [f"{r['params']:,}" for r in results]),
        ("params (non-embedding)", [f"{r['params_non_embedding']:,}" for r in results]),
        (f"MFLOPs per token (P={p})", [f"{r['flops_per_token'] / 1e6:,.3f}" for r in results]),
        ("weights on disk (MB)", [f"{r['weights_bytes_disk'] / 1e6:.1f}" if "weights_bytes_disk" in r else "n/a"
                                  for r in results]),
        (f"weights in memory (MB, {report['dtype']})", [f"{r['weights_bytes'] / 1e6:.1f}" for r in results]),
        ("peak memory (MB)", [f"{r['peak_memory_bytes'] / 1e6:.1f}" for r in results]),
        (f"prefill tokens/s (B={b}, P={p}), median (min-max)",
         [spread(r["prefill"], "tokens_per_s", num) for r in results]),
        (f"decode ms/token (B=1, N={n})", [dec(r, "batch_1") for r in results]),
        (f"decode ms/token (B={b}, N={n})", [dec(r, f"batch_{b}") for r in results]),
        ("params ratio", [x(q["params"]) for q in rats]),
        ("FLOPs ratio", [x(q["flops"]) for q in rats]),
        ("bytes ratio", [x(q["bytes"]) for q in rats]),
        ("prefill speed-up (measured)", [x(q["prefill_speedup"]) for q in rats]),
        ("prefill limit (FLOPs first / model)", [x(q["prefill_limit"]) for q in rats]),
        ("decode speed-up B=1 (measured)", [rat(q, "decode_speedup_batch_1") for q in rats]),
        (f"decode speed-up B={b} (measured)", [rat(q, f"decode_speedup_batch_{b}") for q in rats]),
        ("decode limit (bytes first / model)", [x(q["decode_limit"]) for q in rats]),
    ]
    names = [r["model"] for r in results]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(vals) + " |" for label, vals in rows]
    lines.append(f"\nmemory: {results[0]['memory_method']}; spreads are min-max over {report['args']['repeats']} "
                 f"runs after {report['args']['warmup']} warm-up")
    return "\n".join(lines)


def bench(args: BenchArgs | None = None, /, **kwargs) -> dict:
    """Measure every model of `args.models` (see the module docstring); returns the report also written to --json."""
    args = resolve_args(BenchArgs, args, kwargs)
    args.check()
    set_quiet(args.quiet)
    groups = [[m] for m in args.models] if args.device.startswith("cuda") else [args.models]
    results = [r for g in groups for r in bench_group(g, args)]
    report = {"lopper_version": __version__, "args": asdict(args),
              "dtype": str(resolve_dtype(args.dtype, args.device)).removeprefix("torch."),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "threads": torch.get_num_threads(),
                          "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
              "flops_formula": "2 * matmul_params_non_embedding + 4 * prompt_len * sum_l(heads_l * head_dim)",
              "models": results}
    report["ratios"] = ratios(results, args.batch)
    report["markdown"] = markdown(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(report["markdown"] + "\n")
    return report
