"""The contract every attention method follows (see DESIGN.md, "The method contract").

    o = method(q, k, v, causal=False, key_padding_mask=None)
        q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D] with Hkv dividing H (grouped-query attention)
        key_padding_mask: [B, Tk] bool, True for a real key, False for padding
    c = method.cost(tq, tk, causal)   # Cost(flops, density, kv_bytes), per batch element

Input checks (``AttentionMethod.check_inputs``, before any compute; AttentionInputError names
the problem): q, k, v are torch tensors of one floating dtype (float16, bfloat16, float32,
float64) on one device, of 4 dimensions, with equal batch sizes and head dims, k and v of one
shape, Hkv dividing H, H the method's num_heads (and D its head_dim where the method has
weights of that size), causal a bool (causal: Tq <= Tk, the queries being the last Tq of the
Tk positions), key_padding_mask bool [B, Tk] on the same device, and every value finite (NaN
and Inf are refused, not propagated or hidden; see ``value_checks``). Hyperparameters are
checked when a method is built (``check_int``): a ValueError naming the parameter.

Legal edge cases, the same for every method (dense attention's answer):
    a query with no allowed key (every key padding, or causal with no key before it) gets zeros
    Tq = 0 or B = 0: an empty output of q's shape; Tk = 0: zeros of q's shape (no key at all)
    budgets larger than the sequence (a window of at least T, more blocks than there are) are
    not errors: the method attends to what there is (exact attention where it covers all)
"""
from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from methods import masks


class AttentionInputError(ValueError):
    """The inputs (or the request) do not fit what the method can compute."""


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(owner: str, name: str, value, lo: int = 1, hi: int | None = None) -> None:
    """Raise ValueError unless ``value`` is an integer (not a bool) in [lo, hi]: the range check
    of a method's hyperparameters and sizes, at build time."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lo and (
        hi is None or value <= hi)  # Integral: numpy integers too (sizes read from model files)
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{owner}: {name} must be an integer {rng}, got {value!r}")


def synced_clock(x: torch.Tensor) -> float:
    """Wall time in seconds after the device's queued work (the index-building time some
    methods record as ``last_index_ms``, under ``index_timing``). On CUDA it synchronises: a
    call that records it is not free of host syncs."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


_INDEX_TIMING = [False]


@contextlib.contextmanager
def index_timing(enabled: bool):
    """Time the index-building step of the methods that have one (``AttentionMethod.has_index``)
    inside the block: off by default. On, each such call syncs the device before and after its
    index step (``synced_clock``) and sets ``last_index_ms``; off, nothing is synced and
    ``last_index_ms`` stays None, so that a timed call measures the method as it runs."""
    old = _INDEX_TIMING[0]
    _INDEX_TIMING[0] = bool(enabled)
    try:
        yield
    finally:
        _INDEX_TIMING[0] = old


@contextlib.contextmanager
def timed_index(method: "AttentionMethod", x: torch.Tensor):
    """The index-building step of ``method`` inside the block, on ``x``'s device: under
    ``index_timing(True)`` its wall time (synced) is added to ``method.last_index_ms`` (reset
    to None by every call of the method: a call with several index steps sums them); otherwise
    the block runs as it is (no sync) and ``last_index_ms`` is left None."""
    if not _INDEX_TIMING[0] or _capturing():
        yield
        return
    t0 = synced_clock(x)
    try:
        yield
    finally:
        method.last_index_ms = (method.last_index_ms or 0.0) + (synced_clock(x) - t0) * 1e3


_VALUE_CHECKS = [True]


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the NaN/Inf check of every method's inputs on or off inside the block (on by
    default). The check costs one reduction over q, k, v and one device sync per call; inputs
    already checked (the same tensors, not modified since: a timing loop) are not checked again
    (``check_finite``). Off, a NaN input gives NaN in the rows it reaches, as dense attention."""
    old = _VALUE_CHECKS[0]
    _VALUE_CHECKS[0] = bool(enabled)
    try:
        yield
    finally:
        _VALUE_CHECKS[0] = old


def _capturing() -> bool:
    """Inside torch.compile's tracing or a CUDA graph capture (no host sync allowed there)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass(frozen=True)
