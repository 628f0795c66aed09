#!/usr/bin/env python3
"""Checks tinygpt's exports against the real ecosystem: transformers and llama.cpp.

For two small models, a character model (with biases everywhere) and a BPE model, it

  1. trains the model with `tinygpt train` (configs/tiny.toml, 300 steps, on the corpus plus a few lines
     with multi-byte characters);
  2. exports it with `tinygpt export` to a Hugging Face folder and to GGUF (f32 and f16);
  3. asks tinygpt for the ids of a few texts (`tinygpt tokenize --json`) and for the
     logits at every position of a prompt (`tinygpt logits --json`);
  4. loads the Hugging Face folder with `AutoTokenizer` / `AutoModelForCausalLM`: the ids
     must be the same, decode(ids) must give the text back, and the float32 logits must
     agree to 1e-4;
  5. loads the GGUF files with llama-cpp-python: the ids must be the same, the argmax must
     agree at every position, and the f32 file's logits must agree to 1e-2 (the f16 file's
     difference is only reported);
  6. prints a table of the results and exits with 1 if any check failed.

It is not part of CI. It needs a release build of tinygpt, the corpus, and

    pip install torch transformers llama-cpp-python numpy

Usage, from the repository root:

    python scripts/check_interop.py [--tinygpt target/release/tinygpt]
        [--corpus ../shared/data/tinyshakespeare.txt] [--work DIR] [--skip-llama]

The default paths are relative to the repository root; paths given on the command line
are relative to the current directory.
"""

import argparse
import inspect
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny.toml"
MARKER = ".check_interop"  # marks a work folder this script made and may clean

# How tinygpt is asked for JSON (`tinygpt tokenize ... TEXT` and `tinygpt logits --prompt`).
TOKENIZE_JSON = ["--json"]
LOGITS_JSON = ["--json"]

# Logits bounds: max |tinygpt - other| over every position and vocabulary entry.
HF_BOUND = 1e-4
# The repetition penalty of the greedy decoding compared with transformers' generate().
PENALTY = 1.3
# The tinygpt binary (set by main).
EXE = [None]
GGUF_F32_BOUND = 1e-2
# Argmax must agree at every position: no allowance for near-ties.
NEAR_TIE = {"f32": 0.0, "f16": 0.0}

# Appended to the corpus, so that the char vocabulary has multi-byte characters too.
NON_ASCII = "Café — naïve 日本, über straße.\n"
STEPS = 300

CHAR_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
    "Café — naïve 日本\n  two  spaces",
]
BPE_TEXTS = [CHAR_TEXTS[1], CHAR_TEXTS[0]]

# name, extra `--set` overrides for `tinygpt train`, test texts
MODELS = [
    ("char", ["model.bias=true", "model.qkv_bias=true"], CHAR_TEXTS),
    ("bpe", ['tokenizer.kind="bpe"', "tokenizer.vocab_size=512"], BPE_TEXTS),
]


class StepFailed(Exception):
    """A step that later checks of the same model depend on failed (already recorded)."""


class Results:
    def __init__(self):
        self.rows = []

    def add(self, model, check, value, bound, ok):
        """ok: True (PASS), False (FAIL) or None (information only)."""
        status = "info" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append((model, check, str(value), str(bound), status))
        print(f"  [{status}] {model}: {check}: {value}" + (f" (bound {bound})" if bound != "" else ""),
              flush=True)
        return ok

    def failed(self):
        return [r for r in self.rows if r[4] == "FAIL"]

    def table(self):
        head = ("model", "check", "value", "bound", "result")
        widths = [max(len(head[i]), *(len(r[i]) for r in self.rows)) for i in range(5)]
        widths[2] = min(widths[2], 60)
        line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
        out = [line, "-" * len(line)]
        for r in self.rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        return "\n".join(out)


def short(s, n=60):
    s = s if isinstance(s, str) else repr(s)
    return s if len(s) <= n else s[: n - 1] + "…"


def tinygpt(exe, args, what, res, model):
    """Runs tinygpt with an argument list; records a FAIL and raises StepFailed if it fails."""
    cmd = [str(exe), *map(str, args)]
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, encoding="utf-8",
                           timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        res.add(model, what, f"could not run: {e}", "", False)
        raise StepFailed from e
    if p.returncode != 0:
        print(f"\n$ {shlex.join(cmd)}\nexit status {p.returncode}; stderr:\n{p.stderr.rstrip()}\n",
              file=sys.stderr, flush=True)
        if p.stdout.strip():
            print(f"stdout (tail):\n{p.stdout[-2000:].rstrip()}\n", file=sys.stderr, flush=True)
        res.add(model, what, f"exit status {p.returncode}", "0", False)
        raise StepFailed
    return p.stdout


