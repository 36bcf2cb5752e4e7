"""GGUF in, smaller GGUF out, checked in llama.cpp itself (not run in CI): size, perplexity, greedy text and speed.

For the input GGUF and each GGUF that `lopper prune INPUT.gguf --out OUT.gguf` wrote:
- size on disk;
- perplexity by llama.cpp's llama-perplexity (-c CTX, the first --chunks chunks of WikiText-2 raw test; it scores
  the second half of every chunk) and by lopper on the same file read through transformers' GGUF reader
  (dequantized, float32), scored the way llama-perplexity scores: same tokens, same chunks, same halves;
- greedy continuation of a prompt by llama-completion (--temp 0) and by transformers' generate on the same file;
- speed by llama-bench (prompt processing of --pp tokens, generation of --tg tokens, --threads, --repeats), the
  median of its samples, and the limits the files' shapes set: prompt processing by matmul FLOPs per token
  (2 x matmul weights + 4 x CTX/2 x attention width, as `lopper bench`), generation by the bytes of the matrices one
  token reads (every block matrix and the output matrix; the token embedding is only gathered).
Ratios are each file against the input, measured in one run on the same machine.

    pip download llama-cpp-python --no-binary :all: --no-deps -d /tmp/lcpp && tar xzf /tmp/lcpp/*.tar.gz -C /tmp/lcpp
    L=/tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S $L -B $L/build -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON
    cmake --build $L/build -j2 --target llama-perplexity llama-bench llama-completion
    lopper prune SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/gg/smol-25.gguf --params 0.25
    python benchmarks/gguf_llamacpp.py --bin $L/build/bin --input SmolLM2-135M-Instruct.Q4_1.gguf \\
        --pruned /tmp/gg/smol-25.gguf --json docs/gguf_smollm2.json
    python benchmarks/gguf_llamacpp.py --render docs/gguf_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

from lopper.io import load_model

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
PROMPT = "The history of the city of Paris begins"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--render", default="", help="write the Markdown of this JSON result beside it, and stop")
    p.add_argument("--bin", default="", help="folder with llama.cpp's llama-perplexity, llama-bench, llama-completion")
    p.add_argument("--input", default="", help="the GGUF that was pruned")
    p.add_argument("--pruned", nargs="+", default=[], help="GGUF files lopper wrote from it")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pp", type=int, default=512)
    p.add_argument("--tg", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", default="")
    a = p.parse_args()
    if not a.render and not (a.bin and a.input and a.pruned and a.json):
        p.error("give --bin, --input, --pruned and --json (or --render RESULT.json)")
    return a


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def llama_perplexity(a, path: str) -> dict:
    """llama-perplexity's estimate over the first --chunks chunks: its running estimate [k] is the perplexity of the
    first k chunks. It runs one chunk more and reads [chunks], because its asynchronous logger may drop the last
    lines at exit (the final estimate among them)."""
    done = subprocess.run([f"{a.bin}/llama-perplexity", "-m", path, "-f", str(WIKI), "-c", str(a.ctx), "--chunks",
                           str(a.chunks + 1), "-t", str(a.threads), "-b", str(a.ctx)], capture_output=True, text=True)
    running = {int(k): float(v) for k, v in re.findall(r"\[(\d+)\]([\d.]+)", done.stdout)}
    if done.returncode or a.chunks not in running:
        raise SystemExit(f"llama-perplexity failed:\n{(done.stdout + done.stderr)[-2000:]}")
    return {"perplexity": running[a.chunks], "running": [running[k] for k in range(1, a.chunks + 1)]}


@torch.no_grad()
def lopper_perplexity(a, model, tok, add_bos: bool) -> dict:
    """llama-perplexity's score: chunks of CTX tokens of the whole tokenized file (its bytes as they are), the first token replaced by BOS
    when the vocabulary adds one, the log-likelihood of the tokens in each chunk's second half."""
    text = WIKI.read_bytes().decode("utf-8")  # as llama.cpp reads it: WikiText-2's CRLF line ends kept
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    first, nll, count = a.ctx // 2, 0.0, 0
    for c in range(a.chunks):
        x = ids[c * a.ctx:(c + 1) * a.ctx].clone()
        targets = x[first + 1:].clone()
        if add_bos:
            x[0] = tok.bos_token_id
        logp = model(input_ids=x[None]).logits[0, first:-1].float().log_softmax(-1)
        nll -= logp.gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return {"perplexity": math.exp(nll / count), "tokens_scored": count}


