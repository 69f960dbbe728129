#!/usr/bin/env bash
# Real OpenAI clients against `omniray serve`: guidellm (streaming benchmark) and
# lm-eval (local-completions: one generate_until and one multiple_choice task).
#
#   scripts/real_clients.sh [--debug] [--only guidellm|lm-eval] [--out DIR]
#
# Each tool lives in its own virtual environment under .venv-clients/ (built on
# first use, pinned below; git-ignored). The server runs from this checkout on the
# embedded local Ray with the default manifest, on a free port, with an API key,
# and is stopped on exit. Prints each tool's own summary, then one verdict line
# per tool; exits 0 only if every tool passed.
#
#   --debug   put a logging reverse proxy (scripts/real_clients/log_proxy.py) between
#             the clients and the server: every request's path, headers and JSON body
#             and every rejection go to OUT/requests.jsonl, summarized at the end
#   --only    run one tool
#   --out     where the logs, reports and results go (default: a new temp dir)
#
# Environment: SERVER_PYTHON (a python that can run the server; default python3,
# else a venv .venv-clients/server with `pip install -e .`), CLIENTS_VENV_DIR
# (default .venv-clients), GUIDELLM_REQUESTS (30), LM_EVAL_LIMIT (5),
# LM_TOKENIZER (auto: lm-eval's remote tokenizer if the server has /tokenizer_info
# and /tokenize, else the huggingface backend on the server's tokenizer.json;
# or force `remote` / `huggingface`), OMNIRAY_PROXY_STRIP (with --debug: request
# fields the proxy drops, to see what a client trips on next).
set -euo pipefail

GUIDELLM_SPEC="guidellm==0.8.1"
LM_EVAL_SPEC="lm_eval[api]==0.4.13"
LM_EVAL_EXTRA="transformers==5.25.0"   # lm-eval's huggingface tokenizer backend (no torch needed)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$REPO/scripts/real_clients"
VENVS="${CLIENTS_VENV_DIR:-$REPO/.venv-clients}"
MODEL="tiny-gqa-moge"
REQUESTS="${GUIDELLM_REQUESTS:-30}"
LIMIT="${LM_EVAL_LIMIT:-5}"
LM_TOKENIZER="${LM_TOKENIZER:-auto}"
DEBUG=0
ONLY=""
OUT=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --debug) DEBUG=1 ;;
    --only) ONLY="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
case "$ONLY" in ""|guidellm|lm-eval) ;; *) echo "--only takes guidellm or lm-eval" >&2; exit 2 ;; esac

OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/omniray-real-clients.XXXXXX")}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
log() { printf '\n== %s\n' "$*"; }

# ---- virtual environments --------------------------------------------------------
ensure_venv() {  # name, pip specs...: (re)build VENVS/name unless it holds exactly these specs
  local name="$1"; shift
  local dir="$VENVS/$name" want="$*"
  if [[ -x "$dir/bin/python" && -f "$dir/.specs" && "$(cat "$dir/.specs")" == "$want" ]]; then
    return
  fi
  log "installing $want into $dir"
  rm -rf "$dir"
  python3 -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$dir/bin/python" -m pip install -q "$@" 2>&1 | grep -v '^WARNING: Location' || true
  "$dir/bin/python" -m pip show "${1%%[[=<>]*}" >/dev/null  # the install must have worked
  echo "$want" > "$dir/.specs"
}

[[ -z "$ONLY" || "$ONLY" == guidellm ]] && ensure_venv guidellm "$GUIDELLM_SPEC"
[[ -z "$ONLY" || "$ONLY" == lm-eval ]] && ensure_venv lm-eval "$LM_EVAL_SPEC" "$LM_EVAL_EXTRA"

SERVER_PYTHON="${SERVER_PYTHON:-python3}"
if ! PYTHONPATH="$REPO" "$SERVER_PYTHON" -c "import ray, torch, cluster.cli" >/dev/null 2>&1; then
  if [[ ! -x "$VENVS/server/bin/python" ]]; then
    log "the server's dependencies are missing from $SERVER_PYTHON: installing the repo into $VENVS/server"
    python3 -m venv "$VENVS/server"
    "$VENVS/server/bin/python" -m pip install -q -e "$REPO" 2>&1 | grep -v '^WARNING: Location' || true
  fi
  SERVER_PYTHON="$VENVS/server/bin/python"
