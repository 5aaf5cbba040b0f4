"""Layer-by-layer executor shared by the quantization methods (GPTQ now, AWQ later).

CPU/GPU memory stays at about one decoder layer + the calibration activations, never the whole
model:

1. The model skeleton is built by transformers from the checkpoint's ``config.json`` with every
   *parameter* on the meta device (``_params_on_meta``: ``nn.Module.register_parameter`` is patched
   for the duration of ``from_config``, so parameters are allocated uninitialized, moved to meta and
   their init runs on meta, i.e. costs nothing). *Buffers* stay real: they are things computed from
   the config in ``__init__`` (rotary ``inv_freq``, Gemma 3's ``embed_scale``) that are not stored
   in the checkpoint, so keeping them is what lets us run pre-layer code without knowing each
   architecture.
2. First-layer capture: every parameter of ``model.model`` outside the decoder layers (embedding,
   final norm, ...) is loaded from the safetensors, every decoder layer is replaced by a
   ``_Recorder`` that records its ``(args, kwargs)`` and passes the hidden states through (the last
   one raises ``_StopForward``), and ``model.model(input_ids=chunk, use_cache=False)`` is called.
   So the architecture's own forward computes the embedding (with any scaling), position ids,
   position embeddings and causal masks, and we record exactly what each layer receives -- per layer,
   because Gemma 2/3 give sliding-window and full-attention layers different masks and rotary
   embeddings.  No decoder-layer parameter is touched (they are still on meta).
3. ``run(process_layer)``: for each layer i, load its parameters (``model.layers.{i}.*``: where the
   layers are, and the names outside them, come from the family's ``mergequant.architectures``
   description), call
   ``process_layer(i, layer, inputs)`` (collect statistics with hooks, quantize in place), recompute
   the layer's outputs with the possibly modified weights, feed them to layer i+1, and put the layer's
   parameters back on meta.
4. ``logits(hidden)``: final norm + lm_head (+ Gemma's final logit soft-capping).

Calibration ids are processed in chunks of ``batch_size`` samples; the layer kwargs (mask, position
embeddings, ...) are captured once per distinct chunk size and reused, which is valid because every
sample has the same length and no padding (``calib_ids`` is a dense [S, T] tensor).

>>> runner = LayerRunner("path/to/model", calib_ids)           # doctest: +SKIP
>>> def process(i, layer, inputs):                              # doctest: +SKIP
...     for name, lin in linear_modules(layer).items(): ...
>>> logits = runner.run(process, finish=True)                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mergequant.architectures import Architecture, architecture_for, resolve
from mergequant.errors import MergeQuantError
from mergequant.io.checkpoint import Checkpoint
from mergequant.memory import release_free_memory
from mergequant.quant.compact import CheckpointForward, remove_forwards
from mergequant.merge.moe_layout import per_expert_view
from mergequant.quant.method import require_finite
from mergequant.quant.moe import MoECalibration, calibrating, unfuse_experts

__all__ = ["LayerInputs", "LayerRunner", "StopLayer", "capture_module_inputs", "linear_modules", "run_layer"]


class _StopForward(Exception):
    """Raised by the last recorder to end the shell forward before the (meta) final layers."""


@contextlib.contextmanager
def _params_on_meta():
    """Build modules with parameters on meta but real buffers (computed from the config)."""
    orig = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` submodules of ``layer`` by qualified name (``self_attn.q_proj``, ...)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerInputs:
    """The inputs of one decoder layer: hidden states per chunk and the kwargs the model passes.

    ``hidden[j]`` is [b_j, T, H]; ``kwargs[j]`` the keyword arguments (attention mask, position
    embeddings, position ids, ...) for chunk j. Iterate to get ``(hidden, kwargs)`` pairs.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict] = field(default_factory=list)
    # hidden states may be stored in a 16-bit dtype; iterating yields them in this one (a copy per chunk)
    compute_dtype: torch.dtype | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        for h, kw in zip(self.hidden, self.kwargs):
            if self.compute_dtype is not None and h.dtype != self.compute_dtype:
                h = h.to(self.compute_dtype)
            yield h, kw

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def nsamples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)


