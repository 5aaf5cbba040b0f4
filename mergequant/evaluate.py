"""Held-out perplexity with a sliding window.

The text is tokenized once. The first window scores tokens 1..seqlen-1; every later window ends
``stride`` tokens further (at most ``seqlen - 1``, so each window keeps at least one token of
context) and scores only its new tokens, so every token after the first is scored exactly once and,
outside the first window, with at least ``seqlen - stride`` tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from mergequant.errors import MergeQuantError


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int
    seqlen: int
    stride: int
    backend: str = "transformers"  # how the model was run: transformers (its own kernels) or dequant (ours)

    def as_dict(self) -> dict:
        return asdict(self)


EVAL_DATA = "eval data (--data)"


def check_eval_options(seqlen, stride, max_tokens) -> None:
    """Refuse window settings that cannot work, before any model or text is loaded. Each is a real
    failure mode: a 1-token window has no context to predict from, so the window loop never advanced
    (``eval --seqlen 1`` hung); 0 used to mean "default" for --stride and --max-tokens without a word.
    Shared by ``eval``, ``quantize --eval`` and release files, which all reach ``evaluate_model``."""
    from mergequant.quant.calib import check_count

    check_count(seqlen, "--seqlen", 2, "a window needs a token of context and one to predict")
    check_count(stride, "--stride", 1, optional=True)
    if stride is not None and stride > seqlen:
        raise MergeQuantError(f"--stride must be at most --seqlen ({seqlen}), got {stride}")
    check_count(max_tokens, "--max-tokens", 2, "perplexity scores every token after the first", optional=True)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, *, seqlen: int, stride: int | None = None, device: str | torch.device = "cpu",
               progress: bool = False) -> Perplexity:
    """Perplexity of ``model`` (a causal LM returning ``.logits``) on the token ids ``ids`` [N]."""
    check_eval_options(seqlen, stride, None)
    stride = seqlen if stride is None else stride
    n = ids.numel()
    if n < 2:
        raise MergeQuantError("evaluation text has fewer than 2 tokens")
    total, count, windows = 0.0, 0, 0
    step = min(stride, seqlen - 1)  # new tokens per window; at least one token of context for each
    scored_until = 1  # tokens [0, scored_until) are done; token 0 has no context
    bar = tqdm(total=n - 1, desc="eval", disable=not progress, unit="tok")
    while scored_until < n:
        end = min(seqlen if windows == 0 else scored_until + step, n)
        begin = max(0, end - seqlen)
        window = ids[begin:end].unsqueeze(0).to(device)
        logits = model(window).logits[0].float()
        first = scored_until - begin  # first target position inside the window (>= 1)
        logp = torch.log_softmax(logits[first - 1:end - begin - 1], dim=-1)
        targets = window[0, first:]
        total += float(-logp.gather(1, targets.unsqueeze(1)).sum())
        count += targets.numel()
        windows += 1
        bar.update(end - scored_until)
        scored_until = end
    bar.close()
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, windows, seqlen, stride)


BACKENDS = ("auto", "transformers", "dequant")


def evaluate_model(model_dir: str, data: str, *, seqlen: int = 2048, stride: int | None = None, device: str = "auto",
                   max_tokens: int | None = None, progress: bool = True, backend: str = "auto",
                   log=None) -> Perplexity:
    """Load ``model_dir`` and measure perplexity on ``data`` (any calibration source).

    Full-precision models load with transformers. Quantized checkpoints load with transformers and the
    format's maintained client kernels (gptqmodel for GPTQ/AWQ, ...) when ``backend`` is
    ``transformers``, or when it is ``auto``, the device is a GPU and the client is installed;
    otherwise (``dequant``, or ``auto`` on CPU or without the client, or if the client fails to
    load it) with our dequantizing loader.
    The backend used is reported in the result.

    Everything that can be wrong with the options, the data or the folder (tokenizer, too little
    text) is checked before the model is loaded, so mistakes cost seconds, not a model load."""
    return evaluate_models([model_dir], [data], seqlen=seqlen, stride=stride, device=device, max_tokens=max_tokens,
                           progress=progress, backend=backend, log=log)[0][0]


def evaluate_models(model_dirs: list[str], datas: list[str], *, seqlen: int = 2048, stride: int | None = None,
                    device: str = "auto", max_tokens: int | None = None, progress: bool = True, backend: str = "auto",
                    log=None) -> list[list[Perplexity]]:
    """:func:`evaluate_model` for every model of ``model_dirs`` on every source of ``datas``:
    ``result[i][j]`` is model i on data j. Each model is loaded once; the options, every data source
    and every folder are checked before the first model is loaded."""
    check_eval_options(seqlen, stride, max_tokens)
    if backend not in BACKENDS:
        raise MergeQuantError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    from mergequant.io.model_files import pick_device
    from mergequant.peft.adapted import adapter_notes, open_model, tokenizer_dir
    from mergequant.quant.calib import check_token_ids, load_documents, load_tokenizer, local_data_file

    for data in datas:
        local_data_file(data, EVAL_DATA)
    checkpoints, windows = [], []
    for model_dir in model_dirs:
        # clear errors for missing/corrupt directories before transformers; BASE+ADAPTER and adapter-only folders
        # open as an adapted view (mergequant/peft), loaded below from its tensors, never merged on disk
        ck = open_model(model_dir)
        for note in adapter_notes([ck]):
            if log:
                log(note)
        capped = _capped_seqlen(ck.config, seqlen)
        if stride is not None and stride > capped:
            raise MergeQuantError(f"--stride {stride} is longer than the window: --seqlen {seqlen} is capped at {capped} "
                                  f"by {model_dir}'s max_position_embeddings")
        checkpoints.append(ck)
        windows.append(capped)
    try:
        from transformers import AutoModelForCausalLM  # noqa: F401
    except ImportError:
        raise MergeQuantError("mergequant eval needs transformers (pip install 'mergequant[hf]')") from None
    dev = pick_device(device)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    documents: dict[str, list[str]] = {}
    out = []
    for model_dir, ck, window in zip(model_dirs, checkpoints, windows):
        tok = load_tokenizer(tokenizer_dir(ck), "eval")
        ids = []
        for data in datas:
            if data not in documents:
                documents[data] = load_documents(data, what=EVAL_DATA)
            ids.append(_eval_ids(tok, documents[data], max_tokens, data))
            check_token_ids(ids[-1], ck.config.get("vocab_size"), model_dir, data)
        model, used = _load_model(ck, str(ck.path), dev, backend, log)  # a Hub id: its downloaded folder
        row = []
        for one in ids:
            res = perplexity(model, one, seqlen=window, stride=stride, device=dev, progress=progress)
            res.backend = used
            row.append(res)
        out.append(row)
        del model
    return out


def data_labels(datas: list[str]) -> tuple[list[str], list[str]]:
    """(labels, sources) for `eval --data` values: ``NAME=SOURCE`` names a source (NAME: letters,
    digits, ``_.-``; a value that is an existing file is never split), else the label is the
    file's name without its extension (``hf:`` sources: the whole reference). Labels must differ."""
    import re
    from pathlib import Path

    labels, sources = [], []
    for value in datas:
        name, sep, rest = value.partition("=")
        if sep and rest and re.fullmatch(r"[A-Za-z0-9_.-]+", name) and not Path(value).exists():
            labels.append(name)
            sources.append(rest)
        else:
            labels.append(value if value.startswith("hf:") else Path(value).stem or value)
            sources.append(value)
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise MergeQuantError(f"--data: two sources are both named {dup!r}; name them with NAME=SOURCE")
    return labels, sources


