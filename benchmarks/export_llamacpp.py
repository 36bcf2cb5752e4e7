"""llama.cpp reads `lopper export --format nemotron-nas` (not run in CI): same logits as lopper.load().

Prunes ../shared/models/ref-llama to 25% of its non-embedding parameters with per-layer widths (`--params 0.25
--allocation global --repair lsq`), exports it, converts the export with llama.cpp's own convert_hf_to_gguf.py (f32)
and runs it with llama.cpp (the llama-cpp-python bindings), then compares the logits on the first --windows windows
of 512 tokens of WikiText-2 raw test with lopper.load() of the pruned folder (llama.cpp with an f32 KV cache, so that
only the order of float32 sums differs). A second model has empty parts, the layout's no_op cases: layer 3 without
attention, layer 9 without MLP, layer 12 without either. Two more are tiny random Qwen2 (q/k/v biases) and Mistral
models from tests/tiny.py (4 layers, 4 heads of 32 in 2 KV groups, MLP 300), 30% removed with global widths, compared
on 40 random token ids. Writes JSON and a Markdown table.

ref-llama's tokenizer is a GPT-2 style byte-level BPE, which llama.cpp's DeciLM converter does not look for (it knows
Llama-3's and Llama-HF tokenizers), so the converter runs with its generic GPT-2 vocabulary writer; the token ids fed
to both sides are the same, so the tokenizer plays no part in the comparison.

    pip download llama-cpp-python --no-binary :all: --no-deps -d /tmp/lcpp && tar xzf /tmp/lcpp/llama_cpp_python-*.tar.gz -C /tmp/lcpp
    pip install /tmp/lcpp/llama_cpp_python-*/vendor/llama.cpp/gguf-py /tmp/lcpp/llama_cpp_python-*.tar.gz
    python benchmarks/export_llamacpp.py --llama-cpp /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import lopper
from lopper.export import ExportArgs, save_export
from lopper.io import load_model

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "tests"))
from test_export import _empty  # noqa: E402  (the same cut the unit test reads back)
from tiny import save_tiny  # noqa: E402
import quality  # noqa: E402  (benchmarks/: its machine description)

CONVERT = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base, conversion.deci as deci
deci.DeciModel.set_vocab = lambda self: self._set_vocab_gpt2()
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", required=True, help="llama.cpp source folder (has convert_hf_to_gguf.py)")
    p.add_argument("--model", default=str(SHARED / "models" / "ref-llama"))
    p.add_argument("--text", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--json", default=str(ROOT / "docs" / "export.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "export.md"))
    return p.parse_args()


def with_empty_parts(pruned: Path, out: Path) -> torch.nn.Module:
    """The pruned model with layer 3's attention, layer 9's MLP and layer 12's attention and MLP cut to nothing,
    exported to `out`; returns that model (the reference)."""
    model, tok, adapter = load_model(str(pruned), "cpu", "float32")
    layers = adapter.layers()
    _empty(layers[3], attention=True, mlp=False)
    _empty(layers[9], attention=False, mlp=True)
    _empty(layers[12], attention=True, mlp=True)
    save_export(model, tok, adapter, ExportArgs(model=str(pruned), out=str(out), quiet=True))
    return model


def tiny_case(family: str, tmp: Path):
    """(export folder, reference model, one window of 40 random ids) for a tiny random model of `family`."""
    src = save_tiny(tmp / f"{family}-src", family, seed=1, layers=4, heads=4, kv_heads=2, head_dim=32, mlp=300, init=0.2)
    pruned, nas = tmp / f"{family}-pruned", tmp / f"{family}-nas"
    lopper.prune(model=str(src), out=str(pruned), params=0.3, allocation="global", repair="lsq", calib_samples=8,
                 seq_len=32, quiet=True)
    lopper.export(model=str(pruned), out=str(nas), quiet=True)
    return nas, lopper.load(str(pruned)), [torch.randint(4, 96, (40,), generator=torch.Generator().manual_seed(0)).tolist()]


def compare(reference, gguf: Path, windows: list[list[int]]) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=512, logits_all=True, n_threads=2, verbose=False,
                type_k=0, type_v=0)  # GGML_TYPE_F32: llama.cpp's default f16 KV cache adds ~1e-3 relative error
    worst, nll_cpp, nll_ref, count = 0.0, 0.0, 0.0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        ours = torch.tensor(llm.scores[:len(ids)], dtype=torch.float32)
        with torch.no_grad():
            ref = reference(input_ids=torch.tensor([ids])).logits[0].float()
        worst = max(worst, (ours - ref).abs().max().item())
        target = torch.tensor(ids[1:])
        nll_cpp += torch.nn.functional.cross_entropy(ours[:-1], target, reduction="sum").item()
        nll_ref += torch.nn.functional.cross_entropy(ref[:-1], target, reduction="sum").item()
        count += len(ids) - 1
    return {"max_abs_logit_diff": worst, "perplexity_llama_cpp": math.exp(nll_cpp / count),
            "perplexity_lopper": math.exp(nll_ref / count), "tokens": count}


def main() -> None:
    args = parse()
    tmp = Path(tempfile.mkdtemp(prefix="lopper-export-"))
    pruned, nas = tmp / "pruned", tmp / "nas"
    lopper.prune(model=args.model, out=str(pruned), params=0.25, allocation="global", repair="lsq",
                 calib=str(SHARED / "data" / "english" / "webtext.txt"), quiet=True)
    report = lopper.export(model=str(pruned), out=str(nas), quiet=True)
    empty = with_empty_parts(pruned, tmp / "nas-empty")
    tok = transformers.AutoTokenizer.from_pretrained(str(pruned))
    ids = tok(Path(args.text).read_text()[:400_000], add_special_tokens=False)["input_ids"]
    windows = [ids[w * 512:(w + 1) * 512] for w in range(args.windows)]
    cases = [("ref-llama, 25% removed, global widths", nas, lopper.load(str(pruned)), windows),
             ("same, layer 3 no attention, 9 no MLP, 12 neither", tmp / "nas-empty", empty, windows)]
    for family in ("qwen2", "mistral"):
        cases.append((f"tiny random {family}, 30% removed, global widths", *tiny_case(family, tmp)))
    rows = []
    for name, folder, reference, windows in cases:
        gguf = folder.with_suffix(".gguf")
        subprocess.run([sys.executable, "-c", CONVERT, args.llama_cpp, str(folder), "--outfile", str(gguf),
                        "--outtype", "f32"], check=True, capture_output=True)
        rows.append({"model": name, "blocks": json.loads((folder / "config.json").read_text())["block_configs"],
                     **compare(reference, gguf, windows)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "blocks"}), flush=True)
    machine = f"{quality.machine('cpu')}, llama-cpp-python {importlib.metadata.version('llama_cpp_python')}"
    command = "python benchmarks/export_llamacpp.py " + " ".join(sys.argv[1:])
    out = {"command": command, "machine": machine, "padding_params": report["padding_params"],
           "params_before": report["params_before"], "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# llama.cpp reads lopper's Nemotron-NAS export", "",
             f"`{os.path.relpath(args.model, ROOT)}` pruned with `--params 0.25 --allocation global --repair lsq`, exported with `lopper export "
             f"--format nemotron-nas` ({report['padding_params']:,} parameters of zero padding on "
             f"{report['params_before']:,}), converted by llama.cpp's convert_hf_to_gguf.py (f32) and run by llama.cpp; "
             f"logits compared with lopper.load() on the first {args.windows} windows of 512 tokens of WikiText-2 raw "
             "test (the same token ids on both sides; llama.cpp with an f32 KV cache). The tiny random Qwen2 and "
             "Mistral models (tests/tiny.py, 4 layers, 30% removed with global widths) are compared on 40 random "
             "token ids.", "",
             "| model | max abs logit difference | perplexity, llama.cpp | perplexity, lopper |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['max_abs_logit_diff']:.1e} | {r['perplexity_llama_cpp']:.3f} | "
              f"{r['perplexity_lopper']:.3f} |" for r in rows]
    lines += ["", f"Command: `{command}`", "", f"Machine: {machine}."]
    Path(args.doc).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
