"""The `mergequant` command line: parse options, call one function per command, print.

Errors the user can fix (MergeQuantError) and errors of the environment (OSError: disk full,
read-only filesystem, permission denied) print one line and exit with status 2. Ctrl-C exits with
130 and SIGTERM (timeout, docker stop, systemd) with 143, both after the same cleanup: SIGTERM is
turned into an exception that unwinds through the atomic output folder like KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Iterator, Optional

import typer

from mergequant import __version__
from mergequant.errors import MergeQuantError

app = typer.Typer(
    name="mergequant",
    help="Merge same-architecture LLM checkpoints (mergekit-compatible recipes, streamed tensor by tensor), quantize them (GPTQ, AWQ, int8, W8A8) layer by layer, measure perplexity and publish on the Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(msg: str, code: int = 2):
    msg = " ".join(part.strip() for part in str(msg).splitlines() if part.strip())  # always one line
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


class Terminated(BaseException):
    """A termination signal delivered as an exception in the main thread.

    The default SIGTERM action kills the process where it stands, leaving a partial output folder
    behind; as an exception it unwinds through every ``finally`` and ``atomic_output_dir``'s cleanup
    exactly like Ctrl-C's KeyboardInterrupt. A BaseException (not an Exception) so that no
    ``except Exception`` on the way swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once (the next run removes the partial)
    raise Terminated(signum)