class Cost:
    """The shared budget axis of sparse and low-rank methods, per batch element.

    flops:    floating-point operations of the work the method must do (2 per multiply-add).
    density:  the share of dense attention's work that is done: for sparse methods the
              fraction of allowed (query, key) pairs that are computed (at most 1), for
              low-rank methods their FLOPs over dense attention's FLOPs (causal and not
              alike), which exceeds 1 at lengths where they do more work than dense.
    kv_bytes: bytes of key/value state the method keeps (a decoder's cache), in bf16.
    """

    flops: float
    density: float
    kv_bytes: float

    def asdict(self) -> dict:
        return asdict(self)


def dense_flops(num_heads: int, head_dim: int, tq: int, tk: int, causal: bool) -> float:
    """FLOPs of exact attention: QK^T and PV, 2 * 2 * pairs * D per head."""
    pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
    return 4.0 * num_heads * pairs * head_dim


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D] (each KV head serves n_rep query heads)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def masked_attention(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """Exact softmax attention restricted to ``mask`` (True = allowed), in fp32.

    The definition every sparse reference reduces to. Rows with no allowed key give zeros.
    q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D]; mask broadcastable to [B, H, Tq, Tk].
    """
    H, D = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = repeat_kv(k, H // k.shape[1]), repeat_kv(v, H // v.shape[1])
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:  # rows with no allowed key: zeros (only those: a NaN elsewhere stays)
        p = p.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return torch.matmul(p, v.to(dt)).to(q.dtype)  # [B, H, Tq, D]


class AttentionMethod(nn.Module):
    """Base class of every method. Subclasses implement ``attend`` and ``cost``.

    Class attributes say what the method is; ``impls`` lists its implementations, the
    first being ``reference`` (pure PyTorch, the definition of the method).
    """

    name: str = "base"
    supports_causal: bool = True
    supports_noncausal: bool = True
    trainable: bool = False  # has parameters that must be trained
    training_free: bool = True  # can replace attention in a trained model
    exact: bool = False  # equals softmax attention
    fixed_head_dim: bool = False  # has weights sized by head_dim: inputs must have D == head_dim
    impls: tuple[str, ...] = ("reference",)
    # the README's method table (python -m analysis.readme): the paper (authors year; None:
    # no single paper), the kind of method, and the test showing that it matches the
    # authors' code ("tests/test_x.py::test_name"; None: no such test yet)
    paper: str | None = None
    kind: str = "exact"
    official_test: str | None = None
    # builds an index before attending (blocks, stripes, selections): under ``index_timing`` its
    # calls record the index step's wall time in ``last_index_ms`` (runner=kernel: ``index_ms``)
    has_index: bool = False
    last_index_ms: float | None = None

    def __init__(
        self,
        num_heads: int = 8,
        head_dim: int = 64,
        max_seq_len: int | None = None,
        num_kv_heads: int | None = None,
        impl: str = "reference",
    ):
        super().__init__()
        cls = type(self).__name__
        if impl not in self.impls:
            raise ValueError(
                f"{cls}: unknown impl {impl!r}; this method has {list(self.impls)}"
            )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_int(cls, "num_heads", num_heads)
        check_int(cls, "num_kv_heads", num_kv_heads)
        check_int(cls, "head_dim", head_dim)
        if max_seq_len is not None:
            check_int(cls, "max_seq_len", max_seq_len)
        if num_heads % num_kv_heads:
            raise ValueError(f"{cls}: num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.max_seq_len = max_seq_len
        self.impl = impl
        self.last_density: float | None = None  # data-dependent methods set it on each call
        # the running implementation's configuration at the last call (path, tiles, launch
        # settings) where the method records it: runner=kernel puts it in details.kernel_config
        self.last_kernel_config: dict | None = None

    # ---- what a record says about the run -------------------------------------------
    @property
    def real_kernel(self) -> bool:
        """Whether the work the method skips is really skipped by the running implementation."""
        return self.impl != "reference"

    def describe(self, q, k, v, causal: bool, key_padding_mask=None) -> dict:
        """Implementation details worth recording (e.g. which SDPA backend ran)."""
        return {}

    def computed_keys(self, q, k, causal: bool) -> torch.Tensor | None:
        """The (query, key) pairs the method computes exactly, as a [B, H, Tq, Tk] bool tensor,
        for attention recall; None for methods that do not choose keys (low-rank, kernelized).
        Exact methods compute every allowed pair."""
        if not self.exact:
            return None
        B, H, tq, _ = q.shape
        tk = k.shape[2]
        allowed = masks.causal(tk - tq) if causal else (lambda b, h, qi, ki: ki >= 0)
        return masks.materialize(allowed, B, H, tq, tk, device=q.device)

    # ---- the contract -----------------------------------------------------------------
    def forward(self, q, k, v, causal: bool = False, key_padding_mask=None):
        self.check_inputs(q, k, v, causal, key_padding_mask)
        self.check_values(q, k, v)
        if self.has_index:
            self.last_index_ms = None  # set by the index step of this call under index_timing
        if q.numel() == 0 or k.shape[2] == 0:  # no query (an empty output) or no key (zeros)
            return torch.zeros_like(q)
        return self.attend(q, k, v, causal, key_padding_mask)

    def attend(self, q, k, v, causal, key_padding_mask):  # pragma: no cover - abstract
        raise NotImplementedError

    def cost(self, tq: int, tk: int, causal: bool) -> Cost:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_values(self, q, k, v) -> None:
        """Refuse NaN/Inf inputs (``value_checks``; tensors already found finite are not checked
        again, see ``check_finite``)."""
        if not _VALUE_CHECKS[0] or _capturing():
            return
        try:
            check_finite(q=q, k=k, v=v)
        except AttentionInputError as e:
            raise AttentionInputError(f"{type(self).__name__}: {e}") from None

    def check_inputs(self, q, k, v, causal, key_padding_mask) -> None:
        """Structure of the inputs (module docstring), before any compute: AttentionInputError."""
        cls = type(self).__name__
        for n, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise AttentionInputError(f"{cls}: {n} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in FLOAT_DTYPES:
                raise AttentionInputError(
                    f"{cls}: {n} must be a floating tensor (float16, bfloat16, float32 or float64), "
                    f"got {t.dtype}")
            if t.dim() != 4:
                raise AttentionInputError(f"{cls}: {n} must be [B, H, T, D], got shape {tuple(t.shape)}")
        if not (q.dtype == k.dtype == v.dtype):
            raise AttentionInputError(f"{cls}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
        if not (q.device == k.device == v.device):
            raise AttentionInputError(f"{cls}: q, k, v devices differ ({q.device}, {k.device}, {v.device})")
        B, H, tq, D = q.shape
        if k.shape != v.shape:
            raise AttentionInputError(f"{cls}: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
        if k.shape[0] != B:
            raise AttentionInputError(f"{cls}: batch size of q ({B}) and k ({k.shape[0]}) differ")
        if k.shape[-1] != D:
            raise AttentionInputError(f"{cls}: head dim of q ({D}) and k ({k.shape[-1]}) differ")
        if D < 1 or k.shape[1] < 1:
            raise AttentionInputError(f"{cls}: head dim and head counts must be >= 1, got q {tuple(q.shape)}, "
                                      f"k {tuple(k.shape)}")
        if H % k.shape[1]:
            raise AttentionInputError(
                f"{cls}: Hkv={k.shape[1]} key/value heads must divide H={H} query heads"
            )
        if H != self.num_heads:
            raise AttentionInputError(f"{cls}: built for num_heads={self.num_heads}, got q with H={H}")
        if self.fixed_head_dim and D != self.head_dim:
            raise AttentionInputError(f"{cls}: built for head_dim={self.head_dim} (its weights), got D={D}")
        if causal not in (True, False):
            raise AttentionInputError(f"{cls}: causal must be a bool, got {causal!r}")
        if causal and not self.supports_causal:
            raise AttentionInputError(f"{cls} is not causal: causal=True is not supported")
        if not causal and not self.supports_noncausal:
            raise AttentionInputError(f"{cls} is causal only: causal=False is not supported")
        if causal and tq > k.shape[2]:
            raise AttentionInputError(
                f"{cls}: causal attention with Tq={tq} queries over Tk={k.shape[2]} keys: the queries "
                f"are the last Tq of the Tk positions, so Tq must not exceed Tk")
        if self.max_seq_len is not None and k.shape[2] > self.max_seq_len:
            raise AttentionInputError(
                f"{cls}: sequence length {k.shape[2]} exceeds max_seq_len={self.max_seq_len}"
            )
        if key_padding_mask is not None:
            if (not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool
                    or tuple(key_padding_mask.shape) != (B, k.shape[2])):
                raise AttentionInputError(
                    f"{cls}: key_padding_mask must be bool [B, Tk] = [{B}, {k.shape[2]}], got "
                    f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)} "
                    f"{tuple(getattr(key_padding_mask, 'shape', ()))}"
                )
            if key_padding_mask.device != q.device:
                raise AttentionInputError(
                    f"{cls}: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


class SparseMethod(AttentionMethod):
    """A method defined by which (query, key) pairs each query attends to, exactly.

    Subclasses give ``mask_mod(q, k, causal)``: a mask function (see ``methods.masks``), which
    may depend on the data (indices chosen from q and k). ``impl=reference`` materialises it
    and runs exact masked attention (true quality, not true speed); ``impl=flex`` runs
    FlexAttention with the block mask built from the same function (blocks that are wholly
    masked are skipped on the GPU). Methods with a Triton plan (``triton_attend``) also offer
    ``impl=triton``: the kernels of ``methods.kernels.block_sparse`` visit only the listed
    tiles (Tq == Tk; elsewhere, and under autograd where a method's kernels have no backward,
    it runs the flex path).
    Every call sets ``last_density``: the fraction of the allowed (causal) pairs that the
    running implementation computes.
    """

    impls = ("reference", "flex")
    flex_block_size = 128  # FlexAttention's tile: blocks of the pattern are masked inside it
    static_mask = False  # True when the mask depends only on the shape: its block mask is cached
    last_path: str | None = None  # the path the last call took: reference, flex or triton
    triton_backward = False  # whether the Triton path has a backward (else training takes flex)

    supports_decode = False  # True: decode steps keep the mask (else models decode dense)

    def mask_mod(self, q, k, causal):  # pragma: no cover - abstract
        raise NotImplementedError

    def computed_keys(self, q, k, causal: bool) -> torch.Tensor:
        """The pairs of ``mask_mod`` (and causality), materialised: the keys each query attends."""
        B, H, tq, _ = q.shape
        tk = k.shape[2]
        mod = self.mask_mod(q, k, causal)
        if causal:
            mod = masks.and_masks(mod, masks.causal(tk - tq))
        return masks.materialize(mod, B, H, tq, tk, device=q.device)

    def decode(self, q, k, v) -> torch.Tensor:
        """A decode step: the newest query (or few) over the whole cache, causal, under the
        same mask as the prefill (materialised: it is one row per query)."""
        B, H, tq, _ = q.shape
        tk = k.shape[2]
        mod = masks.and_masks(self.mask_mod(q, k, True), masks.causal(tk - tq))
        return masked_attention(q, k, v, masks.materialize(mod, B, H, tq, tk, device=q.device))

    def _ran_compiled(self) -> bool:
        return getattr(self, "_compiled", False)

    @property
    def real_kernel(self) -> bool:
        return self.impl in ("flex", "triton") and self._ran_compiled()

    def triton_attend(self, q, k, v, causal, key_padding_mask):  # pragma: no cover - abstract
        """The Triton path: returns (output, pairs computed), or None where it does not apply."""
        return None

    def _wants_grad(self, *tensors) -> bool:
        """Whether autograd will want gradients through this call: of the inputs, or of the
        method's own parameters."""
        return torch.is_grad_enabled() and (any(t.requires_grad for t in tensors) or
                                            any(p.requires_grad for p in self.parameters()))

    def _try_triton(self, q, k, v, causal, key_padding_mask, attend=None):
        """Run ``attend`` (default ``triton_attend``) where the Triton path applies, else None."""
        from methods.kernels import block_sparse

        if self.impl != "triton" or not block_sparse.usable(q) or q.shape[2] != k.shape[2]:
            return None
        if not self.triton_backward and self._wants_grad(q, k, v):
            return None  # forward-only kernels: training takes the flex path (it has a backward)
        self.last_kernel_config = {}  # the Triton path's launch settings, where it records them
        res = (attend or self.triton_attend)(q, k, v, causal, key_padding_mask)
        if res is None:
            return None
        out, work = res
        self.last_path = "triton"
        self.last_kernel_config = {"path": "triton", **self.last_kernel_config}
        B, H, tq, _ = q.shape
        self.last_density = min(1.0, work / float(B * H * (masks.causal_pairs(tq, tq) if causal else tq * tq)))
        self._compiled = q.is_cuda  # the interpreter runs the same kernel, but is no speed test
        return out

    def flex_layout(self, q, k, causal: bool, block: int):
        """(any, full) [B|1, H|1, nq, nk] bool at FlexAttention's ``block``: the blocks the
        pattern touches and those it wholly keeps, causality aside (``flex.clip`` applies
        it), from the method's own index; None (the default) where the method does not know
        them, and ``create_block_mask`` evaluates ``mask_mod`` on every element instead.
        Called after ``mask_mod`` for the same inputs (an index it built may be reused)."""
        return None

    def _flex_block_mask(self, mod, q, k, causal, key_padding_mask):
        """The BlockMask of ``mod``: from ``flex_layout``'s block lists where the method gives
        them (no padding, Tq == Tk), else ``create_block_mask`` on every element."""
        from methods.kernels import flex

        B, H, tq, _ = q.shape
        tk, blk = k.shape[2], self.flex_block_size
        lay = self.flex_layout(q, k, causal, blk) if key_padding_mask is None and tq == tk else None
        self.last_flex_build = "create_block_mask" if lay is None else "from_kv_blocks"
        if lay is None:
            return flex.block_mask(mod, B, H, tq, tk, q.device, blk)
        return flex.from_layout(*flex.clip(*lay, tq, tk, blk, causal), mod, tq, tk, blk)

    def attend(self, q, k, v, causal, key_padding_mask):
        out = self._try_triton(q, k, v, causal, key_padding_mask)
        if out is not None:
            return out
        B, H, tq, _ = q.shape
        tk = k.shape[2]
        mod = self.mask_mod(q, k, causal)
        if causal:
            mod = masks.and_masks(mod, masks.causal(tk - tq))
        if key_padding_mask is not None:
            mod = masks.and_masks(mod, masks.key_padding(key_padding_mask))
        pairs = float(B * H * (masks.causal_pairs(tq, tk) if causal else tq * tk))
        from methods.kernels import flex

        self.last_path = "reference" if self.impl == "reference" or not flex.usable(q, k, v) else "flex"
        if self.last_path == "reference":
            self._compiled = False
            mask = masks.materialize(mod, B, H, tq, tk, device=q.device)
            self.last_density = float(mask.sum()) / pairs
            self.last_kernel_config = {"path": "reference"}
            return masked_attention(q, k, v, mask)
        key = (B, H, tq, tk, causal, str(q.device))
        cache = self.__dict__.setdefault("_block_masks", {})
        if self.static_mask and key_padding_mask is None and key in cache:
            bm = cache[key]
        else:
            bm = self._flex_block_mask(mod, q, k, causal, key_padding_mask)
            if self.static_mask and key_padding_mask is None:
                cache.clear()  # one shape at a time: block masks of long sequences are large
                cache[key] = bm
        self.last_density = min(1.0, flex.block_density(bm, pairs, B, H))
        out, self._compiled = flex.attention(q, k, v, bm)
        self.last_kernel_config = {"path": "flex", "block_size": list(bm.BLOCK_SIZE), "compiled": self._compiled,
                                   "block_mask": getattr(self, "last_flex_build", "cached")}
        return out


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version  # bumped by every in-place change
    except RuntimeError:  # inference-mode tensors keep no version counter
        return None


def check_finite(**tensors: torch.Tensor) -> None:
    """Raise AttentionInputError naming every input holding NaN or Inf (tensors on one device;
    one sync in all). A tensor found finite is marked with its version: the same tensor, not
    modified in place since, is not checked again (a timing loop pays nothing)."""
    todo = {n: t for n, t in tensors.items()
            if _version(t) is None or getattr(t, "_attnbench_finite_at", None) != _version(t)}
    if not todo:
        return
    ns = torch.stack([(~torch.isfinite(t)).sum() for t in todo.values()]).tolist()
    bad = [f"{name} has {n} NaN/Inf values" for name, n in zip(todo, ns) if n]
    if bad:
        raise AttentionInputError("non-finite inputs: " + "; ".join(bad))
    for t in todo.values():
        if _version(t) is not None:
            t._attnbench_finite_at = _version(t)