def parse_json(stdout, what, res, model):
    """The JSON object tinygpt printed (the whole stdout, or its last line that parses)."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        for line in reversed(stdout.strip().splitlines()):
            if line.lstrip().startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    pass
    res.add(model, what, f"no JSON in output: {short(stdout)!r}", "", False)
    raise StepFailed


def tg_ids(exe, ckpt, text, res, model):
    out = tinygpt(exe, ["tokenize", "--checkpoint", ckpt, *TOKENIZE_JSON, text],
                  "tinygpt tokenize", res, model)
    return [int(i) for i in parse_json(out, "tinygpt tokenize", res, model)["ids"]]


def tg_logits(exe, ckpt, prompt, res, model):
    out = tinygpt(exe, ["logits", "--checkpoint", ckpt, "--prompt", prompt, *LOGITS_JSON],
                  "tinygpt logits", res, model)
    d = parse_json(out, "tinygpt logits", res, model)
    return [int(i) for i in d["ids"]], d["logits"]


def block_size():
    text = CONFIG.read_text(encoding="utf-8")
    try:
        import tomllib
        return int(tomllib.loads(text)["model"]["block_size"])
    except ImportError:
        m = re.search(r"^\s*block_size\s*=\s*(\d+)", text, re.M)
        return int(m.group(1))


def prompt_prefix(exe, ckpt, text, full_ids, limit, res, model):
    """The longest prefix of text (by characters) that tinygpt makes at most `limit` ids."""
    cut, n = len(text), len(full_ids)
    while n > limit:
        cut = max(1, min(cut - 1, cut * limit // n))
        n = len(tg_ids(exe, ckpt, text[:cut], res, model))
    return text[:cut]


def compare_logits(np, ref, other, bound, near_tie, res, model, who):
    """max |diff| (checked against bound, or reported if bound is None) and argmax agreement."""
    # Both sides are float32 values (JSON gives their shortest decimals: read them back as
    # float32, then compare in float64).
    ref = np.asarray(ref, dtype=np.float32).astype(np.float64)
    other = np.asarray(other, dtype=np.float32).astype(np.float64)
    if ref.shape != other.shape:
        res.add(model, f"{who} logits shape", f"{other.shape} vs tinygpt {ref.shape}",
                "equal", False)
        return
    diff = float(np.abs(ref - other).max()) if ref.size else 0.0
    if not np.isfinite(other).all():
        diff = float("inf")
    if bound is None:
        res.add(model, f"{who} max |logit diff|", f"{diff:.3g}", "", None)
    else:
        res.add(model, f"{who} max |logit diff|", f"{diff:.3g}", bound, diff <= bound)
    a, b = ref.argmax(-1), other.argmax(-1)
    mism = [i for i in range(len(a)) if a[i] != b[i]]
    top2 = np.sort(ref, axis=-1)[:, -2:] if ref.shape[-1] > 1 else None
    real = [i for i in mism if top2 is None or top2[i, 1] - top2[i, 0] >= near_tie]
    value = f"{len(a) - len(mism)}/{len(a)} positions agree"
    if mism:
        value += f" ({len(mism) - len(real)} differ at near-ties < {near_tie:g}, first at {mism[0]})"
    res.add(model, f"{who} argmax", value, "all", not real)


def check_hf(np, hf_dir, texts, tg, res, model):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(hf_dir)
    except Exception as e:  # noqa: BLE001 - report whatever transformers raises
        res.add(model, "HF AutoTokenizer loads", f"{type(e).__name__}: {short(str(e), 200)}", "", False)
        return
    res.add(model, "HF tokenizer class", type(tok).__name__, "", None)
    for text, (ids, _, _, _) in zip(texts, tg):
        hf_ids = list(tok(text)["input_ids"])
        ok = hf_ids == ids
        value = f"{len(ids)} ids equal" if ok else f"hf {short(hf_ids)} vs tinygpt {short(ids)}"
        res.add(model, f"HF ids of {short(text, 20)!r}", value, "equal", ok)
        back = tok.decode(ids)
        res.add(model, f"HF decode of {short(text, 20)!r}",
                "round-trips" if back == text else f"{short(back)!r}", "== text", back == text)

    v = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kw = "dtype" if v >= (4, 56) else "torch_dtype"
    try:
        lm = AutoModelForCausalLM.from_pretrained(hf_dir, **{dtype_kw: torch.float32})
    except Exception as e:  # noqa: BLE001
        res.add(model, "HF AutoModelForCausalLM loads", f"{type(e).__name__}: {short(str(e), 200)}",
                "", False)
        return
    lm.eval()
    res.add(model, "HF model class", type(lm).__name__, "", None)
    for text, (_, prompt, p_ids, p_logits) in zip(texts, tg):
        who = f"HF {len(p_ids)} ids of {short(prompt, 14)!r}"
        try:
            with torch.no_grad():
                out = lm(torch.tensor([p_ids], dtype=torch.long)).logits[0]
            out = out.to(torch.float32).numpy()
        except Exception as e:  # noqa: BLE001
            res.add(model, f"{who} forward", f"{type(e).__name__}: {short(str(e), 200)}", "", False)
            continue
        compare_logits(np, p_logits, out, HF_BOUND, NEAR_TIE["f32"], res, model, who)

    # Greedy decoding with a repetition penalty: tinygpt's and transformers' texts agree.
    for text, (_, _, p_ids, _) in zip(texts, tg):
        prompt = tok.decode(p_ids[:8])
        new = 20
        argv = ["generate", "--checkpoint", str(hf_dir.parent / model), "--prompt", prompt,
                "--temperature", "0", "--repetition-penalty", str(PENALTY),
                "--max-new-tokens", str(new)]
        ours = tinygpt(EXE[0], argv, "tinygpt generate", res, model)
        with torch.no_grad():
            out = lm.generate(torch.tensor([p_ids[:8]]), do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, repetition_penalty=PENALTY, top_k=None,
                              top_p=None, temperature=None, pad_token_id=0)
        theirs = prompt + tok.decode(out[0][8:].tolist()) + "\n"
        ok = ours == theirs
        res.add(model, f"greedy + repetition penalty {PENALTY} from {short(prompt, 12)!r}",
                "same text" if ok else f"{short(ours)!r} vs HF {short(theirs)!r}", "equal", ok)


def llama_constructor():
    from llama_cpp import Llama

    params = inspect.signature(Llama.__init__).parameters
    if "logits_all" not in params:
        raise RuntimeError("this llama-cpp-python's Llama() has no logits_all parameter; "
                           "the check needs logits at every position")
    return Llama


def check_gguf(np, gguf, dtype, n_ctx, texts, tg, res, model):
    who = f"llama.cpp {dtype}"
    try:
        Llama = llama_constructor()
        llm = Llama(model_path=str(gguf), n_ctx=n_ctx, logits_all=True, verbose=False,
                    n_threads=2, n_threads_batch=2)
    except Exception as e:  # noqa: BLE001 - llama_cpp raises ValueError/RuntimeError
        res.add(model, f"{who} loads", f"{type(e).__name__}: {short(str(e), 200)}", "", False)
        return
    for text, (ids, prompt, p_ids, p_logits) in zip(texts, tg):
        try:
            ll_ids = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
            back = llm.detokenize(ids).decode("utf-8", errors="replace")
        except Exception as e:  # noqa: BLE001
            res.add(model, f"{who} tokenize", f"{type(e).__name__}: {short(str(e), 200)}", "", False)
        else:
            ok = ll_ids == ids
            value = f"{len(ids)} ids equal" if ok else f"llama {short(ll_ids)} vs tinygpt {short(ids)}"
            res.add(model, f"{who} ids of {short(text, 20)!r}", value, "equal", ok)
            res.add(model, f"{who} detokenize of {short(text, 20)!r}",
                    "round-trips" if back == text else f"{short(back)!r}", "== text", back == text)
        check = f"{who} {len(p_ids)} ids of {short(prompt, 14)!r}"
        try:
            llm.reset()
            llm.eval(p_ids)
            scores = np.array(llm.scores[: len(p_ids)], dtype=np.float32, copy=True)
        except Exception as e:  # noqa: BLE001
            res.add(model, f"{check} eval", f"{type(e).__name__}: {short(str(e), 200)}", "", False)
            continue
        compare_logits(np, p_logits, scores, GGUF_F32_BOUND if dtype == "f32" else None,
                       NEAR_TIE[dtype], res, model, check)
    del llm


def run_model(exe, corpus, work, name, sets, texts, skip_llama, res):
    import numpy as np

    ckpt = work / name
    hf_dir = work / f"{name}-hf"
    gguf = {"f32": work / f"{name}.gguf", "f16": work / f"{name}-f16.gguf"}
    block = block_size()

    print(f"\n== {name} model ==", flush=True)
    train = ["train", "--config", CONFIG, "--data", corpus, "--out", ckpt, "-q",
             "--sample-tokens", "0", "--set", f"training.max_iters={STEPS}"]
    for s in sets:
        train += ["--set", s]
    tinygpt(exe, train, "tinygpt train", res, name)
    res.add(name, "tinygpt train", "ok", "", True)

    tinygpt(exe, ["export", "--checkpoint", ckpt, "--format", "hf", "--out", hf_dir],
            "tinygpt export hf", res, name)
    res.add(name, "tinygpt export hf", "ok", "", True)
    if not skip_llama:
        for dtype, path in gguf.items():
            tinygpt(exe, ["export", "--checkpoint", ckpt, "--format", "gguf", "--out", path,
                          "--dtype", dtype], f"tinygpt export gguf {dtype}", res, name)
            res.add(name, f"tinygpt export gguf {dtype}", f"{path.stat().st_size} bytes", "", True)

    # tinygpt's side: ids of each whole text; the longest prefix that fits the context and
    # its logits.
    tg = []
    for text in texts:
        ids = tg_ids(exe, ckpt, text, res, name)
        prompt = prompt_prefix(exe, ckpt, text, ids, block, res, name)
        p_ids, p_logits = tg_logits(exe, ckpt, prompt, res, name)
        if len(p_ids) > block:
            res.add(name, "tinygpt logits ids fit", f"{len(p_ids)} ids", f"<= {block}", False)
            raise StepFailed
        if prompt == text and p_ids != ids:
            res.add(name, "tinygpt logits ids == tokenize ids", short(p_ids), short(ids), False)
            raise StepFailed
        if len(p_logits) != len(p_ids):
            res.add(name, "tinygpt logits rows", len(p_logits), len(p_ids), False)
            raise StepFailed
        tg.append((ids, prompt, p_ids, p_logits))
        res.add(name, f"tinygpt on {short(text, 20)!r}",
                f"{len(ids)} ids; logits on {len(p_ids)} ids x {len(p_logits[0]) if p_logits else 0}",
                "", None)

    check_hf(np, hf_dir, texts, tg, res, name)
    if not skip_llama:
        for dtype, path in gguf.items():
            check_gguf(np, path, dtype, block, texts, tg, res, name)


def prepare_work(arg):
    if arg is None:
        work = Path(tempfile.mkdtemp(prefix="tinygpt-interop-"))
    else:
        work = Path(arg).resolve()
        work.mkdir(parents=True, exist_ok=True)
        ours = (work / MARKER).exists()
        for name, _, _ in MODELS:
            for p in (work / name, work / f"{name}-hf", work / f"{name}.gguf",
                      work / f"{name}-f16.gguf"):
                if p.exists() and not ours:
                    sys.exit(f"{p} exists and {work} was not made by this script; "
                             "pass an empty or new --work folder")
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    (work / MARKER).write_text("made by scripts/check_interop.py; its outputs are replaced on reruns\n")
    return work


def main():
    ap = argparse.ArgumentParser(
        description="Check tinygpt's Hugging Face and GGUF exports against transformers and "
                    "llama.cpp (needs: pip install torch transformers llama-cpp-python numpy).")
    ap.add_argument("--tinygpt", help="the tinygpt binary (default: target/release/tinygpt)")
    ap.add_argument("--corpus", help="text to train on (default: ../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--work", help="folder for checkpoints and exports (default: a new temporary "
                                   "folder, kept)")
    ap.add_argument("--skip-llama", action="store_true", help="skip the GGUF / llama.cpp checks")
    args = ap.parse_args()

    exe = Path(args.tinygpt).resolve() if args.tinygpt else REPO / "target" / "release" / "tinygpt"
    EXE[0] = exe
    corpus = (Path(args.corpus).resolve() if args.corpus
              else (REPO / ".." / "shared" / "data" / "tinyshakespeare.txt").resolve())
    if not exe.is_file():
        sys.exit(f"no tinygpt binary at {exe} (cargo build --release, or pass --tinygpt)")
    if not corpus.is_file():
        sys.exit(f"no corpus at {corpus} (pass --corpus)")
    missing = []
    for mod in ["numpy", "torch", "transformers"] + ([] if args.skip_llama else ["llama_cpp"]):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        pip = {"llama_cpp": "llama-cpp-python"}
        sys.exit("missing Python packages: pip install " + " ".join(pip.get(m, m) for m in missing))

    work = prepare_work(args.work)
    text = corpus.read_text(encoding="utf-8")
    corpus = work / "corpus.txt"
    corpus.write_text(text + NON_ASCII * 20, encoding="utf-8")
    print(f"tinygpt: {exe}\ncorpus:  {corpus}\nwork:    {work}", flush=True)
    res = Results()
    for name, sets, texts in MODELS:
        try:
            run_model(exe, corpus, work, name, sets, texts, args.skip_llama, res)
        except StepFailed:
            print(f"  ({name}: stopped after the failure above)", flush=True)

    print("\n" + res.table())
    failed = res.failed()
    print(f"\n{len(failed)} of {sum(r[4] != 'info' for r in res.rows)} checks failed"
          if failed else f"\nall {sum(r[4] == 'PASS' for r in res.rows)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