CLEANUP_SIGNALS = ("SIGTERM", "SIGHUP")  # timeout/docker/systemd; a closed terminal or dropped ssh session


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into :class:`Terminated`, unless ignored (``nohup`` ignores SIGHUP on purpose)."""
    for name in CLEANUP_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_terminated)


def os_error_line(command: str, e: OSError) -> str:
    """``<command> <path>: <reason>`` for an OSError; a path inside a partial output folder is shown as
    the output path the user asked for (the partial folder is deleted by then)."""
    from mergequant.io.output_dir import public_path

    paths = [public_path(p) for p in (e.filename, e.filename2) if p is not None]
    where = f" {' -> '.join(paths)}" if paths else ""
    return f"{command}{where}: {e.strerror or e}"


def _signal_name(signum: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(signum).name
    return f"signal {signum}"


@contextlib.contextmanager
def _reported(command: str, after: str) -> Iterator[None]:
    """The one place where a command's failures become one ``error:`` line and an exit status.

    ``after`` says what the interruption left (e.g. "no output was written"); by the time this runs
    every ``finally`` and output-folder cleanup below has already run.
    """
    try:
        yield
    except MergeQuantError as e:
        _fail(str(e))
    except OSError as e:
        _fail(os_error_line(command, e))
    except UnicodeError as e:  # a path with bytes that are not UTF-8 (legal on Linux) reaching a text file or message
        bad = e.object[e.start:e.end] if isinstance(getattr(e, "object", None), (str, bytes)) else ""
        _fail(f"{command}: a path or text holds characters that cannot be written as UTF-8 ({bad!r}); "
              f"rename it; {after}")
    except Terminated as e:
        _fail(f"terminated ({_signal_name(e.signum)}); {after}", 128 + e.signum)
    except KeyboardInterrupt:
        _fail(f"interrupted; {after}", 130)


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="mergekit-style YAML recipe (models: or slices: form)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (written atomically; must not exist unless --force)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto (cuda when available)."),
    shard_size: str = typer.Option("5GB", help="Maximum shard size, e.g. 500MB, 2GB, 5GB."),
    out_dtype: Optional[str] = typer.Option(None, help="dtype written: bfloat16, float16, float32 (default: recipe out_dtype, then dtype, then the inputs')."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan (tensors, bytes to read/write, peak memory); write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (only after the new merge completes)."),
    seed: int = typer.Option(0, help="Seed for DARE's random masks (same seed, same model)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; only errors and the final line."),
    workers: int = typer.Option(2, help="Tensors processed concurrently (reading, computing and writing overlap)."),
    allow_vocab_mismatch: bool = typer.Option(False, "--allow-vocab-mismatch", help="Merge models whose vocabulary sizes differ: the shared rows of embeddings/lm_head are merged, the extra rows come from the base model (whose tokenizer is kept)."),
    mergekit_dtype: bool = typer.Option(False, "--mergekit-dtype", help="Compute like mergekit: round inputs to the recipe dtype and run task-arithmetic methods in it (default: float32 compute, one rounding at the end)."),
    moe_layout: str = typer.Option("per-expert", "--moe-layout", help="Mixture-of-experts output: per-expert (one tensor per expert, the architecture's original names) or fused (mlp.experts.gate_up_proj / down_proj, as mergekit and transformers' save_original_format=False write)."),
):
    """Merge the models of RECIPE into OUT.

    Example: mergequant merge configs/ties.yaml -o ./merged --shard-size 2GB
    """
    log = (lambda m: typer.echo(m, err=True)) if quiet else typer.echo
    with _reported("merge", "no output was written"):
        from mergequant.merge.run import MergeOptions, run_merge, summary
        from mergequant.units import parse_size

        opts = MergeOptions(out=out, device=device, shard_size=parse_size(shard_size), out_dtype=out_dtype,
                            dry_run=dry_run, force=force, seed=seed, quiet=quiet, workers=workers,
                            allow_vocab_mismatch=allow_vocab_mismatch, mergekit_dtype=mergekit_dtype,
                            moe_layout=moe_layout)
        result = run_merge(recipe, opts, log=log)
    if not dry_run:
        typer.echo(summary(result))


@app.command(name="extract-lora")
def extract_lora(
    finetune: str = typer.Argument(..., help="Fine-tuned model: local directory or Hub id."),
    base: str = typer.Option(..., "--base", help="The base model it was fine-tuned from (local directory or Hub id)."),
    out: Path = typer.Option(..., "-o", "--out", help="Adapter folder to write (atomically; must not exist unless --force, which only replaces an earlier adapter)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Maximum LoRA rank per module (default 64 unless --energy is given)."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Keep the smallest rank holding this fraction (0, 1] of each delta's squared Frobenius norm (capped by --rank)."),
    embeddings: str = typer.Option("lora", "--embeddings", help="Embeddings and lm_head: lora (lora_embedding_A/B, lora_A/B) or save (whole, in modules_to_save; forced when the vocabulary sizes differ)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Adapter dtype: float32, bfloat16, float16 (default: the fine-tune's)."),
    svd: str = typer.Option("auto", "--svd", help="exact (full SVD), randomized (range finder, for ranks well under the matrix size) or auto."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (modules, what is kept whole, estimated size); write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an earlier adapter."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Extract a LoRA adapter (PEFT format) from FINETUNE - BASE: per-module SVD, streamed tensor by tensor.

    Example: mergequant extract-lora ./my-finetune --base meta-llama/Llama-3.1-8B -o ./my-lora --rank 64
    """
    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    with _reported("extract-lora", "no output was written"):
        from mergequant.peft.extract import ExtractOptions, run_extract, summary as extract_summary

        opts = ExtractOptions(out=out, rank=rank, energy=energy, embeddings=embeddings, dtype=dtype, svd=svd,
                              dry_run=dry_run, force=force, quiet=quiet)
        res = run_extract(finetune, base, opts, log=typer.echo if dry_run else log)
    if not dry_run:
        typer.echo(extract_summary(res))


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="Model directory (safetensors or .bin, sharded or not), BASE+ADAPTER (a LoRA applied on read) or a LoRA adapter folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Print architecture, layer and tensor counts, dtypes, parameter count and shard layout of MODEL."""
    from mergequant.inspect_model import format_inspection, inspect_model

    with _reported("inspect", "nothing was changed"):
        info = inspect_model(str(model))
    typer.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Full-precision model directory (safetensors), BASE+ADAPTER (a LoRA applied as weights are read, no merged copy) or a LoRA adapter folder (base from its adapter_config.json)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (written atomically)."),
    method: str = typer.Option("gptq", help="gptq (calibrated, GPTQ format), awq (calibrated, AWQ GEMM format, 4-bit), rtn (round-to-nearest baseline in GPTQ format, no data), int8 (bitsandbytes LLM.int8, no data) or w8a8 (SmoothQuant + int8 weights and activations, compressed-tensors format for vLLM) or gguf (llama.cpp files, see --gguf-type)."),
    bits: Optional[int] = typer.Option(None, help="2, 3, 4 or 8 (gptq/rtn, default 4); 4 (awq); 8 (int8, w8a8: the default)."),
    group_size: int = typer.Option(128, help="Input columns per quantization group; -1 for one group per row."),
    desc_act: bool = typer.Option(False, "--desc-act", help="Act order: quantize columns by decreasing Hessian diagonal."),
    static_groups: bool = typer.Option(False, "--static-groups", help="With --desc-act, fix group parameters before reordering."),
    sym: bool = typer.Option(True, "--sym/--no-sym", help="Symmetric (gptq format) or asymmetric (gptq_v2 format)."),
    damp: float = typer.Option(0.01, help="Hessian damping, as a fraction of its mean diagonal (raised automatically if needed)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data: .txt, .jsonl, .parquet or hf:NAME[:CONFIG]:SPLIT[:COLUMN]."),
    samples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per window (capped by the model)."),
    seed: int = typer.Option(0, help="Seed for choosing calibration windows."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    shard_size: str = typer.Option("5GB", help="Maximum shard size."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Held-out text: measure perplexity before and after (window --seqlen) and record both in the model card."),
    zero_point: bool = typer.Option(True, "--zero-point/--no-zero-point", help="awq: asymmetric groups with a zero point (default) or symmetric."),
    n_grid: int = typer.Option(20, "--n-grid", help="awq: scale ratios tried per scaling group (fewer is faster, more can be better)."),
    duo_scaling: bool = typer.Option(True, "--duo-scaling/--no-duo-scaling", help="awq: scales from activation and weight magnitudes (default) or activations only."),
    alpha: float = typer.Option(0.5, help="w8a8: SmoothQuant migration strength in [0, 1] (how much activation range moves into the weights)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Calibration samples per forward pass (more is faster, uses more memory; default: as many as fit in ~64 MiB of activations inside one layer, at most 8192 tokens)."),
    calib_dtype: str = typer.Option("float32", "--calib-dtype", help="gptq: precision of the calibration forward passes: float32 (exact, the same codes on every machine) or bfloat16 (what the model runs in; faster forward passes on CPUs with AVX-512 BF16 and on GPUs; Hessians and the solve stay float32)."),
    moe_calibration: str = typer.Option("all", "--moe-calibration", help="Mixture of experts: all (every expert's statistics from every calibration token; the layer output still uses the real routing) or routed (only the tokens the router sends it; starved experts fall back to round-to-nearest)."),
    moe_min_share: float = typer.Option(0.05, "--moe-min-share", help="--moe-calibration routed: an expert with fewer routed tokens than this fraction of its uniform share (tokens x top-k / experts) is rounded to nearest."),
    moe_names: str = typer.Option("original", "--moe-names", help="Mixture of experts: original (the architecture's per-expert names, e.g. Mixtral block_sparse_moe.experts.E.w1; what vLLM loads) or gptqmodel (mlp.experts.E.gate_proj; what GPTQModel.load needs for Mixtral)."),
    gguf_type: list[str] = typer.Option([], "--gguf-type", help="--method gguf: a GGUF file type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K); repeat for several files written in one pass (OUT/<name>-<TYPE>.gguf)."),
    gguf_search: str = typer.Option("imatrix", "--gguf-search", help="--method gguf with --calib: how the decoder Linears' k-quants (Q2_K..Q6_K) are rounded. imatrix: llama.cpp's importance-weighted search (the bytes llama-quantize --imatrix writes given the same matrix). gptq: the same search picks each 256-column super-block's grid on weights that GPTQ's error feedback (full Hessian of the calibration inputs, --damp) has already updated, then rounds column by column (no effect on the file format; lower output error; slower: one column loop per Linear and k-quant type; dense models)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan (modules, experts, output size, calibration tokens, peak memory); write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Quantize MODEL (layer by layer; RAM ~ one layer + activations) into a checkpoint that
    transformers (with gptqmodel, bitsandbytes or compressed-tensors) loads unchanged; vLLM loads
    the settings listed in docs/quantize.md ("What loads where"), and quantize says when it would not.

    Example: mergequant quantize ./merged -o ./merged-gptq --bits 4 --group-size 128 --calib data.jsonl
    """
    with _reported("quantize", "no output was written"):
        from mergequant.gguf.gptq_grid import check_search
        from mergequant.quant.quantize import QuantizeOptions, run_quantize
        from mergequant.units import parse_size

        check_search(gguf_search, method, calib)  # a bad value, gptq without --calib or with another method: one line

        opts = QuantizeOptions(out=out, method=method, bits=bits, group_size=group_size, desc_act=desc_act,
                               static_groups=static_groups, sym=sym, damp=damp, calib=calib, samples=samples,
                               seqlen=seqlen, seed=seed, device=device, force=force, quiet=quiet,
                               shard_size=parse_size(shard_size), eval_data=eval_data, zero_point=zero_point,
                               n_grid=n_grid, duo_scaling=duo_scaling, alpha=alpha, batch_size=batch_size,
                               moe_calibration=moe_calibration, moe_min_share=moe_min_share, moe_names=moe_names,
                               calib_dtype=calib_dtype,
                               gguf_types=list(gguf_type), gguf_search=gguf_search)
        if dry_run:
            from mergequant.quant.quantize import describe_quantize_plan, plan_quantize

            typer.echo(describe_quantize_plan(plan_quantize(model, opts)))
            return
        res = run_quantize(model, opts, log=lambda m: typer.echo(m, err=True))
    if method == "gguf":
        typer.echo(f"wrote {res.out}: " + ", ".join(p.name for p in res.files))
        return
    grouping = f", group {group_size}" if method in ("gptq", "rtn", "awq") else ""
    typer.echo(f"wrote {res.out}: {res.modules} Linear modules quantized ({method}, {opts.bits}-bit{grouping})"
               + (f"; {len(res.fallbacks)} fell back to round-to-nearest" if res.fallbacks else ""))


@app.command(name="eval")
def eval_cmd(
    models: list[Path] = typer.Argument(..., help="Model directories (one or more): full precision, or quantized by mergequant (any method); BASE+ADAPTER or a LoRA adapter folder for a LoRA fine-tune."),
    data: list[str] = typer.Option(..., "--data", help="Held-out text: .txt, .jsonl (text), .parquet, or hf:NAME[:CONFIG]:SPLIT[:COLUMN]. Repeat it to measure several domains; NAME=SOURCE names one (default: the file's name)."),
    seqlen: int = typer.Option(2048, help="Window length in tokens (capped by the model's max_position_embeddings)."),
    stride: Optional[int] = typer.Option(None, help="Window step; smaller than --seqlen gives every token more context (default: --seqlen)."),
    max_tokens: Optional[int] = typer.Option(None, help="Evaluate only the first N tokens of the text."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    backend: str = typer.Option("auto", help="Quantized checkpoints: transformers (with the format's client kernels: gptqmodel, bitsandbytes, compressed-tensors), dequant (mergequant's own float loader, no client needed), or auto (transformers on a GPU when the client is installed, else dequant: the clients' CPU kernels are very slow)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (one line per model and data)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw perplexity per model and data, and size per model, into this PNG file (needs matplotlib: pip install 'mergequant[plot]')."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Held-out perplexity of each MODEL on each --data (sliding window, each token scored once).

    Example: mergequant eval ./base ./merged ./merged-gptq --data verse=verse.txt --data code=code.txt --plot ppl.png
    """
    from mergequant.evaluate import data_labels, evaluate_models, model_labels, results_table

    with _reported("eval", "nothing was measured"):
        labels, sources = data_labels(data)
        names = model_labels(models)
        if plot is not None:
            from mergequant.plot import check_plot_path, require

            require()  # before any model is loaded
            check_plot_path(plot, [*models, *(side for m in models for side in str(m).split("+")), *sources])  # BASE+ADAPTER: both
        rows = evaluate_models([str(m) for m in models], sources, seqlen=seqlen, stride=stride, device=device,
                               max_tokens=max_tokens, progress=not quiet, backend=backend,
                               log=lambda m: typer.echo(m, err=True))
        if plot is not None:
            from mergequant.plot import plot_results

            plot_results(results_table(models, names, labels, rows), plot, title="held-out perplexity")
    single = len(models) == 1 and len(data) == 1
    for model, row in zip(models, rows):
        for label, source, res in zip(labels, sources, row):
            if as_json:
                typer.echo(json.dumps({"model": str(model), "data": source, **({} if single else {"label": label}),
                                       **res.as_dict()}))
            else:
                typer.echo(("" if single else f"{model} on {label}: ")
                           + f"perplexity {res.perplexity:.4f} (nll {res.nll:.4f} nats/token) over {res.tokens} tokens, "
                           f"{res.windows} windows of {res.seqlen} (stride {res.stride}; {res.backend})")
    if plot is not None:
        typer.echo(f"wrote {plot}")


@app.command()
def push(
    folder: Path = typer.Argument(..., help="Model folder to upload (as written by merge or quantize)."),
    repo: str = typer.Option(..., "--repo", help="Hub repo id NS/NAME (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (refused if it already exists and is public)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created from main if missing)."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request against main instead of committing to it."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit (or PR) title."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN, then the saved login). Never printed."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (default: HF_ENDPOINT, then https://huggingface.co)."),
    base_model_map: list[str] = typer.Option([], "--base-model-map", help="LOCAL=NS/NAME: a local parent in the card was published as NS/NAME (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the folder and card, list the files, sizes and the card; send nothing."),
):
    """Check FOLDER (complete checkpoint, valid card, file sizes) and upload it to the Hub as one commit.

    Example: mergequant push ./merged --repo my-org/my-merge --base-model-map ./poet=my-org/poet
    """
    from mergequant.hub import PushOptions, describe_plan, parse_base_model_map
    from mergequant.hub import push as run_push
    from mergequant.hub import summary as push_summary

    with _reported("push", "the commit was not made (files already uploaded are reused next time)"):
        opts = PushOptions(repo=repo, private=private, revision=revision, create_pr=create_pr,
                           commit_message=commit_message, token=token, endpoint=endpoint, dry_run=dry_run,
                           base_model_map=parse_base_model_map(base_model_map))
        res = run_push(folder, opts, log=lambda m: typer.echo(m, err=True))
    typer.echo(describe_plan(res) if dry_run else push_summary(res))


@app.command(name="run")
def run_cmd(
    release: Path = typer.Argument(..., help="Release file: merge recipe, quantizations, eval data, target repos."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each step (run or skip, and why), disk space needed vs free, peak memory and what each push would upload; write nothing."),
    force_step: list[str] = typer.Option([], "--force-step", help="Redo this step even if unchanged: merge, quantize/NAME, eval, push/NAME, or an output name (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; one line per step."),
    push_dry_run: bool = typer.Option(False, "--push-dry-run", help="Do every step, but print what each push would upload instead of uploading."),
):
    """Run a release: merge -> quantize(s) -> eval -> push, each step recorded in WORKDIR/manifest.json.

    A rerun (after a crash, a kill or an edit) skips the steps whose inputs, settings and outputs
    are unchanged and redoes only the rest.

    Example: mergequant run configs/release.yaml --push-dry-run
    """
    from mergequant.release import RunOptions, run_release, summary_table

    with _reported("run", "finished steps are recorded in the workdir's manifest.json: rerun to resume"):
        res = run_release(release, RunOptions(dry_run=dry_run, force_steps=force_step, quiet=quiet,
                                              push_dry_run=push_dry_run), log=typer.echo)
    if not dry_run:
        typer.echo(summary_table(res))


@app.command()
def demo(
    workdir: Path = typer.Option(Path("mergequant-demo"), "--dir", help="The demo's folder (created; a folder the demo did not make is refused)."),
    force: bool = typer.Option(False, "--force", help="Retrain the models even if the folder holds models trained with the same settings."),
    seed: int = typer.Option(0, help="Seed for the initialisation, the data order and the samples (same seed, same numbers)."),
    quick: bool = typer.Option(False, "--quick", help="Train 40% as long (tests, a first look): the same story, smaller effects."),
):
    """Train three tiny Llama models here (a base on verse + prose + code, then a verse and a code
    specialist), merge them, quantize the merge (GPTQ and RTN, 3-bit), measure held-out perplexity
    per domain and print the table and samples; writes results.json (and results.png with matplotlib).

    Under a minute of one CPU core; nothing is downloaded (the text ships with mergequant).
    """
    from mergequant.demo import FULL, QUICK, RESULTS, format_samples, format_table, run_demo, story_lines

    with _reported("demo", "the demo was not finished"):
        res = run_demo(workdir, seed=seed, size=QUICK if quick else FULL, force=force, log=typer.echo)
    typer.echo("\n" + format_table(res) + "\n\n" + "\n".join(story_lines(res)) + "\n\n" + format_samples(res))
    typer.echo(f"\ndone in {res.seconds:.0f} s: {res.root / RESULTS}" + (f", {res.plot}" if res.plot else "")
               + f"; the release's files are in {res.root / 'release'} (`mergequant run {res.root / 'release.yaml'}` "
               "again skips every step)")


@app.command()
def version():
    """Print the mergequant version."""
    typer.echo(__version__)


# Libraries that log at import time about optional parts they could not load (torchao's CUDA kernels on a
# CPU machine, torch's pytree deprecations): not the user's problem, and they would bury our one line.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_import_noise() -> None:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def idle_threads_sleep() -> None:
    """Let torch's idle OpenMP worker threads sleep instead of spinning (unless the user chose).

    GNU OpenMP (which torch's CPU wheels use) keeps a worker spinning for a while after every
    parallel region. GPTQ's column loop runs tens of thousands of small products per layer, so on a
    CPU the second thread spent most of its time spinning: a tiny-Mixtral-shaped solve took 4x the
    CPU time of a passive wait and, on a loaded 2-core machine, 5x the wall time. Large products
    (calibration forwards, Hessians) do not notice the difference. Must run before torch is imported.
    """
    import os

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main():
    idle_threads_sleep()
    install_signal_handlers()
    quiet_import_noise()
    try:
        app()
    except Terminated as e:  # outside a command's own reporting (while parsing options, after the result)
        typer.echo(f"error: terminated ({_signal_name(e.signum)})", err=True)
        sys.exit(128 + e.signum)
    except MergeQuantError as e:  # pragma: no cover - commands catch their own
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