def llama_greedy(a, path: str) -> str:
    out = subprocess.run([f"{a.bin}/llama-completion", "-m", path, "-p", PROMPT, "-n", str(a.new_tokens), "--temp", "0",
                          "-t", str(a.threads), "-no-cnv", "--no-warmup", "-s", "0"], capture_output=True, text=True)
    text = out.stdout
    return text[text.find(PROMPT) + len(PROMPT):].strip() if PROMPT in text else text.strip()


@torch.no_grad()
def lopper_greedy(a, model, tok) -> str:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def bench(a, paths: list[str]) -> list[dict]:
    """llama-bench over every file in one run: median tokens/s of prompt processing and of generation."""
    cmd = [f"{a.bin}/llama-bench", "-p", str(a.pp), "-n", str(a.tg), "-t", str(a.threads), "-r", str(a.repeats),
           "-o", "json"]
    for p in paths:
        cmd += ["-m", p]
    rows = json.loads(_json_part(run(cmd)))
    out = {p: {} for p in paths}
    for r in rows:
        kind = "pp" if r["n_prompt"] else "tg"
        out[r["model_filename"]][kind] = {"tokens_per_s": statistics.median(r["samples_ts"]),
                                          "samples": r["samples_ts"]}
    return [out[p] for p in paths]


def _json_part(text: str) -> str:
    return text[text.find("["):text.rfind("]") + 1]


