"""Real pretrained language models from the asset cache, with attention through a method.

    from models import pretrained
    model = pretrained.load("smollm2_135m", method=methods.compose_method("sliding_window"))
    model.tokenizer, model.asset   # the tokenizer from the same file; name, file, sha256, context

The weights come from a GGUF file fetched from a package registry by
``scripts/fetch_assets.py``; ``transformers`` loads it with ``from_pretrained(<dir>,
gguf_file=<name>)`` (the ``gguf`` package dequantizes it), and the first load saves the
dequantized model and its tokenizer beside it (``hf/``, a plain ``transformers`` checkpoint)
so later loads take a second instead of half a minute. The attention layers that ``layers``
chooses go through the method via ``models.hf`` (RoPE is applied before the method sees q/k;
grouped-query K/V are passed as they are): every layer of SmolLM2; the full-attention layers
of Gemma 3 (``layers: full_attention`` in conf/model/gemma3_270m.yaml), whose sliding-window
layers keep their window through the model's own attention. ``asset["routed_layers"]`` lists
the routed layers (the records carry it). A KV-cache press (``methods.press``) acts on the cache, which a
prefill-only model does not keep: its model is built on ``models.hf_decode`` (``pressed``
true; every layer routed), and tasks generate through ``session(tokens)`` (prefill compressed
once, then decode steps on the compressed cache); ``calibrate(ids, period)`` calibrates every
layer's press.

Checked before any compute, each with an error that names the problem: a missing model file
(and the command that fetches it), a file whose sha256 differs from the one recorded when it
was fetched, a method that cannot run causally or with the model's head layout, a
sliding-window layer asked to run the method.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

import methods
from methods.press import Press
from models import hf, hf_decode

FETCH = "python scripts/fetch_assets.py (or `make install`)"
SPECS = {
    # name: (asset folder, GGUF file, chat template)
    "smollm2_135m": ("smollm2_135m", "SmolLM2-135M-Instruct.Q4_1.gguf", True),
    "gemma3_270m": ("gemma3_270m", "gemma-3-270m-q4_k_m.gguf", False),
}


class ModelAssetError(RuntimeError):
    """The model file is missing or not the file that was fetched."""


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNBENCH_CACHE", Path.home() / ".cache" / "attnbench"))


_HASHED: dict = {}  # (path, size, mtime) -> sha256: a sweep hashes the file once per process


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = _hash_file(path)
    return _HASHED[key]


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def model_file(name: str) -> tuple[Path, str]:
    """The GGUF file of model ``name`` and its sha256, checked against the fetch manifest."""
    if name not in SPECS:
        raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(SPECS)}")
    folder, gguf, _ = SPECS[name]
    path = cache_dir() / folder / gguf
    manifest = cache_dir() / folder / "MANIFEST.json"
    if not path.exists() or not manifest.exists():
        extra = " --gemma" if name == "gemma3_270m" else ""
        raise ModelAssetError(f"model file {path} is missing: run {FETCH.replace('.py', '.py' + extra)}")
    want = json.loads(manifest.read_text())["files"].get(gguf)
    got = _sha256(path)
    if got != want:
        raise ModelAssetError(f"model file {path} is corrupt: sha256 {got[:12]}... differs from the "
                              f"fetched file's {str(want)[:12]}...; delete {path.parent} and run {FETCH}")
    return path, got


def check_method(method_cfg, config):
    """Build the method once at the model's head layout: errors before any weights move.
    Returns the instance (a probe: each layer builds its own)."""
    m = methods.build(method_cfg, num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                      max_seq_len=config.max_position_embeddings)
    if not m.supports_causal:
        raise methods.AttentionInputError(
            f"method {type(m).__name__} cannot attend causally, so it cannot run inside a causal language model")
    if isinstance(m, Press) and getattr(m, "num_layers", config.num_hidden_layers) != config.num_hidden_layers:
        m.set_layer(0, config.num_hidden_layers)  # PyramidKV: the pyramid spans the model's layers
    return m


def load(name: str = "smollm2_135m", method=None, dtype: torch.dtype | str | None = None, layers="all", **_):
    """The model with attention through ``method`` (a composed method config; dense when None)
    in ``layers`` (``models.hf.routed_layers``: all, full_attention or indices), in eval mode,
    with ``.tokenizer`` and ``.asset`` (name, file, sha256, context, heads, routed layers)."""
    import transformers

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    saved, sha = checkpoint(name)
    path = saved.parents[1] / SPECS[name][1]  # the GGUF file it came from
    config = transformers.AutoConfig.from_pretrained(saved)
    if layers is not None and not isinstance(layers, str):
        layers = [int(i) for i in layers]  # a ListConfig from the model's config
    routed = hf.routed_layers(config, layers)
    if method is None:
        method = methods.compose_method("dense")
    probe = check_method(method, config)
    if isinstance(probe, Press):
        if layers != "all":
            raise ValueError(f"a KV-cache press runs on a model whose every layer takes the method "
                             f"(models.hf_decode); {name} routes layers={layers!r}")
        model = hf_decode.load(str(saved), method_cfg=method, dtype=dtype or torch.float32)
    else:
        model = hf.load(str(saved), method_cfg=method, dtype=dtype or torch.float32, layers=layers)
    model.attnbench_press = probe if isinstance(probe, Press) else None
    model.tokenizer = transformers.AutoTokenizer.from_pretrained(saved)
    model.asset = {
        "name": name, "file": path.name, "sha256": sha, "context": int(config.max_position_embeddings),
        "num_heads": int(config.num_attention_heads), "num_kv_heads": int(config.num_key_value_heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads),
        "chat_template": SPECS[name][2],
        "num_layers": int(config.num_hidden_layers), "routed_layers": list(routed),
        "unrouted_layers": "none" if len(routed) == config.num_hidden_layers else
        f"the model's own attention (SDPA with its sliding window of {getattr(config, 'sliding_window', None)})",
    }
    return model


def checkpoint(name: str) -> tuple[Path, str]:
    """(folder of the model as a plain ``transformers`` checkpoint, the GGUF file's sha256):
    dequantized from the checked GGUF file on the first call, kept beside it."""
    import transformers

    path, sha = model_file(name)
    saved = path.parent / "hf" / sha[:16]
    if not (saved / "config.json").exists():  # first load: dequantize once and keep it
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        base = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32)
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=saved.name + ".", suffix=".partial", dir=saved.parent))
        base.hf_quantizer = None  # the weights are dequantized: save them as plain fp32 tensors
        base.config.__dict__.pop("quantization_config", None)
        base.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        publish(tmp, saved)
        del base
    return saved, sha


def publish(tmp: Path, saved: Path) -> None:
    """Move a finished checkpoint folder ``tmp`` (this process's own) to ``saved``. Two processes
    may dequantize the same model at once (two jobs started together on a fresh cache): the first
    rename wins and the other's copy, identical, is discarded."""
    try:
        tmp.rename(saved)
    except OSError:
        if not (saved / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


class PretrainedLM(torch.nn.Module):
    """A pretrained model as a config builds it (``_target_`` of conf/model/<name>.yaml):
    ``forward`` is the ``transformers`` model's; ``tokenizer`` and ``asset`` as ``load`` gives."""

    model_name = ""

    def __init__(self, method=None, dtype: torch.dtype | str | None = None, layers="all", **_):
        super().__init__()
        self.lm = load(self.model_name, method=method, dtype=dtype, layers=layers)
        self.tokenizer, self.asset = self.lm.tokenizer, self.lm.asset
        self.press = self.lm.attnbench_press  # a probe instance of the press (None: not a press)
        self.pressed = self.press is not None
        self.press_log: list[dict] = []  # what each session held (tasks.real_text)
        self._classes = None

    def forward(self, **inputs):
        if self.pressed and "cache" not in inputs and "past_key_values" not in inputs:
            raise methods.AttentionInputError(
                f"{self.asset['name']} runs a KV-cache press: generate through session(tokens), not forward")
        return self.lm(**inputs)

    @contextlib.contextmanager
    def decoding(self):
        """Within it the model generates on a KV cache: its attention through ``models.hf_decode``
        (the prompt through the method's prefill, then one decode step per token through the
        method's decode path, dense decode where it has none), so ``session(tokens)`` works for
        any method; the model's own attention path is restored after. A press model always
        decodes so: nothing changes for it."""
        if self.pressed:
            yield self
            return
        hf_decode.register()
        before = self.lm.config._attn_implementation
        self.lm.set_attn_implementation(hf_decode.NAME)
        self._decoding = True
        try:
            yield self
        finally:
            self._decoding = False
            self.lm.set_attn_implementation(before)

    def session(self, tokens: int) -> hf_decode.Session:
        """A generation of ``tokens`` tokens in all through the press (``hf_decode.Session``),
        the prompt's token classes handed on (FastGen); for any method inside ``decoding()``."""
        if not (self.pressed or getattr(self, "_decoding", False)):
            raise ValueError("session: the model does not run a KV-cache press; generate on a cache inside "
                             "model.decoding()")
        if self._classes is None:
            self._classes = hf_decode.token_classes(self.tokenizer)
        return hf_decode.Session(self.lm, tokens, self._classes)

    def calibrate(self, input_ids: torch.Tensor, period: int | None = None) -> dict:
        """Every layer's press calibrated on ``input_ids`` (``hf_decode.calibrate``)."""
        return hf_decode.calibrate(self.lm, input_ids.to(next(self.parameters()).device), period)

    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)