class StopLayer(Exception):
    """Raised by a hook to end a layer's forward early: the rest of the layer is not needed."""


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, *, in_place: bool = False) -> list[torch.Tensor]:
    """Run ``layer`` over all calibration chunks (forward hooks on its modules fire); outputs per chunk.

    A hook may raise ``StopLayer`` to skip the rest of a chunk's forward (that chunk then has no output).
    ``in_place``: each chunk's output overwrites its input tensor (returned), so a layer's inputs and
    outputs are never both held in full; only for inputs nobody needs afterwards."""
    outs = []
    for stored, (h, kw) in zip(inputs.hidden, inputs):
        try:
            out = _first_output(layer(h, **kw))
        except StopLayer:
            continue
        del h
        if in_place and out.shape == stored.shape:
            stored.copy_(out)  # (rounded to the storage dtype if that is 16-bit)
            del out
            out = stored
        outs.append(out)
    return outs


@torch.no_grad()
def capture_module_inputs(layer: nn.Module, inputs: LayerInputs, modules: dict[str, nn.Module],
                          sink: Callable[[list[str], torch.Tensor], None], *, release_between_chunks: bool = False,
                          parallel: bool = False) -> None:
    """Feed every calibration chunk through ``layer`` only as far as needed to see the input of each
    module in ``modules`` (by name), then stop the forward.

    ``sink(names, x)`` receives each distinct input tensor once per chunk together with the names of
    all modules that received that very tensor (q/k/v, or gate/up, share one input): statistics such
    as ``XᵀX`` are then computed once per distinct input rather than once per module. Stopping at the
    last needed module skips the rest of the layer (for the first group of a decoder layer that is
    almost all of it), which is where most of the time of a layer-by-layer quantizer goes.
    ``release_between_chunks``: hand each chunk's freed activations back to the OS before the next
    (lower peak while something large, like a big Hessian, is held; costs re-faulting those pages).
    ``parallel``: no module of ``modules`` feeds another (a true-sequential group: q/k/v, gate/up), so
    the outputs of those that run before the last one's input is seen are never used: they return
    zeros instead of computing (a module not quantized yet would otherwise read its weight from the
    checkpoint and multiply, only for the result to be dropped when the pass stops).
    """
    pending: dict[str, torch.Tensor] = {}

    def flush():
        groups: dict[int, tuple[list[str], torch.Tensor]] = {}
        for name, x in pending.items():
            groups.setdefault(id(x), ([], x))[0].append(name)
        pending.clear()
        for names, x in groups.values():
            sink(names, x)

    def pre_hook(name):
        def hook(mod, args):
            pending[name] = args[0]
            if len(pending) == len(modules):
                flush()
                raise StopLayer
        return hook

    hooks = [m.register_forward_pre_hook(pre_hook(n)) for n, m in modules.items()]
    saved = {}
    if parallel:
        for m in modules.values():
            if isinstance(m, nn.Linear):
                saved[m] = m.__dict__.get("forward")
                m.forward = _zeros_like_output(m.out_features)
    try:
        for h, kw in inputs:
            try:
                layer(h, **kw)
            except StopLayer:
                if release_between_chunks:
                    release_free_memory()
                continue
            missing = sorted(set(modules) - set(pending))
            pending.clear()
            raise RuntimeError(f"modules {missing} were not called by the layer's forward")
    finally:
        for hk in hooks:
            hk.remove()
        for m, fwd in saved.items():
            if fwd is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = fwd