def shape(path: str, ctx: int) -> dict:
    """Bytes of the matrices a generated token reads, and matmul FLOPs per prompt token, from the file itself."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    f = {k.removeprefix(arch + "."): r.fields[k].contents() for k in r.fields if k.startswith(arch + ".")}
    mats = [t for t in r.tensors if len(t.shape) >= 2 and (t.name.startswith("blk.") or t.name == "output.weight")]
    if not any(t.name == "output.weight" for t in r.tensors):  # tied: the token embedding is the output matrix
        mats += [t for t in r.tensors if t.name == "token_embd.weight"]
    head = f.get("attention.key_length") or f["embedding_length"] // f["attention.head_count"]
    attn = f["block_count"] * f["attention.head_count"] * head
    return {"bytes_read_per_token": sum(int(t.n_bytes) for t in mats),
            "flops_per_token": 2 * sum(int(t.n_elements) for t in mats) + 4 * (ctx // 2) * attn,
            "layers": f["block_count"], "mlp": f["feed_forward_length"], "heads": f["attention.head_count"],
            "kv_heads": f["attention.head_count_kv"],
            "types": sorted({t.tensor_type.name for t in r.tensors})}


def measure(a, path: str) -> dict:
    from gguf import GGUFReader

    t = time.time()
    model, tok, _ = load_model(path)
    field = GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    add_bos = bool(field and field.contents())
    row = {"file": path, "size_bytes": Path(path).stat().st_size, **shape(path, a.ctx),
           "llama_cpp": llama_perplexity(a, path), "lopper": lopper_perplexity(a, model, tok, add_bos),
           "greedy": {"llama_cpp": llama_greedy(a, path), "lopper": lopper_greedy(a, model, tok)}}
    row["perplexity_llama_over_lopper"] = row["llama_cpp"]["perplexity"] / row["lopper"]["perplexity"]
    g = row["greedy"]
    row["greedy"]["same_prefix_chars"] = next((i for i, (x, y) in enumerate(zip(g["llama_cpp"], g["lopper"]))
                                               if x != y), min(len(g["llama_cpp"]), len(g["lopper"])))
    words = g["llama_cpp"].split()
    row["greedy"]["distinct_word_share"] = len(set(words)) / max(1, len(words))
    row["seconds"] = round(time.time() - t, 1)
    print(f"{path}: {row['size_bytes'] / 1e6:.2f} MB, llama.cpp {row['llama_cpp']['perplexity']:.2f}, lopper "
          f"{row['lopper']['perplexity']:.2f}", flush=True)
    return row


def main() -> None:
    a = parse()
    if a.render:
        return render(a.render)
    t0 = time.time()
    paths = [a.input, *a.pruned]
    rows = [measure(a, p) for p in paths]
    for row, speed in zip(rows, bench(a, paths)):
        row["speed"] = speed
    base = rows[0]
    for r in rows:
        r["vs_input"] = {
            "size": r["size_bytes"] / base["size_bytes"],
            "pp_speedup": r["speed"]["pp"]["tokens_per_s"] / base["speed"]["pp"]["tokens_per_s"],
            "pp_limit": base["flops_per_token"] / r["flops_per_token"],
            "tg_speedup": r["speed"]["tg"]["tokens_per_s"] / base["speed"]["tg"]["tokens_per_s"],
            "tg_limit": base["bytes_read_per_token"] / r["bytes_read_per_token"]}
        r["vs_input"]["pp_share_of_limit"] = (r["vs_input"]["pp_speedup"] - 1) / (r["vs_input"]["pp_limit"] - 1) \
            if r["vs_input"]["pp_limit"] > 1 else None
        r["vs_input"]["tg_share_of_limit"] = (r["vs_input"]["tg_speedup"] - 1) / (r["vs_input"]["tg_limit"] - 1) \
            if r["vs_input"]["tg_limit"] > 1 else None
    version = run([f"{a.bin}/llama-cli", "--version"]) if Path(f"{a.bin}/llama-cli").exists() else ""
    result = {"command": "python benchmarks/gguf_llamacpp.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
                  for k, v in vars(a).items() if v not in ("", None, [])),
              "prompt": PROMPT, "files": rows, "llama_cpp_version": version.strip()[-200:],
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": a.threads,
                          "torch": torch.__version__},
              "seconds": round(time.time() - t0, 1)}
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    render(a.json)


def render(path: str) -> None:
    r = json.loads(Path(path).read_text())
    lines = ["# GGUF in, GGUF out, run in llama.cpp", "", f"`{r['command']}`", "",
             "Perplexity: WikiText-2 raw test, the first chunks of 512 tokens, second halves scored (llama-perplexity's "
             "rule), by llama.cpp and by lopper on the same file (transformers' GGUF reader, float32). Speed: "
             "llama-bench, median tokens/s; each speed-up against the input beside its limit (prompt processing: matmul "
             "FLOPs per token; generation: bytes of the matrices a token reads), as speed-up / limit and as the share "
             "of the gain, (speed-up - 1) / (limit - 1).", "",
             "| file | MB | size | layers | MLP | types | llama.cpp ppl | lopper ppl | ratio | pp t/s | pp speed-up "
             "(limit; of limit, of gain) | tg t/s | tg speed-up (limit; of limit, of gain) |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in r["files"]:
        v, s = f["vs_input"], f["speed"]
        share = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
        lines.append(f"| {Path(f['file']).name} | {f['size_bytes'] / 1e6:.2f} | {v['size']:.3f}x | {f['layers']} | "
                     f"{f['mlp']} | {', '.join(f['types'])} | {f['llama_cpp']['perplexity']:.2f} | "
                     f"{f['lopper']['perplexity']:.2f} | {f['perplexity_llama_over_lopper']:.3f} | "
                     f"{s['pp']['tokens_per_s']:.1f} | {v['pp_speedup']:.2f}x ({v['pp_limit']:.2f}x; "
                     f"{v['pp_speedup'] / v['pp_limit']:.0%}, {share(v['pp_share_of_limit'])}) | "
                     f"{s['tg']['tokens_per_s']:.1f} | {v['tg_speedup']:.2f}x ({v['tg_limit']:.2f}x; "
                     f"{v['tg_speedup'] / v['tg_limit']:.0%}, {share(v['tg_share_of_limit'])}) |")
    lines += ["", f"Greedy continuation of \"{r['prompt']}\":", ""]
    for f in r["files"]:
        g = f["greedy"]
        lines += [f"- {Path(f['file']).name}, llama.cpp: \"{g['llama_cpp']}\"",
                  f"  lopper: \"{g['lopper']}\" (same first {g['same_prefix_chars']} characters)"]
    m = r["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}; {r['seconds']:.0f} s.", ""]
    Path(path).with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