fi

# ---- the server's tokenizer as a Hugging Face tokenizer directory ------------------
TOKDIR="$OUT/tokenizer"
mkdir -p "$TOKDIR"
cp "$REPO/cluster/assets/tokenizer.json" "$TOKDIR/"
cat > "$TOKDIR/tokenizer_config.json" <<'EOF'
{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
 "pad_token": "<|pad|>", "model_max_length": 2048, "clean_up_tokenization_spaces": false}
EOF

# ---- the server ----------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
KEY="sk-omniray-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
SERVER_PID=""
PROXY_PID=""

cleanup() {
  local rc=$?
  set +e
  if [[ -n "$PROXY_PID" ]]; then kill "$PROXY_PID" 2>/dev/null; fi
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "stopping the server (pid $SERVER_PID)"
    kill -INT "$SERVER_PID" 2>/dev/null  # Ctrl-C: omniray tears Ray down itself
    for _ in $(seq 1 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then kill -TERM "$SERVER_PID" 2>/dev/null; sleep 5; fi
    if kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID" 2>/dev/null; fi
  fi
  echo "logs and reports: $OUT"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting omniray serve on 127.0.0.1:$PORT (log: $OUT/server.log)"
(cd "$REPO" && unset RAY_ADDRESS && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
  exec "$SERVER_PYTHON" -m cluster.cli serve --host 127.0.0.1 --port "$PORT" --api-key "$KEY") \
  > "$OUT/server.log" 2>&1 &
SERVER_PID=$!
AUTH=(-H "Authorization: Bearer $KEY")
for i in $(seq 1 300); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "the server exited while starting; its log's tail:"; tail -30 "$OUT/server.log"; exit 1
  fi
  if curl -sf "${AUTH[@]}" "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1; then break; fi
  if [[ $i == 300 ]]; then echo "the server did not answer /v1/models in 300 s"; tail -30 "$OUT/server.log"; exit 1; fi
  sleep 1
done
echo "ready after ${i} s"
smoke="$(curl -s "${AUTH[@]}" -H 'Content-Type: application/json' -o "$OUT/smoke.json" -w '%{http_code}' \
  "http://127.0.0.1:$PORT/v1/completions" \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"Mixture of experts\", \"max_tokens\": 4, \"temperature\": 0}" || true)"
echo "smoke test POST /v1/completions: HTTP $smoke $(head -c 300 "$OUT/smoke.json" 2>/dev/null)"

TARGET="http://127.0.0.1:$PORT"
if [[ $DEBUG == 1 ]]; then
  PROXY_PORT="$(free_port)"
  python3 "$HERE/log_proxy.py" "$PROXY_PORT" "$TARGET" "$OUT/requests.jsonl" > "$OUT/proxy.log" 2>&1 &
  PROXY_PID=$!
  for _ in $(seq 1 50); do curl -s -o /dev/null "http://127.0.0.1:$PROXY_PORT/health" && break; sleep 0.1; done
  TARGET="http://127.0.0.1:$PROXY_PORT"
  echo "debug: clients go through the logging proxy at $TARGET (requests: $OUT/requests.jsonl)"
fi

GUIDELLM_VERDICT=""
LM_EVAL_VERDICT=""
FAILED=0

# ---- guidellm: a streaming benchmark, synthetic data, synchronous rate ----------------
run_guidellm() {
  log "guidellm $GUIDELLM_SPEC: $REQUESTS synchronous streaming chat requests, 64 prompt / 16 output tokens"
  local report="$OUT/guidellm.json" rc=0
  (cd "$OUT" && timeout 600 "$VENVS/guidellm/bin/guidellm" run \
      --backend "kind=openai_http,target=$TARGET,model=$MODEL,api_key=$KEY" \
      --profile kind=synchronous \
      --constraint "kind=max_requests,count=$REQUESTS" \
      --data "kind=synthetic_text,prompt_tokens=64,output_tokens=16" \
      --tokenizer "kind=huggingface_auto,model=$TOKDIR" \
      --output "kind=json,path=$report" \
      --disable-progress) > "$OUT/guidellm.log" 2>&1 || rc=$?
  # its summary: the tables from the first statistics table on (the set-up steps stay in the log)
  awk '/^ℹ /{p=1} p' "$OUT/guidellm.log" | grep -v '^…' || tail -n 20 "$OUT/guidellm.log"
  GUIDELLM_VERDICT="$(python3 - "$report" "$rc" "$REQUESTS" <<'EOF'
import json, sys
path, rc, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    bench = json.load(open(path))["benchmarks"][0]
except Exception as e:  # noqa: BLE001
    print(f"FAIL (exit {rc}, no report: {e!r})"); sys.exit()
totals = bench["metrics"]["request_totals"]
ok, err, inc = totals["successful"], totals["errored"], totals["incomplete"]
errs = bench["requests"].get("errored") or []
first = (errs[0].get("error") or errs[0].get("info", {}).get("error") or "") if errs else ""
m = bench["metrics"]
def med(name, key="median"):
    try:
        return m[name]["successful"][key]
    except (KeyError, TypeError):
        return None
out_tok = sum((r.get("output_metrics") or {}).get("text_tokens") or 0 for r in bench["requests"].get("successful") or [])
if rc == 0 and ok >= want and err == 0 and inc == 0:
    ttft, itl = med("time_to_first_token_ms"), med("inter_token_latency_ms")
    print(f"PASS ({ok}/{want} streaming requests ok, {out_tok} output tokens"
          + (f", TTFT median {ttft:.0f} ms" if ttft is not None else "")
          + (f", ITL median {itl:.1f} ms" if itl is not None else "") + ")")
else:
    first = first.replace("\\n", "\n").splitlines()[0][:160] if first else ""
    print(f"FAIL (exit {rc}; {ok} ok, {err} errored, {inc} incomplete of {want}"
          + (f"; first error: {first}" if first else "") + ")")
EOF
)"
  [[ $GUIDELLM_VERDICT == PASS* ]] || FAILED=1
}

# ---- lm-eval: local-completions, a generate_until and a multiple_choice task ----------
run_lm_eval() {
  local backend="$LM_TOKENIZER" margs
  if [[ $backend == auto ]]; then
    if curl -sf "${AUTH[@]}" "http://127.0.0.1:$PORT/tokenizer_info" | grep -q eos_token \
       && curl -sf "${AUTH[@]}" -H 'Content-Type: application/json' "http://127.0.0.1:$PORT/tokenize" \
            -d '{"prompt": "test", "add_special_tokens": false}' | grep -q '"tokens"'; then
      backend=remote
    else
      backend=huggingface
    fi
  fi
  margs="model=$MODEL,base_url=$TARGET/v1/completions"
  if [[ $backend == remote ]]; then
    # lm-eval's own default (tokenizer_backend=auto) picks `remote` by itself when the server has
    # /tokenizer_info and /tokenize; it sends the key to them only when given auth_token.
    margs+=",auth_token=$KEY"
  else
    margs+=",tokenizer_backend=huggingface,tokenizer=$TOKDIR"
  fi
  local task type summary="" ok_all=1
  for task in omniray_gen omniray_mc; do
    type=$([[ $task == omniray_gen ]] && echo generate_until || echo multiple_choice)
    log "lm-eval $LM_EVAL_SPEC: local-completions, $task ($type), --limit $LIMIT, tokenizer $backend"
    local rc=0 dir="$OUT/lm-eval/$task"
    mkdir -p "$dir"
    (cd "$REPO" && OPENAI_API_KEY="$KEY" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       HF_DATASETS_CACHE="$OUT/hf-datasets" TOKENIZERS_PARALLELISM=false \
       timeout 600 "$VENVS/lm-eval/bin/lm_eval" --model local-completions --model_args "$margs" \
         --include_path "$HERE/tasks" --tasks "$task" --limit "$LIMIT" \
         --output_path "$dir" --log_samples) > "$dir/lm_eval.log" 2>&1 || rc=$?
    # its results table, or else its first failed request and its last error
    if grep -q '^|' "$dir/lm_eval.log"; then
      grep '^|' "$dir/lm_eval.log"
    else
      { grep -m1 'API request failed' "$dir/lm_eval.log" || true
        grep -E '^[A-Za-z_.]+(Error|Exception)' "$dir/lm_eval.log" | tail -n 1; } | cut -c1-600
    fi
    local v
    v="$(python3 - "$dir" "$task" "$rc" <<'EOF'
import glob, json, os, re, sys
d, task, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = open(os.path.join(d, "lm_eval.log"), errors="replace").read()
failed = re.findall(r"API request failed[^\n]*", text)
files = sorted(glob.glob(os.path.join(d, "**", "results_*.json"), recursive=True))
res = json.load(open(files[-1]))["results"].get(task) if files else None
metrics = {k.split(",")[0]: v for k, v in (res or {}).items()
           if k.split(",")[0] in ("exact_match", "acc", "acc_norm") and isinstance(v, (int, float))}
if rc == 0 and metrics and not failed:
    print("ok " + " ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
else:
    msg = re.search(r'"message":\s*"((?:[^"\\]|\\.)*)"', failed[0]) if failed else None
    why = (msg.group(1) if msg else failed[0]) if failed else \
        (re.findall(r"\n([\w.]+(?:Error|Exception)[^\n]*)", text) or ["no results"])[-1]
    print(f"FAIL (exit {rc}, {len(failed)} failed API requests: {why[:300]})")
EOF
)"
    [[ $v == ok* ]] || ok_all=0
    summary+="${summary:+; }$task: $v"
  done
  if [[ $ok_all == 1 ]]; then
    LM_EVAL_VERDICT="PASS (tokenizer_backend $backend; $summary)"
  else
    LM_EVAL_VERDICT="FAIL (tokenizer_backend $backend; $summary)"; FAILED=1
  fi
}

[[ -z "$ONLY" || "$ONLY" == guidellm ]] && run_guidellm
[[ -z "$ONLY" || "$ONLY" == lm-eval ]] && run_lm_eval

if [[ $DEBUG == 1 && -s "$OUT/requests.jsonl" ]]; then
  log "debug: requests the clients sent (from $OUT/requests.jsonl), one example per rejection"
  python3 - "$OUT/requests.jsonl" <<'EOF'
import collections, json, sys
seen, counts = {}, collections.Counter()
def short(b):
    if isinstance(b, dict):
        b = dict(b)
        if isinstance(b.get("prompt"), str) and len(b["prompt"]) > 40: b["prompt"] = b["prompt"][:40] + "..."
        if isinstance(b.get("prompt"), list) and b["prompt"] and isinstance(b["prompt"][0], list):
            b["prompt"] = [f"<{len(p)} token ids>" for p in b["prompt"]]
        if "messages" in b: b["messages"] = f"<{len(b['messages'])} messages>"
    return json.dumps(b)
for line in open(sys.argv[1]):
    r = json.loads(line)
    err = r["response_head"][:200] if r["status"] >= 400 else ""
    key = (r["method"], r["path"], r["headers"].get("user-agent", "?").split("/")[0], r["status"], err)
    counts[key] += 1
    seen.setdefault(key, r)
for key, r in seen.items():
    print(f"{counts[key]:4d} x {key[0]} {key[1]} from {key[2]} -> {key[3]}  auth={'authorization' in r['headers']}")
    if r["body"] is not None: print("       body:", short(r["body"])[:500])
    if r["status"] >= 400: print("       answer:", r["response_head"][:400])
EOF
fi

log "verdicts"
if [[ $DEBUG == 1 && -n "${OMNIRAY_PROXY_STRIP:-}" ]]; then
  echo "NOTE: the proxy dropped request fields ($OMNIRAY_PROXY_STRIP): these verdicts are not the server's own"
fi
[[ -z "$ONLY" || "$ONLY" == guidellm ]] && echo "guidellm: $GUIDELLM_VERDICT"
[[ -z "$ONLY" || "$ONLY" == lm-eval ]] && echo "lm-eval: $LM_EVAL_VERDICT"
if [[ $FAILED == 1 && $DEBUG == 0 ]]; then
  echo "(rerun with --debug to record what each client sent and what the server answered)"
fi
exit "$FAILED"