def _zeros_like_output(width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Linear forward that returns zeros of the output's shape (see ``capture_module_inputs``)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], width)
    return forward


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records what it is called with."""

    def __init__(self, orig: nn.Module, sink: list, last: bool):
        super().__init__()
        self._orig = [orig]  # a list so it is not registered as a submodule
        self._sink = sink
        self._last = last

    def __getattr__(self, name):  # e.g. ``attention_type`` read by the model's forward
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_orig"][0], name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if rest:
            raise MergeQuantError("decoder layer called with extra positional arguments; architecture unsupported")
        self._sink.append((hidden, kwargs))
        if self._last:
            raise _StopForward
        return hidden


class LayerRunner:
    """Executes a causal LM one decoder layer at a time over calibration token ids.

    Parameters: ``model_dir`` (a transformers model directory with safetensors), ``calib_ids`` an
    integer tensor [S, T], ``device`` where layers run, ``dtype`` the compute dtype of loaded weights
    (float32 by default), ``batch_size`` samples per forward chunk, ``arch`` the family's description
    (looked up from config.json when not given).
    """

    def __init__(self, model_dir: "str | Path | Checkpoint", calib_ids: torch.Tensor, device: str | torch.device = "cpu",
                 *, dtype: torch.dtype = torch.float32, batch_size: int = 8,
                 activation_dtype: torch.dtype | None = None, arch: Architecture | None = None,
                 moe: MoECalibration | None = None):
        if calib_ids.dim() != 2:
            raise MergeQuantError(f"calibration ids must be [samples, tokens], got shape {tuple(calib_ids.shape)}")
        if batch_size < 1:
            raise MergeQuantError(f"batch_size must be >= 1, got {batch_size}")
        # a mixture-of-experts checkpoint in the fused layout is read under per-expert names; ``model_dir`` may
        # be an opened checkpoint (an adapted BASE+ADAPTER view: mergequant/peft) or a reference to open
        if isinstance(model_dir, Checkpoint):
            self.ckpt = per_expert_view(model_dir)
        else:
            from mergequant.peft.adapted import open_model

            self.ckpt = per_expert_view(open_model(model_dir, hub=False))
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.calib_ids = calib_ids.long()
        self.moe = moe or MoECalibration()
        self.model = self._build_skeleton(arch)
        self.arch = type(self.model).__name__
        self.description = arch or architecture_for(self.ckpt.config, f"{self.ckpt.path}: ")
        if self.description.is_moe and not self.native:  # experts as one Linear per projection (see quant.moe)
            unfuse_experts(self.model, self.description, self.ckpt.config, self.moe)
        self.layers: nn.ModuleList = self._find_layers()
        self.num_layers = len(self.layers)
        self.layers_path = self.description.layers
        self._inputs: list[LayerInputs] | None = None  # per-layer kwargs after capture (hidden only in [0])
        # Hidden states between layers are stored in the checkpoint's own 16-bit dtype when it has one
        # (what the model computes in at inference; GPTQModel and AutoGPTQ keep them in the model's
        # dtype too) and in the compute dtype otherwise. They are the largest item of a calibration run
        # (128 x 2048 tokens of an 8B model: 4 GiB in float32); each layer still computes in ``dtype``.
        self.activation_dtype = activation_dtype or self._stored_dtype()

    def _stored_dtype(self) -> torch.dtype:
        """The checkpoint's dtype if its decoder weights are 16-bit floats, else the compute dtype."""
        prefix = f"{self.layers_path}.0."
        for name, info in self.ckpt.tensors.items():
            if name.startswith(prefix) and name.endswith(".weight") and len(info.shape) == 2:
                if info.dtype in (torch.bfloat16, torch.float16):
                    return info.dtype
                break
        return self.dtype

    # ---- skeleton ------------------------------------------------------------------------------------
    def _build_skeleton(self, arch: Architecture | None = None) -> nn.Module:
        """The model on meta: plain-torch modules (``quant.native``) for a family and config they compute
        exactly like transformers, else transformers' own model class (``native`` says which)."""
        from mergequant.quant.native import build_native, native_refusal

        self.native = native_refusal(self.ckpt.config, self.calib_ids.shape[1]) is None
        if self.native:
            arch = arch or architecture_for(self.ckpt.config, f"{self.ckpt.path}: ")
            return build_native(self.ckpt.config, arch, self.moe, self.device)
        return self._transformers_skeleton()

    def _transformers_skeleton(self) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = dict(self.ckpt.config)
        model_type = config.pop("model_type", None)
        where = self.ckpt.path / "config.json"
        if not model_type:
            raise MergeQuantError(f"{where}: no model_type; cannot build the model")
        try:
            cfg = AutoConfig.for_model(model_type, **config)
        except (ValueError, KeyError) as e:
            raise MergeQuantError(f"{where}: model_type {model_type!r} is not known to transformers "
                                  f"({str(e).splitlines()[0]})") from None
        cfg.use_cache = False
        try:
            with _params_on_meta(), torch.device(self.device):
                model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
        except ValueError as e:
            raise MergeQuantError(f"{where}: {type(cfg).__name__} ({model_type}) has no causal-LM model in "
                                  f"transformers ({str(e).splitlines()[0]})") from None
        model.eval()
        return model

    def _find_layers(self) -> nn.ModuleList:
        """The decoder layers where the description puts them, of the class it names (a config whose
        model_type builds something else is refused rather than run with the wrong names)."""
        d = self.description
        layers = resolve(self.model, d.layers)
        if not isinstance(layers, nn.ModuleList) or self._module_path(layers) != d.layers:
            raise MergeQuantError(f"{self.ckpt.path}: architecture {self.arch} is unsupported "
                                  f"(decoder layers not found at {d.layers})")
        found = {type(layer).__name__ for layer in layers}
        if found != {d.layer_class}:
            raise MergeQuantError(f"{self.ckpt.path}: architecture {self.arch} is unsupported (decoder layers are "
                                  f"{', '.join(sorted(found))}; the {d.model_type} description expects {d.layer_class})")
        return layers

    def _module_path(self, module: nn.Module) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return name
        raise AssertionError("module not in model")

    # ---- loading / freeing parameters ----------------------------------------------------------------
    def _load(self, module: nn.Module, prefix: str, *, skip: tuple[nn.Module, ...] = (),
              skip_params: Collection[str] = (), fallback: dict[str, str] | None = None,
              embeddings_as_stored: bool = False) -> None:
        """Replace every meta parameter of ``module`` (not under ``skip``, not named in ``skip_params``)
        by ``prefix + name`` from disk (in the compute dtype; ``nn.Embedding`` tables in their stored
        dtype if ``embeddings_as_stored``)."""
        skip_ids = {id(m) for s in skip for m in s.modules()}
        for mod_name, mod in module.named_modules():
            if id(mod) in skip_ids:
                continue
            for pname, p in list(mod._parameters.items()):
                if p is None:
                    continue
                rel = f"{mod_name}.{pname}" if mod_name else pname
                if rel in skip_params:
                    continue
                key = prefix + self.description.to_disk(rel)  # MoE: memory names -> names on disk
                if key not in self.ckpt.tensors and fallback and key in fallback:
                    key = fallback[key]
                self._require(key)
                t = require_finite(self.ckpt.path, key, self.ckpt.get(key))
                if tuple(t.shape) != tuple(p.shape):
                    raise MergeQuantError(f"{self.ckpt.path}: tensor {key} has shape {tuple(t.shape)}, "
                                          f"{self.arch} expects {tuple(p.shape)}")
                # only plain lookups: subclasses (Gemma3's scaled embedding) compute in the weight's dtype
                dtype = t.dtype if embeddings_as_stored and type(mod) is nn.Embedding else self.dtype
                data = t.to(device=self.device, dtype=dtype, copy=True)
                mod._parameters[pname] = nn.Parameter(data, requires_grad=False)

    def _require(self, key: str) -> str:
        """``key``, after checking the checkpoint has that tensor (a one-line error if not)."""
        if key not in self.ckpt.tensors:
            raise MergeQuantError(f"{self.ckpt.path}: tensor {key} needed by {self.arch} is missing")
        return key

    @staticmethod
    def _unload(module: nn.Module) -> None:
        """Put ``module``'s parameters back on meta (frees their memory)."""
        for mod in module.modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None and p.device.type != "meta":
                    mod._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)

    def load_layer(self, i: int, deferred: Collection[str] = ()) -> nn.Module:
        """Materialize decoder layer ``i`` from the checkpoint and return it.

        ``deferred``: names (relative to the layer, e.g. ``mlp.down_proj``) of Linear modules whose
        weight stays on meta. Such a module reads its weight from the memory-mapped checkpoint
        whenever it is called (``compact.CheckpointForward``), so the layer still computes exactly
        what a fully loaded one does; a method that replaces the module's forward before it is
        ever called (GPTQ, in true-sequential order) never holds that float weight at all."""
        layer = self.layers[i]
        prefix = f"{self.layers_path}.{i}."
        mods = dict(layer.named_modules())
        unknown = [d for d in deferred if not isinstance(mods.get(d), nn.Linear)]
        if unknown:
            raise MergeQuantError(f"{self.arch}: layer {i} has no Linear module {unknown[0]!r} to defer")
        self._load(layer, prefix, skip_params={f"{d}.weight" for d in deferred})
        for d in deferred:
            key = self._require(f"{prefix}{self.description.to_disk(d)}.weight")
            mods[d].forward = CheckpointForward(mods[d], lambda key=key: self.ckpt.get(key))
        return layer

    def free_layer(self, i: int) -> None:
        """Put layer ``i``'s parameters back on meta and drop any forward a method installed on it
        (with the codes or buffers it held)."""
        remove_forwards(self.layers[i])
        self._unload(self.layers[i])

    # ---- capture ---------------------------------------------------------------------------------------
    def _chunks(self) -> list[torch.Tensor]:
        return list(self.calib_ids.split(self.batch_size, dim=0))

    @torch.no_grad()
    def capture(self) -> LayerInputs:
        """The inputs of layer 0 (and, kept internally, the kwargs every layer receives)."""
        if self._inputs is not None:
            return self._inputs[0]
        shell = resolve(self.model, self.layers_path.rpartition(".")[0])  # the base model around the layers
        self._load(shell, self._module_path(shell) + ".", skip=(self.layers,), embeddings_as_stored=True)
        # plain embeddings stay in their stored dtype (a 32k x 4096 table is 0.5 GiB in float32); their
        # output is cast to the compute dtype, which gives exactly the values a float32 copy would
        casts = [m.register_forward_hook(lambda mod, args, out: out.to(self.dtype))
                 for m in shell.modules() if type(m) is nn.Embedding]
        originals = list(self.layers)
        per_layer_kwargs: list[list[dict]] = [[] for _ in originals]
        hidden0: list[torch.Tensor] = []
        by_size: dict[int, list[dict]] = {}
        try:
            for chunk in self._chunks():
                sink: list = []
                for j, layer in enumerate(originals):
                    self.layers[j] = _Recorder(layer, sink, last=j == len(originals) - 1)
                try:
                    shell(input_ids=chunk.to(self.device), use_cache=False)
                except _StopForward:
                    pass
                if len(sink) != len(originals):
                    raise MergeQuantError(f"{self.arch}: unsupported architecture (its forward called "
                                          f"{len(sink)} of {len(originals)} decoder layers)")
                h = sink[0][0]
                if h.device.type == "meta":
                    raise MergeQuantError(f"{self.arch}: unsupported architecture (pre-layer computation "
                                          "uses weights that were not loaded)")
                hidden0.append(h.to(self.activation_dtype))
                b = chunk.shape[0]
                if b not in by_size:  # same length, no padding: kwargs depend only on the chunk size
                    by_size[b] = [kw for _, kw in sink]
                for j in range(len(originals)):
                    per_layer_kwargs[j].append(by_size[b][j])
        finally:
            for h in casts:
                h.remove()
            for j, layer in enumerate(originals):
                self.layers[j] = layer
            for m in shell.children():  # free the embedding etc.; logits() reloads norm and lm_head
                if m is not self.layers:
                    self._unload(m)
        self._inputs = [LayerInputs(hidden0 if j == 0 else [], per_layer_kwargs[j], self.dtype)
                        for j in range(len(originals))]
        return self._inputs[0]

    # ---- the loop --------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, process_layer: Callable[[int, nn.Module, LayerInputs], None] | None = None,
            *, finish: bool = False, deferred: Callable[[int], Collection[str]] | None = None,
            ) -> torch.Tensor | list[torch.Tensor]:
        """Process every layer in order; returns the logits [S, T, V] if ``finish`` else the final
        hidden states per chunk (before the final norm).

        ``process_layer(i, layer, inputs)`` may run ``run_layer(layer, inputs)`` with hooks to collect
        statistics and modify the layer's weights in place; the runner then recomputes the layer's
        outputs with the current weights and feeds them to the next layer. ``deferred(i)`` names the
        Linear modules of layer i whose weights are not materialized (see ``load_layer``).
        """
        inputs = self.capture()
        hidden = inputs.hidden
        for i in range(self.num_layers):
            layer_inputs = LayerInputs(hidden, self._inputs[i].kwargs, self.dtype)
            layer = self.load_layer(i, deferred(i) if deferred else ())
            try:
                if process_layer is not None:
                    with calibrating(layer):  # MoE: experts see every token while statistics are taken
                        process_layer(i, layer, layer_inputs)
                hidden = run_layer(layer, layer_inputs, in_place=True)  # this layer's inputs are not needed again
            finally:
                self.free_layer(i)
                release_free_memory()  # the freed layer and the recompute's temporaries, before the next load
        self._inputs = None  # the recorded hidden states were consumed; capture again for another run
        if finish:
            return self.logits(hidden)
        return hidden

    @torch.no_grad()
    def logits(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Final norm + lm_head (+ final logit soft-capping) over the last layer's outputs: [S, T, V]."""
        d = self.description
        norm, head = resolve(self.model, d.final_norm), resolve(self.model, d.lm_head)
        if norm is None or head is None:
            raise MergeQuantError(f"{self.arch}: unsupported architecture (no {d.final_norm} / {d.lm_head})")
        self._load(norm, f"{d.final_norm}.")
        head_key = f"{d.lm_head}.weight"  # tied embeddings: the checkpoint may hold only the embedding
        self._load(head, f"{d.lm_head}.",
                   fallback={head_key: d.head_weight_on_disk(self.ckpt.config, self.ckpt.tensors)})
        try:
            out = torch.cat([head(norm(h.to(self.dtype))) for h in hidden], dim=0)
        finally:
            self._unload(norm)
            self._unload(head)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out