def model_labels(model_dirs) -> list[str]:
    """How models are named in tables and plots: the folder's name, or the path as given when two
    folders share a name."""
    from pathlib import Path

    names = [Path(m).resolve().name or str(m) for m in model_dirs]
    return [n if names.count(n) == 1 else str(m) for n, m in zip(names, model_dirs)]


def results_table(model_dirs, names: list[str], labels: list[str], rows: list[list[Perplexity]]) -> dict:
    """{model name: {"perplexity": {data label: value}, "bytes": size of the folder}}: what
    :func:`mergequant.plot.plot_results` draws."""
    from pathlib import Path

    return {name: {"perplexity": {label: r.perplexity for label, r in zip(labels, row)},
                   "bytes": sum(p.stat().st_size for p in Path(m).rglob("*") if p.is_file())}
            for m, name, row in zip(model_dirs, names, rows)}


def _load_model(ck, model_dir, dev, backend: str, log):
    """(model, backend used): a quantized checkpoint as :func:`_load_quantized` decides, a
    full-precision one with transformers (its load report checked)."""
    if ck.config.get("quantization_config"):
        return _load_quantized(ck, model_dir, dev, backend, log)
    from mergequant.peft.adapted import adapter_of

    compute = _compute_dtype(ck, dev, log)
    if adapter_of(ck) is not None:
        return load_from_tensors(ck, dtype=compute).to(dev).eval(), "transformers"
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is checked below, as one line, instead of a table
    try:
        model, report = AutoModelForCausalLM.from_pretrained(model_dir, dtype=compute or "auto", output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    check_load_report(model_dir, report)
    return model.to(dev).eval(), "transformers"


def _stored_dtype(ck) -> torch.dtype | None:
    """The checkpoint's float dtype when all its float tensors share one, else None."""
    dtypes = {t.dtype for t in ck.tensors.values() if t.dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else None


def _compute_dtype(ck, dev, log) -> torch.dtype | None:
    """float32 for a 16-bit full-precision checkpoint on a device that computes its dtype slowly (a CPU
    without bfloat16 / float16 instructions, where the products are emulated: 4x slower end to end on
    the tiny Mixtral here), else None (the checkpoint's own dtype). Every 16-bit value is exact in
    float32, so the model is the same; only activations are no longer rounded to 16 bits (perplexity
    moves by ~0.02%), which is also how the dequantized quantized checkpoints are evaluated."""
    from mergequant.hardware import fast_16bit

    stored = _stored_dtype(ck)
    if stored not in (torch.bfloat16, torch.float16) or fast_16bit(stored, dev):
        return None
    if log:
        name = str(stored).removeprefix("torch.")
        log(f"note: {ck.path}: evaluated in float32, not {name}: this {torch.device(dev).type.upper()} computes "
            f"{name} products slowly (no instructions for them)")
    return torch.float32


def check_load_report(model_dir, report: dict) -> None:
    """Refuse a model that transformers loaded with weights missing from the files: it fills them with
    random values and only logs it, and the perplexity of a random ``lm_head`` (a checkpoint saved
    without its head, ``tie_word_embeddings: false``) would be reported as the model's."""
    missing = sorted(report.get("missing_keys") or [])
    mismatched = report.get("mismatched_keys") or []
    if missing:
        raise MergeQuantError(f"{model_dir}: weight {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                              + " missing from the checkpoint (transformers would initialise it randomly); "
                              "the perplexity would not be this model's")
    if mismatched:
        first = mismatched[0]
        name = first[0] if isinstance(first, (tuple, list)) else first
        raise MergeQuantError(f"{model_dir}: weight {name} has a shape that does not match config.json")


def _capped_seqlen(config: dict, seqlen: int) -> int:
    """--seqlen, capped by the model's max_position_embeddings (read from config.json, which is what
    the loaded model's config holds, so the cap is known before loading it)."""
    limit = config.get("max_position_embeddings")
    return min(seqlen, limit) if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else seqlen


def _eval_ids(tok, documents: list[str], max_tokens: int | None, data: str) -> torch.Tensor:
    """The token ids scored: the documents joined by blank lines, tokenized (in bounded pieces when
    long, see calib.encode_text), cut to --max-tokens. With --max-tokens only a prefix of the text is
    tokenized: enough characters for the tokens asked plus a margin (so the cut never falls inside the
    last token scored), doubled until it suffices or the text is used up."""
    from mergequant.quant.calib import encode_text

    text = "\n\n".join(documents)
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if max_tokens is None:
        ids = encode_text(text, encode)
    else:
        chars = 8 * (max_tokens + 64)
        while True:
            ids = encode_text(text[:chars], encode, limit=max_tokens + 64)
            if ids.numel() >= max_tokens + 64 or chars >= len(text):
                break
            chars *= 2
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise MergeQuantError(f"{data}: {EVAL_DATA}: only {ids.numel()} token(s); perplexity needs at least 2")
    return ids


def _load_quantized(ck, model_dir, dev, backend: str, log):
    """(model, backend used) for a quantized checkpoint; see ``evaluate_model``."""
    import importlib.util

    from mergequant.checkpoint_formats import format_for_config

    from mergequant.architectures import ARCHITECTURES

    qcfg = ck.config["quantization_config"]
    arch = ARCHITECTURES.get(ck.config.get("model_type"))
    if arch is not None and arch.is_moe:
        # transformers fuses experts into 3-D parameters and leaves per-expert quantized tensors unused
        # (random experts, only a warning): a mixture of experts is only scored through our loader
        if backend == "transformers":
            raise MergeQuantError(f"{ck.path}: transformers cannot load quantized experts (it fuses them and leaves "
                                  "them random); use --backend dequant or auto")
        return load_dequantized(ck).to(dev).eval(), "dequant"
    fmt = format_for_config(qcfg)
    client = fmt.client_modules if fmt else ()
    have_client = bool(client) and all(importlib.util.find_spec(m) for m in client)
    # auto uses the client kernels on GPUs only: on CPU their fallback paths unpack the weights on
    # every call (gptqmodel took >10 min to score 200 KB of text with a 4M-parameter model here)
    if backend == "dequant" or (backend == "auto" and (not have_client or torch.device(dev).type != "cuda")):
        return load_dequantized(ck).to(dev).eval(), "dequant"
    if backend == "transformers" and not have_client:
        need = " and ".join(client) if client else "a client mergequant knows"
        raise MergeQuantError(f"{ck.path}: loading {qcfg.get('quant_method')} checkpoints with transformers needs "
                              f"{need} installed (or use --backend dequant)")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=str(dev))
    except Exception as e:  # a client that cannot run this checkpoint here (e.g. no kernel for the device)
        if backend == "transformers":
            raise MergeQuantError(f"{ck.path}: transformers + {'/'.join(client)} could not load it: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if log:
            log(f"note: transformers + {'/'.join(client)} could not load {ck.path} ({type(e).__name__}); "
                "using mergequant's dequantizing loader")
        return load_dequantized(ck).to(dev).eval(), "dequant"
    return model.eval(), "transformers"


def load_from_tensors(ck, dtype: torch.dtype | None = None) -> "torch.nn.Module":
    """A full-precision transformers model built from ``ck``'s config and filled from ``ck.get`` tensor by
    tensor: how an adapted (BASE+ADAPTER) model is loaded without a merged copy on disk. Each parameter is
    allocated once in ``dtype`` (default: the checkpoint's) and copied into; transformers' load report rules apply (a
    missing or mis-shaped weight is refused, see :func:`check_load_report`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mergequant.architectures import ARCHITECTURES
    from mergequant.merge.moe_layout import per_expert_view

    cfg_dict = dict(ck.config)
    model_type = cfg_dict.pop("model_type", None)
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    dtype = dtype or _stored_dtype(ck) or torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    params = dict(model.state_dict())
    arch = ARCHITECTURES.get(model_type)
    if arch is not None and arch.is_moe:  # per-expert tensors -> the fused parameters transformers 5 holds
        from mergequant.quant.moe import fused_state

        view = per_expert_view(ck)
        state = fused_state(arch, {n: view.get(n) for n in view.tensors})
        shapes = {n: tuple(t.shape) for n, t in state.items()}
    else:
        state, shapes = None, {n: tuple(t.shape) for n, t in ck.tensors.items()}
    missing = [n for n in params if n not in shapes and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    unexpected = [n for n in shapes if n not in params and not n.endswith("rotary_emb.inv_freq")]
    mismatched = [n for n in shapes if n in params and tuple(params[n].shape) != shapes[n]]
    check_load_report(ck.path, {"missing_keys": missing, "mismatched_keys": mismatched})
    if unexpected:
        raise MergeQuantError(f"{ck.path}: weight {unexpected[0]} is not a parameter of {type(model).__name__}")
    with torch.no_grad():
        for name in shapes:
            if name in params:
                params[name].copy_(state[name] if state is not None else ck.get(name))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def load_dequantized(ck) -> "torch.nn.Module":
    """Our own loader for every quantized format mergequant writes: a plain float32 transformers model
    whose Linear weights are the dequantized ones. Numerically what a quantized kernel computes (up to
    its fp16 arithmetic), with no dependency on gptqmodel, bitsandbytes or compressed-tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mergequant.architectures import ARCHITECTURES
    from mergequant.checkpoint_formats import format_for_config

    qcfg = ck.config["quantization_config"]
    fmt = format_for_config(qcfg)
    if fmt is None:
        raise MergeQuantError(f"{ck.path}: quantization format {qcfg.get('quant_method')!r} is not one mergequant reads")
    cfg_dict = {k: v for k, v in ck.config.items() if k != "quantization_config"}
    cfg = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    names = list(ck.tensors)
    prefixes = fmt.quantized_prefixes(names, qcfg)
    owned = {f"{p}{suf}" for p in prefixes for suf in fmt.storage_suffixes()}
    state = {f"{p}.weight": fmt.dequantize(ck.get, p, qcfg) for p in prefixes}
    for name in names:
        if name not in owned and name not in state:
            state[name] = ck.get(name).float()
    arch = ARCHITECTURES.get(cfg_dict.get("model_type"))
    if arch is not None and arch.is_moe:  # per-expert weights -> the fused parameters transformers 5 holds
        from mergequant.quant.moe import fused_state

        state = fused_state(arch, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise MergeQuantError(f"{ck.path}: checkpoint does not match {type(model).__name__}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model

